"""Ingest throughput: the same plan study sent with DCMTK storescu to rtqa, DCMTK storescp and Orthanc, in one run.

    .venv/bin/python benchmarks/ingest.py [--repeats 5] [--slices 200] [--baseline GIT_REF] [--no-polling]

Data: the Weasis CT of the Eclipse breast-boost chain ($RTQA_TEST_DATA, default ../shared/data/rt), decoded to
explicit VR little endian and extended to ``--slices`` 512x512 slices (extra slices are copies with new UIDs and
positions), plus its RTSTRUCT, RTPLAN and RTDOSE. Each receiver starts fresh on loopback for each repetition;
storescu sends everything in one association with TCP_NODELAY=1 (PEERS.md). Prints objects/s and MB/s
(medians), the ratios rtqa/storescp and rtqa/orthanc, and the machine. rtqa is measured as configured by
default (event-driven reactor wake-ups, ``rtqa_node/dicom/wakeup.py``) and with pynetdicom's polling reactors
(its own 1 ms, and 0.2 ms), to show what the wake-ups buy.
``--baseline REF`` also runs the ``rtqa_node`` of another commit (``git archive``) interleaved with the others,
so that a change is judged by ratios from one run on this shared, noisy machine; ``--no-polling`` leaves out
the two polling runs.
With ``--profile`` one more rtqa run is sampled with py-spy (``pip install -e '.[bench]'``; wall clock, idle
included) and the time of the thread that serves the association is broken down by function: cProfile would
see only the main thread, which does nothing while the SCP's threads work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from machine import describe_machine  # benchmarks/ is the script's folder

REPO = Path(__file__).resolve().parent.parent
RT_DATA = Path(os.environ.get("RTQA_TEST_DATA", REPO.parent / "shared" / "data" / "rt"))
CHAIN = "eclipse-breast-boost-fullct-weasis"
ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {port}")


def prepare_data(out: Path, slices: int) -> tuple[int, int]:
    """Write the benchmark plan study to ``out``; return (objects, bytes)."""
    chain = RT_DATA / CHAIN
    if not chain.exists():
        raise SystemExit(f"benchmark data {chain} not found (set RTQA_TEST_DATA)")
    cts, others = [], []
    for path in sorted(chain.iterdir()):
        if path.suffix in (".md",) or path.name == "SHA256SUMS":
            continue
        ds = pydicom.dcmread(path)
        (cts if ds.Modality == "CT" else others).append(ds)
    cts.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    thickness = float(cts[1].ImagePositionPatient[2]) - float(cts[0].ImagePositionPatient[2])
    for ds in cts:
        ds.decompress()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for index in range(slices):
        source = cts[index % len(cts)]
        ds = source if index < len(cts) else pydicom.dcmread(pydicom.filebase.DicomBytesIO(_encode(source)))
        if index >= len(cts):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
                entropy_srcs=["rtqa-benchmark", str(index)])
            position = list(map(float, cts[-1].ImagePositionPatient))
            position[2] += thickness * (index - len(cts) + 1)
            ds.ImagePositionPatient = position
        ds.save_as(out / f"CT{index:04d}.dcm", enforce_file_format=True)
    for ds in others:
        ds.save_as(out / f"{ds.Modality}.dcm", enforce_file_format=True)
    files = list(out.iterdir())
    return len(files), sum(p.stat().st_size for p in files)


def _encode(ds) -> bytes:
    buffer = pydicom.filebase.DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def send(port: int, called_ae: str, data: Path, expected: int) -> float:
    start = time.perf_counter()
    result = subprocess.run(["storescu", "-aec", called_ae, "-pdu", "131072", "+sd", "127.0.0.1", str(port),
                             str(data)], capture_output=True, text=True, env=ENV)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"storescu to {called_ae} failed: {result.stderr[-2000:]}")
    return elapsed


class Rtqa:
    name = "rtqa serve"

    def __init__(self, poll_s: float | None = None, source: Path = REPO, label: str | None = None) -> None:
        """``poll_s``: run with pynetdicom's polling reactors at this interval instead of the wake-ups.
        ``source``: a folder holding the ``rtqa_node`` package to run (another commit's, see ``--baseline``)."""
        self.poll_s = poll_s
        self.source = source
        if poll_s is not None:
            self.name = f"rtqa serve (polling every {poll_s * 1000:g} ms)"
        if label is not None:
            self.name = f"rtqa serve ({label})"

    def start(self, work: Path) -> int:
        data_dir = work / "rtqa"
        env = dict(ENV, RTQA_LOG_LEVEL="WARNING")
        if self.poll_s is not None:
            env["RTQA_NETWORK_POLL_S"] = str(self.poll_s)
            env["RTQA_NETWORK_WAKEUPS"] = "false"
        command = [sys.executable, "-m", "rtqa_node", "serve", "--data-dir", str(data_dir), "--port", "0"]
        # python -m puts the working directory first on sys.path: its rtqa_node is the one that runs
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        cwd=self.source)
        node_file = data_dir / "node.json"
        deadline = time.monotonic() + 30
        while not node_file.exists():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("rtqa serve did not start")
            time.sleep(0.02)
        return json.loads(node_file.read_text())["port"]

    called_ae = "RTQA"

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        self.process.wait(30)


