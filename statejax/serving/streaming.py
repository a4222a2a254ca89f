"""Data plane / query plane around one `Session`, and flash queries.

`StreamingSession` lets any number of threads push items (OHLCV bars or text) and ask questions
at the same time. The two planes meet only at the device:

- **Data plane.** `push` validates and tokenises an item on the caller's thread, gives it the next
  sequence number and puts it on a host queue; it never waits for device work. One worker thread
  drains the queue in adaptive chunks (every pending item, up to `max_batch_tokens` tokens, at
  least one item) and appends each chunk to the session with a single `Session.append` call.
- **Query plane.** `query` answers from the cells as they are now; it never waits for queued
  items, and reports `seq`, the newest item its answer saw.
- **Flash queries.** Registered questions are re-evaluated together (`Session.query_batch`) after
  ingestion, in idle time, and cached; `ask` answers a registered question from the cache with
  no device work, and listeners hear of every change of an answer's text.

Threading. All device work (append, query, flash evaluation) is serialised by one FIFO lock, the
single device stream, so a waiting user query is served before the worker's next append. Host
bookkeeping (queue, counters, registry, cache) sits behind a second lock that is never held
during device work. The worker evaluates flash queries only when no user query is pending and
the ingest queue is empty (`flash_idle_only=True`), so flash work never delays a user.

Failures. A chunk that `Session.append` refuses (e.g. `CapacityError` under overflow="error")
is retried item by item; each item that still fails is recorded in `failures()` under its
sequence number, the session is left as it was (`Session.append` guarantees this), and later
items go on. Nothing is dropped silently.

Item boundaries. A chunk enters the session as one item, so the "slide" overflow policy, which
cuts only at item boundaries, drops or keeps the items of one chunk together.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np

from statejax.data.market import Bar, format_bar
from statejax.errors import InputError, SessionClosedError
from statejax.serving.flash import (
    FlashAnswer,
    FlashEvent,
    FlashQuery,
    FlashResult,
    QueryResult,
    confidence_from_gap,
)
from statejax.serving.session import Answer, Session

logger = logging.getLogger(__name__)


class _FifoLock:
    """A non-reentrant lock granted in request order (ticket lock).

    `threading.Lock` lets a releasing thread take the lock straight back, so a worker looping on
    appends could starve a user query; tickets make each waiter wait at most for the holders
    that asked before it.
    """

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


class StreamingSession:
    """Thread-safe host object over one `Session`: async ingestion, queries, flash queries.

    Args:
      session: the session to stream into; from now on only this object should touch it.
      max_batch_tokens: most tokens the worker appends in one chunk (it always takes at least
        one item); default: the budget's largest chunk size, one device step.
      flash_idle_only: evaluate flash queries only when the ingest queue is empty and no user
        query is pending (True), or after every ingested chunk (False).
      name: worker thread name.
    """

    def __init__(self, session: Session, *, max_batch_tokens: int | None = None,
                 flash_idle_only: bool = True, name: str = "statejax-ingest"):
        if not isinstance(session, Session):
            raise InputError(f"session must be a statejax Session; got {type(session).__name__}")
        if max_batch_tokens is None:
            max_batch_tokens = session.budget.max_chunk
        if (isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int)
                or max_batch_tokens < 1):
            raise InputError(f"max_batch_tokens={max_batch_tokens!r}; allowed: an int >= 1")
        if not isinstance(flash_idle_only, bool):
            raise InputError(f"flash_idle_only={flash_idle_only!r}; allowed: True or False")
        self._session = session
        self.max_batch_tokens = max_batch_tokens
        self.flash_idle_only = flash_idle_only
        self._device = _FifoLock()
        # Guards everything below; never held during device work.
        self._cv = threading.Condition(threading.Lock())
        self._queue: collections.deque[tuple[int, np.ndarray]] = collections.deque()
        self._next_seq = 0
        self._ingested_seq = -1  # newest item in the cells
        self._processed_seq = -1  # newest item ingested or failed
        self._failures: dict[int, Exception] = {}
        self._pending_queries = 0
        self._closing = False
        self._flash: dict[int, FlashQuery] = {}
        self._flash_by_text: dict[str, list[int]] = {}  # question -> ids, so ask hits are O(1)
        self._flash_ids = itertools.count()
        self._answers: dict[int, FlashAnswer] = {}
        self._flash_dirty = False  # registry or data changed since the last evaluation
        self._flash_running = False  # an evaluation's answers are not cached yet
        self._flash_pauses = 0
        self._flash_error: Exception | None = None
        self._listeners: dict[int, Callable[[FlashEvent], None]] = {}
        self._listener_ids = itertools.count()
        self._event_queues: set[queue.Queue] = set()
        self._worker = threading.Thread(target=self._run, name=name, daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ properties

    @property
    def session(self) -> Session:
        """The wrapped `Session`. Touch it only while the worker is idle (after `flush`)."""
        return self._session

    @property
    def pushed_seq(self) -> int:
        """Sequence number of the newest pushed item (-1: none)."""
        with self._cv:
            return self._next_seq - 1

    @property
    def ingested_seq(self) -> int:
        """Sequence number of the newest item whose data is in the cells (-1: none)."""
        with self._cv:
            return self._ingested_seq

    @property
    def closed(self) -> bool:
        """True once `close` has begun."""
        with self._cv:
            return self._closing

    @property
    def flash_error(self) -> Exception | None:
        """Why the latest flash evaluation failed (answers kept from before), else None."""
        with self._cv:
            return self._flash_error

    def failures(self) -> dict[int, Exception]:
        """{seq: exception} for every pushed item the session refused; a copy."""
        with self._cv:
            return dict(self._failures)

    # ------------------------------------------------------------------ data plane

    def push(self, item: Bar | str) -> int:
        """Queues one item for ingestion; returns its sequence number (0, 1, 2, ...).

        Never waits for device work. The item is validated here, so bad input raises at once
        and nothing is queued.

        Args:
          item: a `Bar` (serialised with `format_bar`) or non-empty text.

        Raises:
          InputError: not a Bar or str, an invalid Bar, empty text, an item longer than the
            session can ever hold (`Session.max_item_tokens`).
          SessionClosedError: after `close`.
        """
        ids = self._item_ids(item)
        with self._cv:
            if self._closing:
                raise SessionClosedError("push on a closed StreamingSession; allowed: push "
                                         "before close()")
            seq = self._next_seq
            self._next_seq += 1
            self._queue.append((seq, ids))
            self._cv.notify_all()
        return seq

    def _item_ids(self, item) -> np.ndarray:
        if isinstance(item, Bar):
            item.validate()  # a Bar altered after construction must not slip through
            text = format_bar(item)
        elif isinstance(item, str):
            if not item:
                raise InputError("push got empty text; allowed: a Bar or at least one character")
            text = item
        else:
            raise InputError(f"push got a {type(item).__name__}; allowed: a Bar or a "
                             "non-empty str")
        ids = np.asarray(self._session.tokenizer.encode(text), np.int32)
        if ids.size == 0:
            raise InputError(f"text {text!r} encodes to no tokens; allowed: text with >= 1 token")
        if ids.size > (limit := self._session.max_item_tokens):
            raise InputError(f"an item of {ids.size} tokens can never be ingested; allowed: at "
                             f"most {limit} (Session.max_item_tokens, overflow="
                             f"{self._session.overflow!r})")
        return ids

    def flush(self, timeout: float | None = None) -> None:
        """Blocks until every item pushed so far is ingested (or failed) and, unless flash
        evaluation is paused, flash queries reflect it.

        Args:
          timeout: most seconds to wait; None waits for ever.

        Raises:
          TimeoutError: the wait ran out first.
          InputError: called from a listener (it would wait for itself).
        """
        if threading.current_thread() is self._worker:
            raise InputError("flush from a flash listener would deadlock; allowed: flush from "
                             "any other thread")
        with self._cv:
            target = self._next_seq - 1
            done = lambda: (self._processed_seq >= target and not self._flash_wanted()
                            and not self._flash_running)
            if not self._cv.wait_for(done, timeout):
                raise TimeoutError(
                    f"flush timed out after {timeout} s: processed seq {self._processed_seq} of "
                    f"{target}, flash pending={self._flash_wanted()}")

    def close(self, timeout: float | None = None) -> None:
        """Stops accepting pushes, drains the queue (and due flash work), stops the worker.

        Idempotent. Event queues then receive None, and `events` iterators end.
        """
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout)
        with self._cv:
            queues = list(self._event_queues)
        for q in queues:
            q.put(None)

    def __enter__(self) -> StreamingSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ query plane

    def query(self, question: str | np.ndarray, max_new_tokens: int | None = None, *,
              temperature: float = 0.0, seed: int = 0) -> QueryResult:
        """Answers a question from the cells as they are now (queued items are not awaited).

        Args:
          question: text or [Tq] token ids, 1..budget.question_cells tokens.
          max_new_tokens: 1..min(256, budget.max_new_tokens); None: as `Session.query`.
          temperature, seed: as for `Session.query`.

        Raises:
          InputError: bad question or limit. SessionClosedError: after `close`.
        """
        start = time.monotonic()
        self._check_open("query")
        # Host-side checks before queueing for the device, so bad input fails fast.
        self._session.validate_question(question)
        limit = self._session.validate_max_new_tokens(max_new_tokens)
        self._session.validate_sampling(temperature, seed)
        (a,), seq = self._device_query([question], [limit], temperature=temperature,
                                       seed=seed)
        return QueryResult(text=a.text, tokens=a.tokens, first_gap=a.first_gap,
                           min_gap=a.min_gap, context_tokens=a.context_tokens, seq=seq,
                           latency_s=time.monotonic() - start)

    def _device_query(self, questions, limits, **kw) -> tuple[list[Answer], int]:
        """Runs a user query batch on the device stream; returns (answers, seq they saw)."""
        with self._cv:
            self._pending_queries += 1
        try:
            with self._device:
                # Read under the device lock: no append can land between this and the query.
                seq = self.ingested_seq
                return self._session.query_batch(questions, limits, **kw), seq
        finally:
            with self._cv:
                self._pending_queries -= 1
                self._cv.notify_all()

    # ------------------------------------------------------------------ flash queries

    def register(self, question: str, max_new_tokens: int | None = None) -> int:
        """Registers a flash query; it is evaluated at the next idle point, then after data.

        Args:
          question: text, 1..budget.question_cells tokens.
          max_new_tokens: 1..min(256, budget.max_new_tokens); None: as `Session.query`.

        Returns:
          flash id, an int >= 0.

        Raises:
          InputError: bad question or limit (nothing is registered). SessionClosedError.
        """
        if not isinstance(question, str):
            raise InputError(f"flash question must be a str; got {type(question).__name__}")
        self._session.validate_question(question)
        limit = self._session.validate_max_new_tokens(max_new_tokens)
        with self._cv:
            if self._closing:
                raise SessionClosedError("register on a closed StreamingSession")
            flash_id = next(self._flash_ids)
            self._flash[flash_id] = FlashQuery(flash_id, question, limit)
            self._flash_by_text.setdefault(question, []).append(flash_id)
            self._flash_dirty = True
            self._cv.notify_all()
        return flash_id

    def unregister(self, flash_id: int) -> None:
        """Removes a flash query and its cached answer. Unknown id -> InputError."""
        with self._cv:
            if flash_id not in self._flash:
                raise InputError(f"unknown flash id {flash_id!r}; registered: "
                                 f"{sorted(self._flash)}")
            question = self._flash.pop(flash_id).question
            self._flash_by_text[question].remove(flash_id)
            if not self._flash_by_text[question]:
                del self._flash_by_text[question]
            self._answers.pop(flash_id, None)

    def registered(self) -> list[FlashQuery]:
        """Registered flash queries, in id order."""
        with self._cv:
            return [self._flash[i] for i in sorted(self._flash)]

    def answer(self, flash_id: int) -> FlashAnswer | None:
        """The cached answer of a flash query, or None before its first evaluation."""
        with self._cv:
            if flash_id not in self._flash:
                raise InputError(f"unknown flash id {flash_id!r}; registered: "
                                 f"{sorted(self._flash)}")
            return self._answers.get(flash_id)

    def ask(self, question_or_id: str | int, max_new_tokens: int | None = None, *,
            refresh_if_stale: bool = False) -> FlashResult:
        """Answers from the flash cache when it can, else with a fresh (greedy) query.

        A hit needs a registered question (by flash id or identical text, and, if given, the
        same max_new_tokens) with a cached answer; it costs a dict lookup. Fresh answers do not
        update the cache (only the worker writes it, so events stay ordered).

        Args:
          question_or_id: a flash id, or question text.
          max_new_tokens: limit for a fresh query; default the registered one, else as
            `Session.query`.
          refresh_if_stale: run a fresh query when the cached answer is items_behind > 0.

        Raises:
          InputError: unknown flash id, bad question or limit. SessionClosedError.
        """
        start = time.monotonic()
        is_id = isinstance(question_or_id, int | np.integer) and not isinstance(
            question_or_id, bool)
        if not is_id and not isinstance(question_or_id, str):
            raise InputError(f"ask needs a flash id or question text; got "
                             f"{type(question_or_id).__name__}")
        if max_new_tokens is not None:
            self._session.validate_max_new_tokens(max_new_tokens)
        with self._cv:
            if self._closing:
                raise SessionClosedError("ask on a closed StreamingSession")
            entry = self._find_flash(question_or_id, is_id, max_new_tokens)
            # Another limit than the registered one is another question: no hit.
            cached = (self._answers.get(entry.flash_id) if entry and max_new_tokens in (
                None, entry.max_new_tokens) else None)
            ingested = self._ingested_seq
        if cached is not None and not (refresh_if_stale and ingested > cached.seq):
            return FlashResult(
                text=cached.text, tokens=cached.tokens, first_gap=cached.first_gap,
                min_gap=cached.min_gap, confidence=cached.confidence,
                context_tokens=cached.context_tokens, seq=cached.seq,
                items_behind=ingested - cached.seq, hit=True, flash_id=cached.flash_id,
                latency_s=time.monotonic() - start)
        question = entry.question if entry else question_or_id
        if max_new_tokens is None and entry:
            max_new_tokens = entry.max_new_tokens
        fresh = self.query(question, max_new_tokens)
        return FlashResult(
            text=fresh.text, tokens=fresh.tokens, first_gap=fresh.first_gap,
            min_gap=fresh.min_gap, confidence=fresh.confidence,
            context_tokens=fresh.context_tokens, seq=fresh.seq, items_behind=0, hit=False,
            flash_id=entry.flash_id if entry else None, latency_s=time.monotonic() - start)

    def _find_flash(self, key, is_id: bool, max_new_tokens) -> FlashQuery | None:
        if is_id:
            if key not in self._flash:
                raise InputError(f"unknown flash id {key!r}; registered: {sorted(self._flash)}")
            return self._flash[key]
        for i in self._flash_by_text.get(key, ()):
            if max_new_tokens in (None, self._flash[i].max_new_tokens):
                return self._flash[i]
        return None

    @contextlib.contextmanager
    def flash_paused(self) -> Iterator[None]:
        """Suspends flash evaluation inside the block (ingestion goes on); for staleness
        studies and tests. `flush` then waits for ingestion only."""
        with self._cv:
            self._flash_pauses += 1
        try:
            yield
        finally:
            with self._cv:
                self._flash_pauses -= 1
                self._cv.notify_all()

    # ------------------------------------------------------------------ listeners

    def subscribe(self, callback: Callable[[FlashEvent], None]) -> Callable[[], None]:
        """Calls `callback(event)` on the worker thread for every `FlashEvent`.

        Callbacks must be quick (they delay ingestion); one that raises is logged and kept.

        Returns:
          unsubscribe(), which removes the callback (idempotent).
        """
        if not callable(callback):
            raise InputError(f"callback must be callable; got {type(callback).__name__}")
        with self._cv:
            key = next(self._listener_ids)
            self._listeners[key] = callback

        def unsubscribe():
            with self._cv:
                self._listeners.pop(key, None)
        return unsubscribe

    def event_queue(self) -> queue.Queue:
        """A new unbounded queue that receives every later `FlashEvent`, and None on close."""
        q: queue.Queue = queue.Queue()
        with self._cv:
            self._event_queues.add(q)
            if self._closing and not self._worker.is_alive():
                q.put(None)
        return q

    def events(self, timeout: float | None = None) -> Iterator[FlashEvent]:
        """Iterates over later `FlashEvent`s; ends on close or after `timeout` s without one.

        Subscribes at the call (not at the first `next`), so no event after the call is missed.
        """
        q = self.event_queue()

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
                with self._cv:
                    self._event_queues.discard(q)
        return drain()

    def _emit(self, events: list[FlashEvent]) -> None:
        with self._cv:
            callbacks = list(self._listeners.values())
            queues = list(self._event_queues)
        for event in events:
            for q in queues:
                q.put(event)
            for callback in callbacks:
                try:
                    callback(event)
                except Exception:
                    logger.exception("flash listener %r raised on %r; kept", callback, event)

    # ------------------------------------------------------------------ worker

    def _check_open(self, what: str) -> None:
        with self._cv:
            if self._closing:
                raise SessionClosedError(f"{what} on a closed StreamingSession")

    def _flash_wanted(self) -> bool:
        """Flash work is owed (caller holds _cv)."""
        return bool(self._flash) and self._flash_dirty and not self._flash_pauses

    def _flash_due(self) -> bool:
        """Flash work is owed and may run now (caller holds _cv)."""
        if not self._flash_wanted():
            return False
        return not self.flash_idle_only or (not self._queue and not self._pending_queries)

    def _run(self) -> None:
        while True:
            with self._cv:
                while True:
                    if self._flash_due():
                        batch = None
                        break
                    if self._queue:
                        batch = self._take_batch()
                        break
                    if self._closing:
                        self._cv.notify_all()
                        return
                    self._cv.wait()
            try:
                if batch is None:
                    self._evaluate_flash()
                else:
                    self._ingest(batch)
            except Exception:  # the worker must outlive any one bad step
                logger.exception("streaming worker step failed")

    def _take_batch(self) -> list[tuple[int, np.ndarray]]:
        """Pops pending items up to max_batch_tokens tokens, at least one (caller holds _cv)."""
        batch = [self._queue.popleft()]
        total = batch[0][1].size
        while self._queue and total + self._queue[0][1].size <= self.max_batch_tokens:
            item = self._queue.popleft()
            batch.append(item)
            total += item[1].size
        return batch

    def _ingest(self, batch: list[tuple[int, np.ndarray]]) -> None:
        ok: list[int] = []
        failed: dict[int, Exception] = {}
        with self._device:
            try:
                self._session.append(np.concatenate([ids for _, ids in batch]))
                ok = [seq for seq, _ in batch]
            except Exception as e:
                if len(batch) == 1:
                    failed[batch[0][0]] = e
                else:
                    # Find exactly which items do not fit; refusals cost no device work.
                    for seq, ids in batch:
                        try:
                            self._session.append(ids)
                            ok.append(seq)
                        except Exception as item_error:
                            failed[seq] = item_error
            # Publish while still holding the device, so a query sees cells and seq together.
            with self._cv:
                if ok:
                    self._ingested_seq = ok[-1]
                    self._flash_dirty = True
                self._processed_seq = batch[-1][0]
                self._failures.update(failed)
                self._cv.notify_all()
        for seq, e in failed.items():
            logger.warning("item seq=%d was not ingested: %s", seq, e)

    def _evaluate_flash(self) -> None:
        with self._device:
            with self._cv:
                if not self._flash_due():  # a query or an unregister came in meanwhile
                    return
                entries = [self._flash[i] for i in sorted(self._flash)]
                seq = self._ingested_seq
                self._flash_dirty = False
                self._flash_running = True
            try:
                answers = self._session.query_batch([e.question for e in entries],
                                                    [e.max_new_tokens for e in entries])
            except Exception as e:
                logger.exception("flash evaluation failed; retried after the next data")
                with self._cv:
                    self._flash_error = e
                    self._flash_running = False
                    self._cv.notify_all()
                return
        now = time.monotonic()
        events = []
        with self._cv:
            for entry, a in zip(entries, answers, strict=True):
                if entry.flash_id not in self._flash:  # unregistered during evaluation
                    continue
                current = FlashAnswer(
                    flash_id=entry.flash_id, question=entry.question, text=a.text,
                    tokens=a.tokens, first_gap=a.first_gap, min_gap=a.min_gap,
                    confidence=confidence_from_gap(a.min_gap),
                    context_tokens=a.context_tokens, seq=seq, evaluated_at=now)
                previous = self._answers.get(entry.flash_id)
                self._answers[entry.flash_id] = current
                if previous is None or previous.text != current.text:
                    events.append(FlashEvent(entry.flash_id, previous, current))
            self._flash_error = None
        try:
            self._emit(events)
        finally:
            # Cleared only after delivery: once flush returns, listeners have the events.
            with self._cv:
                self._flash_running = False
                self._cv.notify_all()
