"""Synthetic cohort generation speed and size: patients per minute and bytes per patient.

Writes a cohort with ``generate_cohort`` (CT, RTSTRUCT, RTPLAN or RT Ion Plan, RTDOSE, subregion NPZ, ground
truth) into a temporary folder, once per --jobs value, and reports wall time, patients per minute, bytes per
patient (patient folder + NPZ; ground_truth.json and cohort.csv per patient separately), the projected size
of 200 patients, and the split of one patient's time between simulation and writing.

    .venv/bin/python benchmarks/synth.py [--patients 10] [--slices 80] [--modality mixed] [--jobs 1 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from rtqa_node.synth.cohort import CohortConfig, generate_cohort, simulate_patient, write_patient


def _size(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=10)
    parser.add_argument("--slices", type=int, default=80)
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--modality", default="mixed")
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    config = CohortConfig(patients=args.patients, sites=min(args.sites, args.patients), seed=1,
                          slices=args.slices, deviation_rate=0.3, modality=args.modality)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}")
    print(f"cohort: {args.patients} patients, {args.slices} slices, modality {args.modality}")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        patient = simulate_patient(config, 0)
        t1 = time.perf_counter()
        folder = Path(tmp) / "one"
        folder.mkdir()
        write_patient(config, patient, folder)
        t2 = time.perf_counter()
        print(f"one patient: simulate {t1 - t0:.2f} s, write {t2 - t1:.2f} s")
        for jobs in args.jobs:
            out = Path(tmp) / f"cohort-{jobs}"
            start = time.perf_counter()
            generate_cohort(out, config, jobs=jobs)
            wall = time.perf_counter() - start
            patient_bytes = _size(p for d in out.glob("HN*") for p in d.iterdir()) + _size(
                (out / "subregions").iterdir())
            truth_bytes = _size([out / "ground_truth.json", out / "cohort.csv"])
            per = patient_bytes / args.patients
            print(f"jobs {jobs}: {wall:.1f} s, {60.0 * args.patients / wall:.1f} patients/min, "
                  f"{per / 1e6:.1f} MB per patient (+ {truth_bytes / args.patients / 1e3:.0f} kB ground truth), "
                  f"200 patients ~ {200 * per / 1e9:.1f} GB, ~ {200 * wall / args.patients / 60:.1f} min")
            shutil.rmtree(out)


if __name__ == "__main__":
    main()
