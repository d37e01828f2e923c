"""Model inference time per plan study on CPU, next to the review's own (DVH and checks) time.

    .venv/bin/python benchmarks/inference.py [--models models] [--repeat 5] [--threads 1]

Writes one synthetic plan study (``rtqa synth``, 1 patient, 80 slices) to a temporary folder, loads it, runs the
rule-based review (load, DVHs, checks: ``checks.pipeline.review_plan_study``), then for each trained model in
--models: bag building from the plan study with the review's DVH metrics (rasterising the spatial organs on the
dose grid, CT resampled to it) and the forward pass, median of --repeat runs. "After load": the model is loaded
once before timing, as the worker does. The last column is the model's time over the review's, both medians
of this run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rtqa_node.checks.pipeline import review_plan_study
from rtqa_node.ml.bags import bags_from_plan_study
from rtqa_node.ml.inference import _review_metrics, predict_bags
from rtqa_node.ml.train import WEIGHTS_NAME, TrainedModel
from rtqa_node.rt.plan_study import load_folder
from rtqa_node.synth.cohort import CohortConfig, generate_cohort


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=REPO / "models")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folders = sorted(p.parent for p in args.models.glob(f"*/{WEIGHTS_NAME}"))
    if not folders:
        print(f"no models in {args.models}; run `rtqa train` first", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        generate_cohort(Path(tmp) / "c", CohortConfig(patients=1, seed=7))
        folder = next(p for p in (Path(tmp) / "c").iterdir() if p.is_dir() and p.name.startswith("HN"))
        t0 = time.perf_counter()
        study = load_folder(folder)
        load_s = time.perf_counter() - t0
        review_t = []
        for _ in range(args.repeat):  # the first run also decodes the CT (cached on the study): median
            t0 = time.perf_counter()
            review = review_plan_study(study)
            review_t.append(time.perf_counter() - t0)
        review_s = statistics.median(review_t)
        metrics, names = _review_metrics(review)
        print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)")
        print(f"plan study load {load_s:.2f} s; rule-based review (DVHs + checks) {review_s:.2f} s")
        print(f"{'model':14} {'bags (s)':>9} {'forward (s)':>12} {'total (s)':>10} {'total / review':>15}")
        for f in folders:
            model = TrainedModel.load(f)
            bag_t, fwd_t = [], []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                bags = bags_from_plan_study(study, metrics, standard_names=names)
                bag_t.append(time.perf_counter() - t0)
                fwd_t.append(predict_bags(model, bags).inference_s)
            b, fw = statistics.median(bag_t), statistics.median(fwd_t)
            print(f"{model.name:14} {b:9.3f} {fw:12.4f} {b + fw:10.3f} {(b + fw) / review_s:15.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
