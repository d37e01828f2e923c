"""Durable storage: published files (``files``), the SQLite index (``index``), the ingest logic (``store``)."""

from rtqa_node.store.store import Arrival, IngestResult, Outcome, Refusal, Store, StoreRefused

__all__ = ["Arrival", "IngestResult", "Outcome", "Refusal", "Store", "StoreRefused"]
