"""Full rule-based review time per chain, after load: median of several runs of ``review_plan_study``.

Chains: the public sets in ../shared/data/rt that carry a plan and a dose, and one synthetic head-and-neck
patient (rtqa synth, 80 slices, graded against HN-SYNTH-SIB-70-56). Loading (pydicom, dose decoding) is timed
once, separately. CT pixels are never decoded by the review.

    .venv/bin/python benchmarks/review.py [--runs 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rtqa_node.checks.pipeline import choose_protocol, review_plan_study
from rtqa_node.rt.plan_study import load_folder
from rtqa_node.synth.cohort import CohortConfig, generate_cohort

RT_DATA = REPO.parent / "shared" / "data" / "rt"
CHAINS = ["eclipse-breast-boost-fullct-weasis", "eclipse-breast-boost-dicompyler", "raystation-proton-ramp-aptg",
          "raystation-proton-beamdose-aptg"]


def bench(folder: Path, runs: int) -> dict:
    t0 = time.perf_counter()
    study = load_folder(folder)
    load_s = time.perf_counter() - t0
    selection = choose_protocol(study)
    times, review = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        review = review_plan_study(study, protocol=selection.protocol)
        times.append(time.perf_counter() - t0)
    return {"load_s": round(load_s, 3), "review_median_s": round(statistics.median(times), 3),
            "review_min_s": round(min(times), 3), "runs": runs, "protocol": selection.protocol.id
            if selection.protocol else None, "verdict": review.verdict.value, "findings": len(review.findings),
            "structures_with_dvh": len(review.metrics.get("structures", {}))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    results = {}
    for name in CHAINS:
        if (RT_DATA / name).exists():
            results[name] = bench(RT_DATA / name, args.runs)
    with tempfile.TemporaryDirectory() as tmp:
        generate_cohort(Path(tmp) / "synth", CohortConfig(patients=1, seed=0))
        results["synth-HN001 (80 slices)"] = bench(Path(tmp) / "synth" / "HN001", args.runs)
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(f"{'chain':<38} {'load s':>7} {'review s (median)':>18} {'min':>7}  verdict / protocol")
        for name, r in results.items():
            print(f"{name:<38} {r['load_s']:7.2f} {r['review_median_s']:18.2f} {r['review_min_s']:7.2f}  "
                  f"{r['verdict']} / {r['protocol'] or '-'} ({r['structures_with_dvh']} DVHs, {r['findings']} findings)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
