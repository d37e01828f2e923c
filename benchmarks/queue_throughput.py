"""Queue throughput: 10,000 queued jobs, each leased and completed by 1, 2 and 4 worker processes.

Each worker process opens its own index connection (as ``rtqa worker`` does) and loops lease -> complete
until the queue is empty; both are guarded transactions (BEGIN IMMEDIATE, WAL, synchronous=FULL), so each job
costs two durable commits. Prints jobs/s per worker count and the machine.

    .venv/bin/python benchmarks/queue_throughput.py [--jobs 10000] [--workers 1 2 4]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import tempfile
import time
from pathlib import Path

from rtqa_node.queue import JobKind, Queue, enqueue
from rtqa_node.store.index import Index


def _fill(path: Path, jobs: int) -> None:
    index = Index(path)
    with index.transaction() as conn:
        conn.execute(
            "INSERT INTO plan_studies (id, key_kind, key_uid, key_label, state, plan_sop_instance_uid, calling_ae,"
            " first_object_at_s, last_object_at_s, updated_at_s) VALUES ('ps-bench', 'plan', 'b', '', 'ready',"
            " '1.2', 'TPS', 0, 0, 0)")
        now = time.time()
        for revision in range(1, jobs + 1):
            enqueue(conn, plan_study_id="ps-bench", revision=revision, kind=JobKind.REVIEW, max_attempts=3,
                    retry_base_s=5.0, now_s=now)
    index.close()


def _work(path: str, owner: str, start, out) -> None:
    index = Index(Path(path))
    queue = Queue(index)
    start.wait()
    done = 0
    while (job := queue.lease(owner, 600.0)) is not None:
        queue.complete(job, owner)
        done += 1
    index.close()
    out.put(done)


def run(jobs: int, workers: int) -> float:
    with tempfile.TemporaryDirectory(dir=os.environ.get("RTQA_BENCH_DIR")) as tmp:
        path = Path(tmp) / "index.sqlite"
        _fill(path, jobs)
        ctx = multiprocessing.get_context("spawn")
        start, out = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_work, args=(str(path), f"w{i}", start, out)) for i in range(workers)]
        for p in procs:
            p.start()
        time.sleep(1.0)  # let every process import and open the index before the clock starts
        t0 = time.perf_counter()
        start.set()
        counts = [out.get() for _ in procs]
        elapsed = time.perf_counter() - t0
        for p in procs:
            p.join()
        assert sum(counts) == jobs, counts
        return jobs / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    import sqlite3

    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, "
          f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}")
    print(f"{args.jobs} jobs, lease + complete per job (2 commits, WAL, synchronous=FULL)")
    for workers in args.workers:
        rate = run(args.jobs, workers)
        print(f"  {workers} worker process(es): {rate:8.0f} jobs/s")


if __name__ == "__main__":
    main()
