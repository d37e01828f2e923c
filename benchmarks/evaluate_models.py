"""The issue-9 acceptance run: every trained model in models/ and every baseline on a held-out synthetic cohort
(a different seed from training), one table, and the criteria asserted.

    .venv/bin/python benchmarks/evaluate_models.py [--patients 600] [--seed 2] [--first 0] [--out evaluation]

Same as ``rtqa evaluate --patients N --seed S --out DIR`` plus the exit status: 0 when every criterion passes,
1 otherwise (each criterion is printed with its numbers either way). A different seed draws other sites
(institutions) and other reviewers, an external validation; the training seed with ``--first`` past the
training patients gives new patients of the same sites and reviewers, an internal one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rtqa_node.ml.dataset import simulate_cohort
from rtqa_node.ml.evaluate import describe_cohorts, evaluate, markdown
from rtqa_node.ml.train import WEIGHTS_NAME, TrainedModel


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=REPO / "models")
    ap.add_argument("--patients", type=int, default=600)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "evaluation")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "rtqa-node")
    args = ap.parse_args()
    models = [TrainedModel.load(p.parent) for p in sorted(args.models.glob(f"*/{WEIGHTS_NAME}"))]
    data = models[0].record["data"]
    first = data.get("first", 0)
    if args.seed == data["seed"] and args.first < first + data["patients"]:
        print(f"the test patients overlap the training cohort: use another seed or --first {first + data['patients']}",
              file=sys.stderr)
        return 2
    train = simulate_cohort(patients=data["patients"], seed=data["seed"], sites=data["sites"], first=first,
                            cache_dir=args.cache, jobs=args.jobs)
    test = simulate_cohort(patients=args.patients, seed=args.seed, sites=data["sites"], first=args.first,
                           cache_dir=args.cache, jobs=args.jobs)
    test_data = {"source": "synthetic", "seed": args.seed, "patients": args.patients, "sites": data["sites"],
                 "first": args.first}
    result = evaluate(models, train, test, out_dir=args.out, description=describe_cohorts(data, test_data))
    sys.stdout.write(markdown(result))
    failed = [c for c in result.criteria if not c["passed"]]
    for c in failed:
        print(f"FAILED: {c['criterion']}: {c['detail']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
