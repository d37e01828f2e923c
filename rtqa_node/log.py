"""Logging: JSON lines on stderr (stdout is reserved for ``--json`` output), and helpers that keep PHI out.

Modules log with ``logging.getLogger(__name__)`` and an event name as the message, structured ids in
``extra=``. Only the CLI calls :func:`configure`. UIDs are logged through :func:`uid_ref` (a short hash),
never raw; patient names, IDs and birth dates are never logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time

_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def uid_ref(uid: object) -> str:
    """A stable, non-reversible 12-hex-digit reference to a UID, for logs and messages."""
    return hashlib.sha256(str(uid).encode("ascii", "replace")).hexdigest()[:12]


class JsonLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(level: str = "INFO") -> None:
    """Route all logging to stderr as JSON lines; quiet pynetdicom's, highdicom's and fontTools' chatter."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLineFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs every PDU at INFO and, by default, the identifiers of requests (which can hold PHI).
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # highdicom logs the UIDs of the evidence it copies (UIDs go to logs only hashed); fontTools logs every
    # glyph table it subsets when the summary PDF is written: both at INFO, neither useful to an operator
    for name in ("highdicom", "fontTools"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.getEffectiveLevel()))
    from pynetdicom import _config

    _config.LOG_REQUEST_IDENTIFIERS = False
