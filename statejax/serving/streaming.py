"""Data plane / query plane around one `Session`, and flash queries.

`StreamingSession` lets any number of threads push items and ask questions at the same time.
The two planes meet only at the device:

- **Data plane.** `push` encodes an item to text (its item encoder; OHLCV bars or text by
  default), tokenises it and checks every id on the caller's thread, gives it the next
  sequence number and queues it; it never waits for device work. One worker thread drains
  the queue in adaptive chunks (every pending item, up to `max_batch_tokens` tokens, at least
  one item) and appends each chunk with a single `Session.append` call.
- **Query plane.** `query` answers from the cells as they are now; it never waits for queued
  items, and reports `seq`, the newest item its answer saw.
- **Flash queries.** Registered questions (`FlashRegistry`) are re-evaluated together after
  ingestion, in idle time, and cached; `ask` answers a registered question from the cache
  with no device work, and listeners (`EventFanout`) hear of every change of an answer's text.

Threading. All device work (append, query, flash evaluation) is serialised by one `FifoLock`,
the single device stream, so a waiting user query is served before the worker's next append.
Host bookkeeping (queue, counters, registry) sits behind a second lock that is never held
during device work. The worker evaluates flash queries only when no user query is pending and
the ingest queue is empty (`flash_idle_only=True`), so flash work never delays a user.

Refusals. A chunk that `Session.append` refuses (e.g. `CapacityError` under overflow="error")
is retried item by item; each item that still fails leaves the session as it was and is
recorded under its sequence number. `flush` raises `ItemsRefusedError` for refusals it has not
reported yet, `failures()` keeps them all, and `ask` counts refused items in `items_behind`
(after the answer's seq) and `refused`. Nothing is dropped silently.

Item boundaries. A chunk enters the session as one item, so the "slide" overflow policy, which
cuts only at item boundaries, drops or keeps the items of one chunk together.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from statejax.errors import InputError, ItemsRefusedError, SessionClosedError
from statejax.serving.device_lock import FifoLock
from statejax.serving.events import EventFanout
from statejax.serving.flash import FlashQuery, FlashRegistry
from statejax.serving.items import ItemEncoder, market_item
from statejax.serving.question import Question
from statejax.serving.results import (
    Answer,
    FlashAnswer,
    FlashEvent,
    FlashResult,
    QueryResult,
)
from statejax.serving.session import Session

logger = logging.getLogger(__name__)


class StreamingSession:
    """Thread-safe host object over one `Session`: async ingestion, queries, flash queries.

    Args:
      session: the session to stream into; from now on only this object should touch it.
      encode_item: item -> non-empty text (`statejax.serving.items`); default `market_item`
        (OHLCV `Bar`s or text).
      max_batch_tokens: most tokens the worker appends in one chunk (it always takes at least
        one item); default: the budget's largest chunk size, one device step.
      flash_idle_only: evaluate flash queries only when the ingest queue is empty and no user
        query is pending (True), or after every ingested chunk (False).
      name: worker thread name.
    """

    def __init__(self, session: Session, *, encode_item: ItemEncoder = market_item,
                 max_batch_tokens: int | None = None, flash_idle_only: bool = True,
                 name: str = "statejax-ingest"):
        if not isinstance(session, Session):
            raise InputError(f"session must be a statejax Session; got {type(session).__name__}")
        if not callable(encode_item):
            raise InputError(f"encode_item={encode_item!r}; allowed: a callable item -> str "
                             "(statejax.serving.items)")
        if max_batch_tokens is None:
            max_batch_tokens = session.budget.max_chunk
        if (isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int)
                or max_batch_tokens < 1):
            raise InputError(f"max_batch_tokens={max_batch_tokens!r}; allowed: an int >= 1")
        if not isinstance(flash_idle_only, bool):
            raise InputError(f"flash_idle_only={flash_idle_only!r}; allowed: True or False")
        self._session = session
        self.encode_item = encode_item
        self.max_batch_tokens = max_batch_tokens
        self.flash_idle_only = flash_idle_only
        self._device = FifoLock()
        self._events = EventFanout()
        # Guards everything below; never held during device work.
        self._cv = threading.Condition(threading.Lock())
        self._queue: collections.deque[tuple[int, np.ndarray]] = collections.deque()
        self._next_seq = 0
        self._ingested_seq = -1  # newest item in the cells
        self._processed_seq = -1  # newest item ingested or refused
        self._failures: dict[int, Exception] = {}
        self._unreported: dict[int, Exception] = {}  # refusals no flush has raised yet
        self._pending_queries = 0
        self._closing = False
        self._flash = FlashRegistry()
        self._flash_running = False  # an evaluation's answers are not cached yet
        self._flash_pauses = 0
        self._flash_error: Exception | None = None
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

    def push(self, item: Any) -> int:
        """Queues one item for ingestion; returns its sequence number (0, 1, 2, ...).

        Never waits for device work. The item is encoded, tokenised and every id checked
        here, so bad input raises at once and nothing is queued.

        Args:
          item: what `encode_item` takes (by default a `Bar`, serialised with `format_bar`,
            or non-empty text).

        Raises:
          InputError: an item the encoder refuses, text of no tokens, an id the tokenizer
            returns outside [0, V), an item longer than the session can ever hold
            (`Session.max_item_tokens`).
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
        """Item -> [N] int32 ids, N >= 1, checked against the vocabulary and the cells."""
        text = self.encode_item(item)
        if not isinstance(text, str):
            raise InputError(f"encode_item returned a {type(text).__name__} for a "
                             f"{type(item).__name__}; allowed: a non-empty str")
        ids = self._session.encode(text)
        if ids.size > (limit := self._session.max_item_tokens):
            raise InputError(f"an item of {ids.size} tokens can never be ingested; allowed: at "
                             f"most {limit} (Session.max_item_tokens, overflow="
                             f"{self._session.overflow!r})")
        return ids

    def flush(self, timeout: float | None = None) -> None:
        """Blocks until every item pushed so far is ingested (or refused) and, unless flash
        evaluation is paused, flash queries reflect it.

        Args:
          timeout: most seconds to wait; None waits for ever.

        Raises:
          ItemsRefusedError: items up to then were refused that no earlier `flush` reported
            (each refusal is raised once; `failures()` keeps them all). The wait is complete.
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
            refused = {seq: e for seq, e in self._unreported.items() if seq <= target}
            for seq in refused:
                del self._unreported[seq]
        if refused:
            raise ItemsRefusedError(refused)

    def close(self, timeout: float | None = None) -> None:
        """Stops accepting pushes, drains the queue (and due flash work), stops the worker.

        Idempotent; raises nothing for refused items (see `failures`). Event queues then
        receive None, and `events` iterators end.
        """
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout)
        self._events.close()

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
        # Checked and tokenised here, once, so bad input fails before waiting for the device.
        prepared = self._session.prepare(question, max_new_tokens)
        self._session.validate_sampling(temperature, seed)
        a, seq, _ = self._device_query(prepared, temperature=temperature, seed=seed)
        return QueryResult(answer=a, seq=seq, latency_s=time.monotonic() - start)

    def _device_query(self, question: Question, **sampling) -> tuple[Answer, int, int]:
        """Runs a user query on the device stream; returns (answer, seq it saw, newest
        processed seq then)."""
        with self._cv:
            self._pending_queries += 1
        try:
            with self._device:
                # Read under the device lock: no append can land between this and the query.
                with self._cv:
                    seq, processed = self._ingested_seq, self._processed_seq
                return self._session.answer([question], **sampling)[0], seq, processed
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
        prepared = self._session.prepare(question, max_new_tokens)
        with self._cv:
            if self._closing:
                raise SessionClosedError("register on a closed StreamingSession")
            flash_id = self._flash.add(prepared).flash_id
            self._cv.notify_all()
        return flash_id

    def unregister(self, flash_id: int) -> None:
        """Removes a flash query and its cached answer. Unknown id -> InputError."""
        with self._cv:
            self._flash.remove(flash_id)

    def registered(self) -> list[FlashQuery]:
        """Registered flash queries, in id order."""
        with self._cv:
            return self._flash.entries()

    def answer(self, flash_id: int) -> FlashAnswer | None:
        """The cached answer of a flash query, or None before its first evaluation."""
        with self._cv:
            return self._flash.answer(flash_id)

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
          refresh_if_stale: run a fresh query when items were ingested after the cached
            answer's seq.

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
            max_new_tokens = self._session.validate_max_new_tokens(max_new_tokens)
        with self._cv:
            if self._closing:
                raise SessionClosedError("ask on a closed StreamingSession")
            entry = (self._flash.get(question_or_id) if is_id
                     else self._flash.find(question_or_id, max_new_tokens))
            # Another limit than the registered one is another question: no hit.
            same_limit = entry and max_new_tokens in (None, entry.question.max_new_tokens)
            cached = self._flash.answer(entry.flash_id) if same_limit else None
            ingested, processed = self._ingested_seq, self._processed_seq
            refused = len(self._failures)
        if cached is not None and not (refresh_if_stale and ingested > cached.seq):
            return FlashResult(answer=cached.answer, seq=cached.seq,
                               items_behind=processed - cached.seq, refused=refused, hit=True,
                               flash_id=cached.flash_id, latency_s=time.monotonic() - start)
        self._check_open("ask")
        if entry is None:
            question = self._session.prepare(question_or_id, max_new_tokens)
        elif max_new_tokens is None:
            question = entry.question
        else:  # the registered ids, another (checked) limit
            question = dataclasses.replace(entry.question, max_new_tokens=max_new_tokens)
        a, seq, processed = self._device_query(question)
        with self._cv:
            refused = len(self._failures)
        return FlashResult(answer=a, seq=seq, items_behind=processed - seq, refused=refused,
                           hit=False, flash_id=entry.flash_id if entry else None,
                           latency_s=time.monotonic() - start)

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
        return self._events.subscribe(callback)

    def event_queue(self) -> queue.Queue:
        """A new unbounded queue that receives every later `FlashEvent`, and None on close."""
        return self._events.new_queue()

    def events(self, timeout: float | None = None) -> Iterator[FlashEvent]:
        """Iterates over later `FlashEvent`s; ends on close or after `timeout` s without one.

        Subscribes at the call (not at the first `next`), so no event after the call is missed.
        """
        return self._events.iterate(timeout)

    # ------------------------------------------------------------------ worker

    def _check_open(self, what: str) -> None:
        with self._cv:
            if self._closing:
                raise SessionClosedError(f"{what} on a closed StreamingSession")

    def _flash_wanted(self) -> bool:
        """Flash work is owed (caller holds _cv)."""
        return bool(self._flash) and self._flash.dirty and not self._flash_pauses

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
                    self._flash.dirty = True
                self._processed_seq = batch[-1][0]
                self._failures.update(failed)
                self._unreported.update(failed)
                self._cv.notify_all()
        for seq, e in failed.items():
            logger.warning("item seq=%d was not ingested: %s", seq, e)

    def _evaluate_flash(self) -> None:
        with self._device:
            with self._cv:
                if not self._flash_due():  # a query or an unregister came in meanwhile
                    return
                entries = self._flash.entries()
                seq = self._ingested_seq
                self._flash.dirty = False
                self._flash_running = True
            try:
                answers = self._session.answer([e.question for e in entries])
            except Exception as e:
                logger.exception("flash evaluation failed; retried after the next data")
                with self._cv:
                    self._flash_error = e
                    self._flash_running = False
                    self._cv.notify_all()
                return
        now = time.monotonic()
        with self._cv:
            events = [event for entry, a in zip(entries, answers, strict=True)
                      if (event := self._flash.store(FlashAnswer(entry.flash_id, a, seq, now)))]
            self._flash_error = None
        try:
            self._events.emit(events)
        finally:
            # Cleared only after delivery: once flush returns, listeners have the events.
            with self._cv:
                self._flash_running = False
                self._cv.notify_all()
