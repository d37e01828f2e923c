"""Runs inside benchmarks/.venv-dicompyler (dicompyler-core 0.5.6, pydicom<3). Reads jobs as JSON on stdin:
{"jobs": [{"rtstruct", "roi", "rtdose"}], "repeat": n}; prints one JSON document: metrics per job and the wall time
of each repetition over all jobs (file parsing included)."""

import json
import sys
import time

from dicompylercore import dicomparser, dvhcalc

METRICS = ["D99", "D95", "D5", "D1", "D0.03cc"]


def run(jobs):
    out = []
    cache = {}
    for job in jobs:
        for key in ("rtstruct", "rtdose"):
            if job[key] not in cache:
                cache[job[key]] = dicomparser.DicomParser(job[key])
        dvh = dvhcalc.get_dvh(cache[job["rtstruct"]].ds, cache[job["rtdose"]].ds, job["roi"])
        rec = {"volume_cc": float(dvh.volume), "min_gy": float(dvh.min), "max_gy": float(dvh.max),
               "mean_gy": float(dvh.mean)}
        for m in METRICS:
            try:
                rec[m] = float(dvh.statistic(m).value)
            except Exception as exc:  # report the tool's behaviour as it is
                rec[m] = None
                rec[m + "_error"] = repr(exc)
        out.append(rec)
    return out


def main():
    req = json.load(sys.stdin)
    times, results = [], None
    for _ in range(req.get("repeat", 1)):
        t0 = time.perf_counter()
        results = run(req["jobs"])
        times.append(time.perf_counter() - t0)
    json.dump({"results": results, "times_s": times}, sys.stdout)


if __name__ == "__main__":
    main()
