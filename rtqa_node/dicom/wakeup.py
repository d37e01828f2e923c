"""Event-driven wake-ups for pynetdicom's polling reactors.

pynetdicom 3 runs two threads per association, and both poll: the DUL thread sleeps ``_run_loop_delay``
(1 ms) whenever a loop found nothing to do, and the association reactor sleeps a hard-coded 1 ms per loop
(``time.sleep(0.001)`` in ``Association._run_reactor``). Every PDU therefore waits up to a millisecond for a
thread to wake, twice per C-STORE round trip, and shortening the sleeps makes two threads spin and fight for
the GIL with the thread that stores the data (PEERS.md; ``benchmarks/ingest.py``).

Here each sleep becomes a wait on the thing it is waiting for, bounded by ``max_wait_s``:

- the DUL thread waits in ``select()`` on its socket and on a pipe that is written whenever the association
  queues a primitive for it (``to_provider_queue.put``): incoming PDUs and outgoing responses wake it at once;
- the association thread waits on an Event set whenever the DUL hands it a decoded DIMSE message or a PDU.

pynetdicom looks ``time`` up in its module globals, so :func:`install` puts a clock object there whose
``sleep`` does this for the threads of an association set up by :func:`attach`, and sleeps as before for every
other caller. Nothing else in pynetdicom changes. A wait that cannot be done (socket closed, pipe gone) falls
back to a plain sleep, so the worst case is the polling behaviour bounded by ``max_wait_s``.
"""

from __future__ import annotations

import os
import select
import threading
import time as _time

from pynetdicom import association as _association
from pynetdicom import dul as _dul

_WAIT_ATTR = "_rtqa_wait"


class _Clock:
    """Stands in for the ``time`` module inside ``pynetdicom.association`` and ``pynetdicom.dul``."""

    def __init__(self, max_wait_s: float) -> None:
        self.max_wait_s = max_wait_s

    def __getattr__(self, name: str):
        return getattr(_time, name)

    def sleep(self, seconds: float) -> None:
        wait = getattr(_threading_current(), _WAIT_ATTR, None)
        if wait is None or seconds > 0.0011:
            _time.sleep(seconds)  # not a reactor loop sleep (e.g. DUL shutdown waits): as before
            return
        try:
            wait(self.max_wait_s)
        except (OSError, ValueError):
            _time.sleep(seconds)


def _threading_current():
    return threading.current_thread()


def install(max_wait_s: float) -> None:
    """Route pynetdicom's reactor sleeps through :class:`_Clock` (idempotent)."""
    clock = _Clock(max_wait_s)
    _association.time = clock
    _dul.time = clock


class _PollingClock:
    """The polling alternative (``network_wakeups = false``): the association reactor's hard-coded 1 ms sleep
    becomes ``poll_s``; the DUL's ``_run_loop_delay`` is set per connection by the SCP."""

    def __init__(self, poll_s: float) -> None:
        self.poll_s = poll_s

    def __getattr__(self, name: str):
        return getattr(_time, name)

    def sleep(self, seconds: float) -> None:
        _time.sleep(self.poll_s if seconds == 0.001 else seconds)


def install_polling(poll_s: float) -> None:
    _association.time = _PollingClock(poll_s)
    _dul.time = _time


def attach(assoc) -> None:
    """Give an association's two threads their wake-up sources. Call from ``EVT_CONN_OPEN``."""
    dul = assoc.dul
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    assoc_event = threading.Event()

    def poke_dul() -> None:
        try:
            os.write(write_fd, b"\0")
        except (BlockingIOError, OSError):
            pass  # pipe full (a wake-up is already pending) or closed (association over)

    def wrap_put(q, after) -> None:
        put = q.put

        def put_and_wake(item, *args, **kwargs):
            put(item, *args, **kwargs)
            after()

        q.put = put_and_wake

    wrap_put(dul.to_provider_queue, poke_dul)       # association -> DUL: outgoing primitives
    wrap_put(dul.to_user_queue, assoc_event.set)    # DUL -> association: ACSE PDUs (release, abort)
    wrap_put(assoc.dimse.msg_queue, assoc_event.set)  # DUL -> association: decoded DIMSE messages

    def dul_wait(timeout_s: float) -> None:
        sock = getattr(dul.socket, "socket", None)
        sources = [read_fd] if sock is None else [sock, read_fd]
        readable, _, _ = select.select(sources, [], [], timeout_s)
        if read_fd in readable:
            try:
                while os.read(read_fd, 4096):
                    pass
            except BlockingIOError:
                pass

    def assoc_wait(timeout_s: float) -> None:
        assoc_event.wait(timeout_s)
        assoc_event.clear()

    setattr(dul, _WAIT_ATTR, dul_wait)
    setattr(assoc, _WAIT_ATTR, assoc_wait)
    assoc._rtqa_wakeup_fds = (read_fd, write_fd)


def detach(assoc) -> None:
    """Close the pipe of an association that is over. Call from ``EVT_CONN_CLOSE``."""
    for thread in (assoc, getattr(assoc, "dul", None)):
        if thread is not None and hasattr(thread, _WAIT_ATTR):
            delattr(thread, _WAIT_ATTR)
    for fd in getattr(assoc, "_rtqa_wakeup_fds", ()):
        try:
            os.close(fd)
        except OSError:
            pass
    assoc._rtqa_wakeup_fds = ()
