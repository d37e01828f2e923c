"""Helpers for the assembly / queue / worker / dispatch tests: a DCMTK storescp as the TPS's receiving side,
node config files, modified copies of plans (new revisions), reading the index."""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pydicom
from conftest import free_port, peer_env, wait_until
from pydicom.uid import generate_uid

DATA_SETS_COMPLETE_OR_FALLBACK = ("eclipse-breast-boost-fullct-weasis", "raystation-proton-ramp-aptg",
                                  "raystation-proton-beamdose-aptg")


@dataclass
class Receiver:
    """``storescp -aet TPS -pdu 131072 +uf -od OUTDIR PORT``: every arrival is a new file (+uf), so duplicate
    deliveries are visible and recognisable by SOP Instance UID."""

    process: subprocess.Popen
    port: int
    out_dir: Path

    def received_uids(self) -> list[str]:
        uids = []
        for path in sorted(self.out_dir.iterdir()):
            try:
                uids.append(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
            except Exception:
                continue  # a file storescp is still writing
        return uids

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def start_receiver(out_dir: Path, port: int | None = None) -> Receiver:
    out_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    process = subprocess.Popen(["storescp", "-aet", "TPS", "-pdu", "131072", "+uf", "-od", str(out_dir), str(port)],
                               env=peer_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import socket

    def listening():
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, timeout_s=10, what="storescp to listen")
    return Receiver(process, port, out_dir)


def write_config(path: Path, **values) -> Path:
    """A TOML settings file; ``destinations={"AE": (host, port, called_ae)}``, ``default_destination=(...)``."""
    lines, tables = [], []
    for key, value in values.items():
        if key == "destinations":
            for ae, (host, port, called) in value.items():
                tables.append(f'[destinations.{ae}]\nhost = "{host}"\nport = {port}\nae_title = "{called}"\n')
        elif key == "default_destination":
            host, port, called = value
            tables.append(f'[default_destination]\nhost = "{host}"\nport = {port}\nae_title = "{called}"\n')
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n\n" + "\n".join(tables))
    return path


def new_plan_revision(source: Path, out: Path, *, label: str | None = None) -> str:
    """A copy of a plan with a new SOP Instance UID (same structure set reference): a new plan revision, or
    with ``label`` a different plan on the same structure set. Returns the new SOP Instance UID."""
    ds = pydicom.dcmread(source)
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    if label is not None:
        ds.RTPlanLabel = label
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return uid


def shuffled_batches(files: list[Path], batches: int, seed: int) -> list[list[Path]]:
    order = list(files)
    random.Random(seed).shuffle(order)
    return [order[i::batches] for i in range(batches)]


def index_rows(data_dir: Path, sql: str, params: tuple = ()) -> list[dict]:
    conn = sqlite3.connect(data_dir / "index.sqlite", timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, params).fetchall()]
    except sqlite3.OperationalError:
        return []  # the node has not created the tables yet
    finally:
        conn.close()


def status_json(data_dir: Path) -> dict:
    from conftest import rtqa_command

    out = subprocess.run([*rtqa_command(), "status", "--data-dir", str(data_dir), "--json"], capture_output=True,
                         text=True, timeout=60, check=True)
    return json.loads(out.stdout)
