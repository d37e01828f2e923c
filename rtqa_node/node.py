"""``rtqa serve``: the node process. Recovers the store, starts the SCP (and workers), runs until signalled."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading

from rtqa_node.assemble import Assembler
from rtqa_node.config import Settings
from rtqa_node.dicom.scp import StorageScp
from rtqa_node.store import Store
from rtqa_node.store.files import fsync_dir
from rtqa_node.worker import WorkerPool

log = logging.getLogger(__name__)


def open_store(settings: Settings) -> Store:
    return Store(
        settings.data_dir,
        max_object_bytes=settings.max_object_bytes,
        min_free_bytes=settings.min_free_bytes,
    )


def write_node_file(settings: Settings, port: int) -> None:
    """``<data_dir>/node.json``: pid, port and AE title of the running node, for scripts and tests."""
    path = settings.data_dir / "node.json"
    temp = path.with_suffix(".json.tmp")
    temp.write_text(json.dumps({"pid": os.getpid(), "port": port, "ae_title": settings.ae_title}))
    os.replace(temp, path)
    fsync_dir(settings.data_dir)


def serve(settings: Settings) -> int:
    store = open_store(settings)
    report = store.recover()
    log.info("store_opened", extra={"data_dir": str(settings.data_dir), **report_fields(report)})
    # assembly after every durable ingest; start() re-evaluates every plan study and re-arms the timers
    assembler = Assembler(settings.index_path, stable_age_s=settings.stable_age_s,
                          job_max_attempts=settings.job_max_attempts)
    store.on_stored = assembler.notify
    assembler.start()
    workers = WorkerPool(settings, settings.workers)
    workers.start()
    scp = StorageScp(settings, store)
    scp.start()
    write_node_file(settings, scp.port)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            workers.supervise()
    finally:
        log.info("node_stopping")
        scp.stop()
        workers.stop()
        assembler.stop()
        (settings.data_dir / "node.json").unlink(missing_ok=True)
        store.close()
    return 0


def report_fields(report) -> dict:
    return {name: getattr(report, name) for name in report.__slots__}
