"""``rtqa demo``: the whole loop on one machine, with real DICOM peers.

1. make a synthetic head-and-neck plan study (``rtqa synth``), or use ``--plan-study``;
2. start DCMTK ``storescp`` as the TPS's receiving side, and ``rtqa serve`` with one worker whose results go
   back to that TPS;
3. send the plan study with DCMTK ``storescu`` as the TPS would;
4. wait for the node's Structured Report (and the risk map as RT Dose) to arrive at the TPS, and show the SR
   with ``dsrdump`` beside ``rtqa status``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from rtqa_node.errors import InputError

TPS_AE = "DEMO_TPS"
#: the SR's header, the verdict and the first findings; the rest is one command away
DSRDUMP_LINES = 60
NODE_AE = "RTQA"
_PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}


def _say(message: str = "") -> None:
    print(message, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise InputError(f"{tool} not found: install DCMTK (scripts/setup does)")
    return path


def _rtqa(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rtqa_node", *args], **kwargs)


def _all_sent(node_dir: Path) -> bool:
    """Every result object in the node's outbox has been sent (``rtqa status --json``)."""
    status = _rtqa("status", "--data-dir", str(node_dir), "--json", capture_output=True, text=True)
    try:
        outbox = json.loads(status.stdout)["outbox"]
    except (ValueError, KeyError):
        return False
    return bool(outbox["results"]) and outbox["sent"] == outbox["results"]


def make_plan_study(out: Path) -> Path:
    """A synthetic plan study made by ``rtqa synth`` (one patient, fixed seed)."""
    if out.exists():
        shutil.rmtree(out)
    result = _rtqa("synth", "--patients", "1", "--seed", "20261125", "--out", str(out),
                   capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"rtqa synth failed:\n{result.stderr[-3000:]}")
    patients = sorted(p for p in out.iterdir() if p.is_dir())
    if not patients:
        raise RuntimeError(f"rtqa synth wrote no patient folder in {out}")
    return patients[0]


def sr_predictions(dsrdump_lines: list[str]) -> list[tuple[str, float]]:
    """(target, probability) of each "Prediction: <target>" group in ``dsrdump`` output, in document order."""
    out, target = [], None
    for line in dsrdump_lines:
        if (m := re.search(r'"Tracking Identifier"\)="Prediction: ([^"]+)"', line)) is not None:
            target = m.group(1)
        elif target is not None and (m := re.search(r'"Probability"\)="([-0-9.eE+]+)"', line)) is not None:
            out.append((target, float(m.group(1))))
            target = None
    return out


def run_demo(*, data_dir: Path, plan_study: Path | None, timeout_s: float = 180.0) -> int:
    storescu, storescp = _require("storescu"), _require("storescp")
    data_dir = data_dir.resolve()
    node_dir, tps_dir = data_dir / "node", data_dir / "tps"
    for folder in (node_dir, tps_dir):
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)

    _say("rtqa demo: research software, not for clinical use\n")
    if plan_study is None:
        _say("1. making a synthetic head-and-neck plan study with `rtqa synth` ...")
        plan_study = make_plan_study(data_dir / "plan-study")
    elif not plan_study.is_dir():
        raise InputError(f"--plan-study {plan_study} is not a folder")
    else:
        _say("1. using the plan study given with --plan-study")
    files = sorted(p for p in plan_study.rglob("*") if p.is_file())
    _say(f"   plan study: {plan_study} ({len(files)} files)")

    tps_port = _free_port()
    config = data_dir / "rtqa-demo.toml"
    config.write_text(
        f'ae_title = "{NODE_AE}"\nstable_age_s = 15.0\n'
        f'[destinations.{TPS_AE}]\nhost = "127.0.0.1"\nport = {tps_port}\nae_title = "{TPS_AE}"\n'
    )
    tps = subprocess.Popen([storescp, "-aet", TPS_AE, "-pdu", "131072", "-od", str(tps_dir), str(tps_port)],
                           env=_PEER_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    node_log = open(data_dir / "node.log", "wb")
    node = subprocess.Popen(
        [sys.executable, "-m", "rtqa_node", "serve", "--config", str(config), "--data-dir", str(node_dir),
         "--port", "0", "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=node_log,
    )
    try:
        node_file = node_dir / "node.json"
        _wait(lambda: node.poll() is not None or node_file.exists(), 60, "the node to start")
        if node.poll() is not None:
            raise RuntimeError(f"rtqa serve exited early; see {data_dir / 'node.log'}")
        port = json.loads(node_file.read_text())["port"]
        _say(f"2. node {NODE_AE} listening on 127.0.0.1:{port} (data in {node_dir}), one review worker;")
        _say(f"   the TPS's receiving side is DCMTK storescp {TPS_AE} on 127.0.0.1:{tps_port}")

        sent = subprocess.run([storescu, "-v", "-aet", TPS_AE, "-aec", NODE_AE, "-R", "-xw", "+sd", "+r", "-nh",
                               "127.0.0.1", str(port), str(plan_study)],
                              env=_PEER_ENV, capture_output=True, text=True)
        successes = (sent.stdout + sent.stderr).count("Received Store Response (Success)")
        _say(f"3. storescu -aet {TPS_AE} sent the plan study: {successes} of {len(files)} objects acknowledged")
        if successes == 0:
            raise RuntimeError(f"storescu failed:\n{sent.stderr[-2000:]}")

        _say(f"4. waiting for the review result to come back to {TPS_AE} ...")
        # storescp names files by modality: SR.<uid> is the report (RD.<uid> the risk map as RT Dose)
        result_file = _wait(lambda: next(iter(sorted(tps_dir.glob("SR*"))), None), timeout_s, "the result")
        _wait(lambda: _all_sent(node_dir), timeout_s, "the dispatch of every result")
        time.sleep(0.5)  # storescp renames the file into place once it is complete
        status = _rtqa("status", "--data-dir", str(node_dir), capture_output=True, text=True)
        _say("\n$ rtqa status\n" + status.stdout)
        _say(f"5. result received by the TPS: {result_file.name}"
             + "".join(f", {p.name}" for p in sorted(tps_dir.iterdir()) if p != result_file))
        dsrdump = shutil.which("dsrdump")
        if dsrdump:
            dump = subprocess.run([dsrdump, str(result_file)], capture_output=True, text=True)
            lines = (dump.stdout or dump.stderr).splitlines()
            shown = "\n".join(lines[:DSRDUMP_LINES])
            more = (f"\n... {len(lines) - DSRDUMP_LINES} more lines: dsrdump {result_file}"
                    if len(lines) > DSRDUMP_LINES else "")
            _say(f"\n$ dsrdump {result_file.name}\n{shown}{more}")
            predictions = sr_predictions(lines)
            if predictions:
                _say("\nthe SR's model predictions (research model, not for clinical decisions):\n"
                     + "\n".join(f"   {target:<20} probability {p:.3f}" for target, p in predictions))
        _say(f"done: node data in {node_dir}, the TPS's copy in {tps_dir}")
        return 0
    finally:
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(30)
            except subprocess.TimeoutExpired:
                node.kill()
        node_log.close()
        tps.terminate()
        tps.wait(10)
