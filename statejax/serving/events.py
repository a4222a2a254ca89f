"""Fan-out of flash events to listeners (callbacks) and event queues."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterator

from statejax.errors import InputError
from statejax.serving.results import FlashEvent

logger = logging.getLogger(__name__)


class EventFanout:
    """Delivers each event to every callback and every queue; thread-safe.

    After `close`, queues receive None (and new queues get it at once), so iterators end.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._callbacks: dict[int, Callable[[FlashEvent], None]] = {}
        self._keys = itertools.count()
        self._queues: set[queue.Queue] = set()
        self._closed = False

    def subscribe(self, callback: Callable[[FlashEvent], None]) -> Callable[[], None]:
        """Adds `callback(event)`; returns unsubscribe(), which removes it (idempotent)."""
        if not callable(callback):
            raise InputError(f"callback must be callable; got {type(callback).__name__}")
        with self._lock:
            key = next(self._keys)
            self._callbacks[key] = callback

        def unsubscribe():
            with self._lock:
                self._callbacks.pop(key, None)
        return unsubscribe

    def new_queue(self) -> queue.Queue:
        """A new unbounded queue that receives every later event, and None on close."""
        q: queue.Queue = queue.Queue()
        with self._lock:
            self._queues.add(q)
            if self._closed:
                q.put(None)
        return q

    def iterate(self, timeout: float | None = None) -> Iterator[FlashEvent]:
        """Later events, from a queue made at the call; ends on close or after `timeout` s
        without one."""
        q = self.new_queue()

        def drain():
            try:
                while True:
                    try:
                        event = q.get(timeout=timeout)
                    except queue.Empty:
                        return
                    if event is None:
                        return
                    yield event
            finally:
                with self._lock:
                    self._queues.discard(q)
        return drain()

    def emit(self, events: list[FlashEvent]) -> None:
        """Delivers events in order; a callback that raises is logged and kept."""
        with self._lock:
            callbacks = list(self._callbacks.values())
            queues = list(self._queues)
        for event in events:
            for q in queues:
                q.put(event)
            for callback in callbacks:
                try:
                    callback(event)
                except Exception:
                    logger.exception("flash listener %r raised on %r; kept", callback, event)

    def close(self) -> None:
        """Ends every queue (None); idempotent."""
        with self._lock:
            self._closed = True
            queues = list(self._queues)
        for q in queues:
            q.put(None)
