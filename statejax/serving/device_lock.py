"""The device stream as a lock granted in request order (a ticket lock).

`threading.Lock` lets a releasing thread take the lock straight back, so a worker looping on
appends could starve a user query; tickets make each waiter wait at most for the holders
that asked before it.
"""

import threading


class FifoLock:
    """A non-reentrant lock granted in request order; use it as a context manager."""

    def __init__(self):
        self._cv = threading.Condition(threading.Lock())
        self._next_ticket = 0
        self._serving = 0
        self._abandoned = set()  # tickets whose waiter left (e.g. KeyboardInterrupt)

    def __enter__(self):
        with self._cv:
            ticket = None
            try:
                ticket = self._next_ticket
                self._next_ticket = ticket + 1
                while ticket != self._serving:
                    self._cv.wait()
            except BaseException:
                # An interrupted waiter gives its turn up; unserved, its ticket would block
                # every later holder for good. (Interrupted before taking one: nothing to do.)
                if ticket is None or self._next_ticket <= ticket:
                    raise
                if ticket == self._serving:
                    self._advance()
                else:
                    self._abandoned.add(ticket)
                raise

    def __exit__(self, *exc):
        with self._cv:
            self._advance()

    def _advance(self):
        """Serves the next ticket whose waiter is still there (caller holds `_cv`)."""
        self._serving += 1
        while self._serving in self._abandoned:
            self._abandoned.remove(self._serving)
            self._serving += 1
        self._cv.notify_all()
