"""The issue-9 acceptance run: every trained model in models/ and every baseline on a held-out synthetic cohort
(a different seed from training), one table, and the criteria asserted.

    .venv/bin/python benchmarks/evaluate_models.py [--patients 100] [--seed 2] [--out evaluation]

Same as ``rtqa evaluate --patients N --seed S --out DIR`` plus the exit status: 0 when every criterion passes,
1 otherwise (each criterion is printed with its numbers either way).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rtqa_node.ml.dataset import simulate_cohort
from rtqa_node.ml.evaluate import evaluate, markdown
from rtqa_node.ml.train import WEIGHTS_NAME, TrainedModel


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=REPO / "models")
    ap.add_argument("--patients", type=int, default=100)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "evaluation")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "rtqa-node")
    args = ap.parse_args()
    models = [TrainedModel.load(p.parent) for p in sorted(args.models.glob(f"*/{WEIGHTS_NAME}"))]
    data = models[0].record["data"]
    if args.seed == data["seed"]:
        print("the test cohort must use another seed than the training cohort", file=sys.stderr)
        return 2
    train = simulate_cohort(patients=data["patients"], seed=data["seed"], sites=data["sites"], cache_dir=args.cache)
    test = simulate_cohort(patients=args.patients, seed=args.seed, sites=data["sites"], cache_dir=args.cache)
    result = evaluate(models, train, test, out_dir=args.out)
    sys.stdout.write(markdown(result))
    failed = [c for c in result.criteria if not c["passed"]]
    for c in failed:
        print(f"FAILED: {c['criterion']}: {c['detail']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
