"""Helpers to talk to a node the way real peers do: pynetdicom as an SCU sending raw file bytes, DCMTK tools."""

from __future__ import annotations

import re
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification

from conftest import peer_env


@dataclass(frozen=True)
class StoreResponse:
    status: int | None  # None: not sent (no association, no context)
    comment: str = ""


def _file_identity(path: Path):
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta and "MediaStorageSOPClassUID" in meta:
        return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
    return None


def send_files(port: int, paths: list[Path], *, calling_ae: str = "PYNETDICOM", called_ae: str = "RTQA",
               ssl_context: ssl.SSLContext | None = None) -> dict[Path, StoreResponse]:
    """Send Part 10 files unchanged (their data set bytes as stored, in their own transfer syntax), in one
    association with one presentation context per (SOP class, transfer syntax)."""
    identities = {p: _file_identity(p) for p in paths}
    pairs = sorted({i for i in identities.values() if i is not None})
    assert len(pairs) <= 128, "too many presentation contexts for one association"
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for sop_class, transfer_syntax in pairs:
        ae.add_requested_context(sop_class, [transfer_syntax])
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes, not a re-encoding by pydicom
    responses: dict[Path, StoreResponse] = {}
    try:
        tls_args = (ssl_context, None) if ssl_context is not None else None
        assoc = ae.associate("127.0.0.1", port, ae_title=called_ae, tls_args=tls_args)
        if not assoc.is_established:
            return {p: StoreResponse(None, "association not established") for p in paths}
        try:
            for path in paths:
                if identities[path] is None:
                    responses[path] = StoreResponse(None, "no file meta")
                    continue
                status = assoc.send_c_store(path)
                responses[path] = StoreResponse(
                    int(status.Status) if "Status" in status else None, str(status.get("ErrorComment", "")))
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return responses


def echo(port: int, *, calling_ae: str = "PYNETDICOM", called_ae: str = "RTQA",
         ssl_context: ssl.SSLContext | None = None):
    """C-ECHO; returns (established, rejected, status)."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.network_timeout = 20
    ae.add_requested_context(Verification)
    tls_args = (ssl_context, None) if ssl_context is not None else None
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae, tls_args=tls_args)
    if not assoc.is_established:
        return False, assoc.is_rejected, None
    status = assoc.send_c_echo()
    assoc.release()
    return True, False, int(status.Status) if "Status" in status else None


def storescu_results(output: str) -> dict[str, str]:
    """Per file sent by `storescu -v`, the response it got: 'Success' or the failure text."""
    results = {}
    for block in re.split(r"^I: Sending file: ", output, flags=re.M)[1:]:
        name, _, rest = block.partition("\n")
        match = re.search(r"Received Store Response \(([^)]*)\)", rest)
        results[name.strip()] = match.group(1) if match else "not sent"
    return results


def dcmtk(tool: str, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([tool, *args], capture_output=True, text=True, env=peer_env(), timeout=timeout_s)
