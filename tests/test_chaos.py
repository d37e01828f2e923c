"""Chaos: SIGKILL the worker and the node at random moments over many rounds; every job ends done exactly once,
every result reaches the TPS at least once (duplicates recognisable by SOP Instance UID), nothing is stuck."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest
from conftest import REPO, rtqa_command, start_node, storescu, wait_until
from pipeline_helpers import index_rows, new_plan_revision, start_receiver, write_config

from rtqa_node.worker import result_uid

ROUNDS = 20
PLAN = ("raystation-proton-beamdose-aptg", "RP1.2.752.243.1.1.20260105182345801.4870.23686.dcm")


def _start_worker(data_dir, config, log):
    return subprocess.Popen([*rtqa_command(), "worker", "--data-dir", str(data_dir), "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=log, cwd=REPO, env=dict(os.environ))


def _wait_for_a_lease(data_dir, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if index_rows(data_dir, "SELECT 1 FROM jobs WHERE state = 'leased'"):
            return
        time.sleep(0.002)


@pytest.mark.slow
def test_sigkill_worker_and_node_at_random_moments_every_job_done_exactly_once(rt_data, tmp_path):
    rng = random.Random(20261125)
    tps = start_receiver(tmp_path / "tps")
    config = write_config(tmp_path / "node.toml", stable_age_s=0.3, job_lease_s=1.5, job_max_attempts=50,
                          dispatch_max_attempts=50, dispatch_retry_base_s=0.1,
                          default_destination=("127.0.0.1", tps.port, "TPS"))
    data_dir = tmp_path / "node"
    # one plan study per round: a new plan (own label) on the same structure set
    plans = [tmp_path / "plans" / f"rp{i}.dcm" for i in range(ROUNDS)]
    for i, path in enumerate(plans):
        new_plan_revision(rt_data / PLAN[0] / PLAN[1], path, label=f"chaos {i}")
    worker_log = open(tmp_path / "worker.log", "ab")
    node = start_node(data_dir, "--workers", "0", config=config)
    worker = _start_worker(data_dir, config, worker_log)
    kills = {"node": 0, "worker": 0}
    try:
        for i, plan in enumerate(plans):
            sender = subprocess.Popen(
                ["storescu", "-aet", "TPS_A", "-aec", "RTQA", "-R", "127.0.0.1", str(node.port), str(plan)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "TCP_NODELAY": "1"})
            victim = rng.choice(["node", "worker"])
            if victim == "worker" and rng.random() < 0.6:
                _wait_for_a_lease(data_dir, timeout_s=2.0)  # kill it in the middle of a job
            else:
                time.sleep(rng.uniform(0.0, 1.2))
            kills[victim] += 1
            if victim == "node":
                node.process.kill()
                node.process.wait(10)
                sender.wait(30)
                node = start_node(data_dir, "--workers", "0", config=config)
            else:
                worker.kill()
                worker.wait(10)
                sender.wait(30)
                worker = _start_worker(data_dir, config, worker_log)
            if sender.returncode != 0:  # the node died before acknowledging: the TPS sends again
                storescu(node.port, plan, calling_ae="TPS_A", extra=("-R",), check=True)

        def settled():
            jobs = index_rows(data_dir, "SELECT kind, state FROM jobs")
            return (len([j for j in jobs if j["kind"] == "dispatch"]) == ROUNDS
                    and all(j["state"] == "done" for j in jobs))

        wait_until(settled, timeout_s=90, interval_s=0.2, what="every job done after the chaos")
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(20)
        worker_log.close()
        node.stop()
        tps.stop()
    assert kills["node"] >= 3 and kills["worker"] >= 3, kills
    expired = index_rows(data_dir, "SELECT COUNT(*) AS n FROM job_events WHERE detail = 'lease expired'")
    assert expired[0]["n"] >= 1  # some workers really died holding a job
    jobs = index_rows(data_dir, "SELECT id, plan_study_id, revision, kind, state FROM jobs")
    assert len(jobs) == 2 * ROUNDS and {j["state"] for j in jobs} == {"done"}  # none stuck, none dead
    done = index_rows(data_dir, "SELECT job_id, COUNT(*) AS n FROM job_events WHERE to_state = 'done'"
                                " GROUP BY job_id")
    assert len(done) == len(jobs) and all(row["n"] == 1 for row in done)  # done exactly once
    expected = {result_uid(j["plan_study_id"], j["revision"], "review") for j in jobs if j["kind"] == "review"}
    received = tps.received_uids()
    assert set(received) == expected  # every result at least once, nothing else
    assert len(received) >= len(expected)  # duplicates (at-least-once) carry the same UID
