"""Shared fixtures: the public test data, free ports, a node running as a real subprocess, DCMTK peers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RT_DATA = Path(os.environ.get("RTQA_TEST_DATA", REPO.parent / "shared" / "data" / "rt"))


@pytest.fixture(scope="session")
def rt_data() -> Path:
    """The public DICOM-RT sets (../shared/data/rt or $RTQA_TEST_DATA). CI asserts they are present."""
    if not (RT_DATA / "MANIFEST.json").exists():
        pytest.skip(f"public test data not found at {RT_DATA} (set RTQA_TEST_DATA)")
    return RT_DATA


def dicom_files(folder: Path) -> list[Path]:
    """Every DICOM file below ``folder`` (the sets' SOURCES.md, SHA256SUMS and curves are not DICOM)."""
    skip_suffixes = {".md", ".csv", ".json", ".xz", ".txt"}
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix not in skip_suffixes and p.name != "SHA256SUMS"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, *, timeout_s: float = 20.0, interval_s: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


def peer_env() -> dict[str, str]:
    """Environment for DCMTK peers: TCP_NODELAY avoids ~45 ms delayed-ACK stalls per object (PEERS.md)."""
    return {**os.environ, "TCP_NODELAY": "1"}


def rtqa_command() -> list[str]:
    return [sys.executable, "-m", "rtqa_node"]


@dataclass
class RunningNode:
    process: subprocess.Popen
    data_dir: Path
    port: int
    ae_title: str
    log_path: Path

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout_s)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_node(data_dir: Path, *extra: str, config: Path | None = None, env: dict | None = None,
               ae_title: str = "RTQA") -> RunningNode:
    """Start ``rtqa serve`` on a free loopback port and wait until it listens (node.json appears)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "node.json").unlink(missing_ok=True)
    log_path = data_dir.parent / f"{data_dir.name}-node.log"
    command = [*rtqa_command(), "serve", "--data-dir", str(data_dir), "--port", "0", "--ae-title", ae_title]
    if config is not None:
        command += ["--config", str(config)]
    command += list(extra)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, cwd=REPO,
                                   env={**os.environ, **(env or {})})

    def listening():
        if process.poll() is not None:
            raise RuntimeError(f"rtqa serve exited with {process.returncode}:\n{log_path.read_text()}")
        node_file = data_dir / "node.json"
        if node_file.exists():
            try:
                return json.loads(node_file.read_text())
            except json.JSONDecodeError:
                return None
        return None

    info = wait_until(listening, timeout_s=30, what="rtqa serve to listen")
    return RunningNode(process, data_dir, info["port"], info["ae_title"], log_path)


@pytest.fixture
def node(tmp_path):
    running = start_node(tmp_path / "node")
    yield running
    running.stop()


def storescu(port: int, *paths: Path, called_ae: str = "RTQA", calling_ae: str = "STORESCU",
             extra: tuple[str, ...] = (), check: bool = False, timeout_s: float = 300) -> subprocess.CompletedProcess:
    """DCMTK storescu over loopback, one association, verbose so that per-object results can be parsed."""
    if shutil.which("storescu") is None:
        raise RuntimeError("DCMTK storescu is not installed (scripts/setup installs it)")
    command = ["storescu", "-v", "-aet", calling_ae, "-aec", called_ae, "+sd", "+r", "-nh", *extra,
               "127.0.0.1", str(port), *map(str, paths)]
    result = subprocess.run(command, capture_output=True, text=True, env=peer_env(), timeout=timeout_s)
    if check and result.returncode != 0:
        raise AssertionError(f"storescu failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def one_torch_thread():
    """One torch thread for the ML tests: the CI box is shared, and small conv3d batches run slower on contended
    threads. (torch is imported here, not at the top, so tests without models do not pay for it.)"""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