class StoreScp:
    name = "DCMTK storescp"
    called_ae = "STORESCP"

    def start(self, work: Path) -> int:
        out = work / "storescp"
        out.mkdir()
        port = free_port()
        self.process = subprocess.Popen(["storescp", "-aet", "STORESCP", "-pdu", "131072", "-od", str(out),
                                         str(port)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(port)
        return port

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


class Orthanc:
    name = "Orthanc (SyncStorageArea, SQLite)"
    called_ae = "ORTHANC"

    def start(self, work: Path) -> int:
        storage = work / "orthanc"
        storage.mkdir()
        port, self.http = free_port(), free_port()
        config = work / "orthanc.json"
        config.write_text(json.dumps({
            "Name": "pacs", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "DicomAet": "ORTHANC", "DicomPort": port, "HttpPort": self.http, "RemoteAccessAllowed": False,
            "DicomCheckCalledAet": False, "SyncStorageArea": True, "MaximumPduLength": 131072,
            "Plugins": [], "StableAge": 3600,
        }))
        binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        self.process = subprocess.Popen([binary, str(config)], env=ENV, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        wait_for_port(port)
        wait_for_port(self.http)
        return port

    def instances(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/statistics", timeout=10) as response:
            return int(json.load(response)["CountInstances"])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def machine() -> str:
    return describe_machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--extra-poll-s", type=float, nargs="*", default=[],
                        help="also measure rtqa with polling reactors at these intervals (s)")
    parser.add_argument("--no-polling", action="store_true",
                        help="leave out the two polling-reactor runs of rtqa (faster A/B runs)")
    parser.add_argument("--baseline", metavar="GIT_REF",
                        help="also run the rtqa_node of this commit (git archive), interleaved, for A/B ratios")
    parser.add_argument("--profile", action="store_true",
                        help="sample one extra rtqa run with py-spy and print where the association thread's time goes")
    args = parser.parse_args()
    if shutil.which("storescu") is None:
        raise SystemExit("DCMTK is not installed (scripts/setup installs it)")
    with tempfile.TemporaryDirectory(prefix="rtqa-bench-") as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        data.mkdir()
        objects, size = prepare_data(data, args.slices)
        print(f"machine: {machine()}")
        print(f"data: {objects} objects ({args.slices} CT slices 512x512 explicit VR LE + RTSTRUCT, RTPLAN, "
              f"RTDOSE), {size / 1e6:.1f} MB; storescu, one association, TCP_NODELAY=1; "
              f"{args.repeats} repetitions, receivers interleaved")
        polling = [] if args.no_polling else [Rtqa(poll_s=0.001), Rtqa(poll_s=0.0002)]
        baseline = []
        if args.baseline:
            source = tmp / "baseline"
            source.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", args.baseline, "rtqa_node"],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
            baseline = [Rtqa(source=source, label=args.baseline)]
        receivers = [Rtqa(), *polling, *baseline, *(Rtqa(poll_s=p) for p in args.extra_poll_s), StoreScp(),
                     Orthanc()]
        times: dict[str, list[float]] = {r.name: [] for r in receivers}
        for repeat in range(args.repeats):
            for receiver in receivers:
                work = tmp / f"run-{repeat}-{receivers.index(receiver)}"
                work.mkdir()
                port = receiver.start(work)
                try:
                    times[receiver.name].append(send(port, receiver.called_ae, data, objects))
                    if isinstance(receiver, Orthanc):
                        assert receiver.instances() == objects, "Orthanc did not store every object"
                finally:
                    receiver.stop()
                shutil.rmtree(work)
        print(f"\n{'receiver':<40} {'objects/s':>10} {'MB/s':>8} {'median s':>9} {'min s':>7} {'max s':>7}")
        rates = {}
        for name, samples in times.items():
            median = statistics.median(samples)
            rates[name] = objects / median
            print(f"{name:<40} {objects / median:10.0f} {size / 1e6 / median:8.1f} {median:9.3f} "
                  f"{min(samples):7.3f} {max(samples):7.3f}")
        rtqa = rates[receivers[0].name]
        print(f"\nratio rtqa/storescp: {rtqa / rates[StoreScp.name]:.2f}   (storescp: no fsync, no index)")
        print(f"ratio rtqa/orthanc:  {rtqa / rates[Orthanc.name]:.2f}   (target >= 1.0: both fsync and index)")
        if polling:
            print(f"ratio rtqa wake-ups / polling 1 ms: {rtqa / rates[polling[0].name]:.2f}, "
                  f"/ polling 0.2 ms: {rtqa / rates[polling[1].name]:.2f}")
        if baseline:
            base = rates[baseline[0].name]
            print(f"ratio rtqa/orthanc at {args.baseline}: {base / rates[Orthanc.name]:.2f}; "
                  f"rtqa now / rtqa at {args.baseline}: {rtqa / base:.2f}")
        print(f"load average after the run: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        if args.profile:
            profile_association_thread(tmp, data, objects)
    return 0


def profile_association_thread(tmp: Path, data: Path, objects: int, top: int = 30) -> None:
    """Sample a node with py-spy while storescu sends; print inclusive wall time per function for the thread
    that serves the association (pynetdicom's ``Association.run_reactor``) and for its DUL thread
    (``DULServiceProvider.run_reactor``), which receives every PDU before the association thread sees it."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("\n--profile: py-spy not installed (pip install -e '.[bench]')")
        return
    receiver = Rtqa()
    work = tmp / "profile"
    work.mkdir()
    port = receiver.start(work)
    raw = tmp / "spy.txt"
    spy = subprocess.Popen([py_spy, "record", "-p", str(receiver.process.pid), "-o", str(raw), "-f", "raw",
                            "-r", "1000", "--idle", "-d", "30"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    send(port, receiver.called_ae, data, objects)
    spy.send_signal(signal.SIGINT)  # py-spy writes what it has on SIGINT
    spy.wait(60)
    receiver.stop()
    threads = {"association": "Association.run_reactor", "DUL": "DULServiceProvider.run_reactor"}
    inclusive: dict[str, dict[str, int]] = {name: {} for name in threads}
    totals = dict.fromkeys(threads, 0)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f.split(" (")[0] for f in stack.split(";")]
        for thread, root in threads.items():
            if root in frames:
                totals[thread] += int(count)
                for name in set(frames):
                    inclusive[thread][name] = inclusive[thread].get(name, 0) + int(count)
    for thread, limit in (("association", top), ("DUL", top // 2)):
        total = totals[thread]
        print(f"\nwhere the {thread} thread's time goes (py-spy, wall clock incl. waits, {total} samples of 1 ms):")
        for name, count in sorted(inclusive[thread].items(), key=lambda item: -item[1])[:limit]:
            print(f"  {100 * count / max(total, 1):5.1f} %  {name}")


if __name__ == "__main__":
    raise SystemExit(main())
