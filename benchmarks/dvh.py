"""DVH accuracy and speed: rtqa-node's engine and dicompyler-core 0.5.6 side by side, in one run.

    .venv/bin/python benchmarks/dvh.py [--repeat 5]

Accuracy: the 80 usable rows of the Nelms et al. 2015 analytic suite (dvh-analytic/reference.csv), mean and max
absolute error in % of the analytic value, per tool and metric. Speed: wall time over all structures of the
complete clinical chain eclipse-breast-boost-fullct-weasis (RTSTRUCT + RTDOSE parsed from files, every structure
with contours), --repeat runs per tool interleaved (dicompyler-core, rtqa-node, dicompyler-core, ...) so that load
from other processes on a shared machine hits both alike, medians and their ratio.

dicompyler-core 0.5.6 imports ``pydicom.dicomio.read_file``, which pydicom 3 removed (PEERS.md), so it runs in its
own virtual environment, ``benchmarks/.venv-dicompyler`` (created here if missing; never the project's .venv),
through ``benchmarks/_dicompyler_dvh.py`` as a subprocess. Its D-statistics look the dose up at the nearest bin
without interpolation; a D99 of 0 Gy is reported as the tool gives it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rtqa_node.rt.dvh import structure_dvh  # noqa: E402
from rtqa_node.rt.plan_study import read_dose, read_structure_set  # noqa: E402

from machine import describe_machine  # noqa: E402  (benchmarks/ is the script's folder)

DATA = Path(os.environ.get("RTQA_TEST_DATA", REPO.parent / "shared" / "data" / "rt"))
VENV = REPO / "benchmarks" / ".venv-dicompyler"
HELPER = REPO / "benchmarks" / "_dicompyler_dvh.py"
METRICS = [("volume_cc", "volume_cc", "volume_cc"), ("dmin_gy", "min_gy", "min_gy"),
           ("dmax_gy", "max_gy", "max_gy"), ("dmean_gy", "mean_gy", "mean_gy"), ("d99_gy", "d99_gy", "D99"),
           ("d95_gy", "d95_gy", "D95"), ("d5_gy", "d5_gy", "D5"), ("d1_gy", "d1_gy", "D1"),
           ("d0_03cc_gy", "d0_03cc_gy", "D0.03cc")]


def ensure_venv() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {VENV} with dicompyler-core 0.5.6 (pydicom<3) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "dicompyler-core==0.5.6", "pydicom<3",
                        "shapely", "scikit-image"], check=True)
    return python


def dicompyler(python: Path, jobs: list[dict], repeat: int) -> dict:
    run = subprocess.run([str(python), str(HELPER)], input=json.dumps({"jobs": jobs, "repeat": repeat}),
                         capture_output=True, text=True, check=True)
    return json.loads(run.stdout)


def ours_chain(rtstruct: Path, rtdose: Path) -> int:
    ss = read_structure_set(pydicom.dcmread(rtstruct, force=True), rtstruct)
    dose = read_dose(pydicom.dcmread(rtdose, force=True), rtdose)
    n = 0
    for s in ss.structures:
        if s.has_volume:
            structure_dvh(s, dose)
            n += 1
    return n


def machine() -> str:
    return describe_machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    python = ensure_venv()
    print(f"machine: {machine()}")

    root = DATA / "dvh-analytic"
    rows = [r for r in csv.DictReader(open(root / "reference.csv")) if r["files_present"] == "yes"]
    jobs = [{"rtstruct": str(root / r["rtstruct"]), "roi": int(r["roi_number"]), "rtdose": str(root / r["rtdose"])}
            for r in rows]
    theirs = dicompyler(python, jobs, 1)["results"]
    cache: dict = {}
    ours_err, their_err = [], []
    for r, t in zip(rows, theirs):
        key_s, key_d = r["rtstruct"], r["rtdose"]
        if key_s not in cache:
            cache[key_s] = read_structure_set(pydicom.dcmread(root / key_s), root / key_s)
        if key_d not in cache:
            cache[key_d] = read_dose(pydicom.dcmread(root / key_d), root / key_d)
        m = structure_dvh(cache[key_s].by_number(int(r["roi_number"])), cache[key_d]).metrics
        ours_err.append([abs(getattr(m, a) / float(r[ref]) - 1) * 100 for ref, a, _ in METRICS])
        their_err.append([abs((t[k] if t[k] is not None else np.nan) / float(r[ref]) - 1) * 100
                          for ref, _, k in METRICS])
    ours_e, their_e = np.array(ours_err), np.array(their_err)
    print(f"\nNelms analytic suite, {len(rows)} structure/dose pairs: |error| in % of the analytic value")
    print(f"{'metric':<12}{'rtqa mean':>11}{'rtqa max':>10}{'dcmp mean':>11}{'dcmp max':>10}  better on both")
    all_better = True
    for i, (ref, _, _) in enumerate(METRICS):
        om, ox = ours_e[:, i].mean(), ours_e[:, i].max()
        tm, tx = np.nanmean(their_e[:, i]), np.nanmax(their_e[:, i])
        better = om < tm and ox < tx
        all_better &= bool(better)
        print(f"{ref:<12}{om:>11.3f}{ox:>10.3f}{tm:>11.3f}{tx:>10.3f}  {'yes' if better else 'NO'}")
    print(f"smaller mean and max error than dicompyler-core on every metric: {'yes' if all_better else 'NO'}")
    print(f"(row, metric) values within the paper's 3 %: rtqa-node {int((ours_e <= 3.0).sum())} of {ours_e.size}, "
          f"dicompyler-core {int((their_e <= 3.0).sum())} of {their_e.size}")

    chain = DATA / "eclipse-breast-boost-fullct-weasis"
    rs = chain / "1.2.246.352.71.4.320687012.3190.20090511122144"
    rd = chain / "1.2.246.352.71.7.320687012.47206.20090603085223"
    ss = read_structure_set(pydicom.dcmread(rs, force=True), rs)
    chain_jobs = [{"rtstruct": str(rs), "roi": s.roi_number, "rtdose": str(rd)} for s in ss.structures
                  if s.has_volume]
    ours_chain(rs, rd)  # warm-up: imports, page cache
    our_times, their_times = [], []
    for _ in range(args.repeat):  # interleaved, so that load from other processes hits both tools alike
        their_times += dicompyler(python, chain_jobs, 1)["times_s"]
        t0 = time.perf_counter()
        n = ours_chain(rs, rd)
        our_times.append(time.perf_counter() - t0)
    ours_t, theirs_t = statistics.median(our_times), statistics.median(their_times)
    print(f"\nwall time, all {n} structures of eclipse-breast-boost-fullct-weasis (files parsed; {args.repeat} runs "
          f"of each tool, interleaved; median):")
    print(f"  machine         {machine()}")
    print(f"  rtqa-node       {ours_t:8.3f} s   (runs: {', '.join(f'{t:.3f}' for t in our_times)})")
    print(f"  dicompyler-core {theirs_t:8.3f} s   (runs: {', '.join(f'{t:.3f}' for t in their_times)})")
    print(f"  ratio           {theirs_t / ours_t:8.2f} x faster (median / median)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
