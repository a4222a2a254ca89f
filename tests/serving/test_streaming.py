"""StreamingSession: concurrent ingestion and queries, sequence numbers, flash queries, errors."""

import ast
import dataclasses
import pathlib
import threading

import numpy as np
import pytest

from statejax.budget import Budget
from statejax.data.market import Bar, format_bar, synthetic_bars
from statejax.errors import CapacityError, InputError, ItemsRefusedError, SessionClosedError
from statejax.serving import items, streaming
from statejax.serving.device_lock import FifoLock
from statejax.serving.flash import FlashQuery
from statejax.serving.results import Answer, FlashEvent, confidence_from_gap
from statejax.serving.session import Session
from statejax.serving.streaming import StreamingSession
from statejax.tokenizer import ByteTokenizer

PREFIX = "You watch a market feed.\n"
QUESTION = "Last close?"
TIMEOUT = 30.0  # generous: a first call compiles


@pytest.fixture
def make(tiny):
    """Builds StreamingSessions sharing one model (conftest's session-scoped `tiny`) and one
    set of shapes, so each step compiles once per run; closes them after the test."""
    cfg, params = tiny
    made = []

    def build(cells=1024, **kw):
        # One attention window keeps the compile count (and test time) down.
        budget = Budget(cells=cells, windows=(cells,), branch_rows=(1, 4), max_new_tokens=256)
        session = Session(params, cfg, budget, ByteTokenizer(), prefix=PREFIX)
        s = StreamingSession(session, **kw)
        made.append(s)
        return s

    yield build
    for s in made:
        s.close(timeout=TIMEOUT)


def history(s: StreamingSession) -> str:
    """The data region's text (prefix stripped)."""
    text = s.session.tokenizer.decode(s.session.tokens)
    assert text.startswith(PREFIX)
    return text[len(PREFIX):]


def test_concurrent_producers_and_queries(make):
    s = make(max_batch_tokens=64)
    n_producers, n_items = 4, 25
    seqs: list[list[int]] = [[] for _ in range(n_producers)]
    query_seqs: list[int] = []
    done = threading.Event()
    start = threading.Barrier(n_producers + 1)

    def produce(p):
        start.wait()
        for i in range(n_items):
            seqs[p].append(s.push(f"p{p}-{i}\n"))

    def ask_repeatedly():
        start.wait()
        while not done.is_set() or not query_seqs:
            query_seqs.append(s.query("Q?", max_new_tokens=2).seq)

    producers = [threading.Thread(target=produce, args=(p,)) for p in range(n_producers)]
    querier = threading.Thread(target=ask_repeatedly)
    for t in [*producers, querier]:
        t.start()
    for t in producers:
        t.join(TIMEOUT)
    done.set()
    querier.join(TIMEOUT)
    s.flush(TIMEOUT)

    total = n_producers * n_items
    assert sorted(q for per in seqs for q in per) == list(range(total))
    for per in seqs:  # one producer's pushes get increasing numbers
        assert per == sorted(per)
    assert s.pushed_seq == s.ingested_seq == total - 1
    assert s.failures() == {}

    lines = history(s).splitlines()
    assert sorted(lines) == sorted(f"p{p}-{i}" for p in range(n_producers)
                                   for i in range(n_items))  # each item exactly once
    for p in range(n_producers):
        assert [ln for ln in lines if ln.startswith(f"p{p}-")] == [
            f"p{p}-{i}" for i in range(n_items)]
    # Items are ingested in sequence order.
    by_seq = {q: f"p{p}-{i}" for p in range(n_producers) for i, q in enumerate(seqs[p])}
    assert lines == [by_seq[q] for q in range(total)]

    assert query_seqs == sorted(query_seqs)
    assert all(-1 <= q <= s.ingested_seq for q in query_seqs)


def test_query_reports_seq_of_data_seen(make):
    s = make()
    assert s.query("Q?", 2).seq == -1
    bars = synthetic_bars(5, seed=3)
    for i, bar in enumerate(bars):
        assert s.push(bar) == i
    s.flush(TIMEOUT)
    r = s.query("Q?", 2)
    assert r.seq == s.ingested_seq == 4
    assert r.answer.context_tokens == s.session.length
    assert r.latency_s > 0
    assert 0.5 <= r.answer.confidence < 1.0
    assert history(s) == "".join(format_bar(b) for b in bars)


def test_confidence_is_sigmoid_of_min_gap():
    assert confidence_from_gap(0.0) == 0.5
    assert confidence_from_gap(np.log(3.0)) == pytest.approx(0.75)


def test_flash_answer_equals_fresh_query_and_reports_staleness(make):
    s = make()
    fid = s.register(QUESTION, max_new_tokens=8)
    assert s.registered() == [FlashQuery(fid, s.session.prepare(QUESTION, 8))]
    for bar in synthetic_bars(3, seed=1):
        s.push(bar)
    s.flush(TIMEOUT)

    cached = s.answer(fid)
    assert cached is not None and cached.seq == s.ingested_seq == 2
    assert cached.answer.confidence == confidence_from_gap(cached.answer.min_gap)
    fresh = s.query(QUESTION, 8)
    for key in (fid, QUESTION):
        hit = s.ask(key)
        assert hit.hit and hit.items_behind == 0 and hit.flash_id == fid and hit.seq == 2
        assert hit.answer.text == fresh.answer.text and hit.refused == 0
        np.testing.assert_array_equal(hit.answer.tokens, fresh.answer.tokens)
        assert hit.answer.min_gap == pytest.approx(fresh.answer.min_gap, abs=1e-4)

    # Ingest more while flash evaluation is held back: the cache is now 2 items behind.
    with s.flash_paused():
        s.push("more data\n")
        s.push("and more\n")
        s.flush(TIMEOUT)
        stale = s.ask(fid)
        assert stale.hit and stale.seq == 2 and stale.items_behind == 2
        refreshed = s.ask(fid, refresh_if_stale=True)
        assert not refreshed.hit and refreshed.seq == 4 and refreshed.items_behind == 0
    s.flush(TIMEOUT)  # the worker catches up once unpaused
    assert s.answer(fid).seq == 4
    assert s.ask(fid).items_behind == 0


def test_flash_evaluated_on_register_without_new_data(make):
    s = make()
    s.push("a\n")
    s.flush(TIMEOUT)
    fid = s.register(QUESTION, 4)
    s.flush(TIMEOUT)
    assert s.answer(fid).seq == 0


def test_flash_events_only_when_text_changes(make):
    s = make()
    events = s.event_queue()
    seen: list[FlashEvent] = []
    s.subscribe(seen.append)
    fid = s.register(QUESTION, max_new_tokens=6)
    s.flush(TIMEOUT)
    first = events.get(timeout=TIMEOUT)
    assert first.flash_id == fid and first.previous is None
    assert first.current == s.answer(fid)

    # One evaluation per flushed push; the event stream must be exactly the text changes.
    cached = [s.answer(fid)]
    for bar in synthetic_bars(6, seed=7):
        s.push(bar)
        s.flush(TIMEOUT)
        cached.append(s.answer(fid))
    assert [a.seq for a in cached] == list(range(-1, 6))
    expected = [(prev, cur) for prev, cur in zip(cached, cached[1:], strict=False)
                if prev.answer.text != cur.answer.text]
    got = []
    while not events.empty():
        got.append(events.get_nowait())
    assert [(e.previous, e.current) for e in got] == expected
    assert seen == [first, *got]  # callbacks and queues see the same events


def test_flash_event_carries_previous_answer_on_change(make):
    s = make()
    events = s.events(timeout=TIMEOUT)
    fid = s.register(QUESTION, max_new_tokens=4)
    s.flush(TIMEOUT)
    first = next(events)
    assert first.previous is None and first.current.answer.text == "????"  # random model echoes
    # Guarantee a different answer: zero the (tied) embedding rows of "?" and of ids the byte
    # tokenizer cannot decode, so "?" scores 0 against positive rivals. Swapped while idle.
    emb = s.session.params["embed"]["embedding"]
    s.session.params = {**s.session.params,
                        "embed": {"embedding": emb.at[ord("?")].set(0).at[259:].set(0)}}
    s.push("new data\n")
    s.flush(TIMEOUT)
    second = next(events)
    assert second.flash_id == fid and second.previous == first.current
    assert second.current == s.answer(fid) and second.current.seq == 0
    assert second.current.answer.text != "????" and s.flash_error is None


def test_raising_listener_does_not_kill_worker(make):
    s = make()

    def bad(event):
        raise RuntimeError("listener bug")

    s.subscribe(bad)
    good = s.event_queue()
    fid = s.register(QUESTION, 2)
    s.flush(TIMEOUT)
    assert good.get(timeout=TIMEOUT).flash_id == fid
    s.push("still alive\n")
    s.flush(TIMEOUT)
    assert s.ingested_seq == 0 and s.answer(fid).seq == 0


def test_events_iterator_ends_on_close(make):
    s = make()
    it = s.events(timeout=TIMEOUT)
    fid = s.register(QUESTION, 2)
    s.flush(TIMEOUT)
    s.close(TIMEOUT)
    assert [e.flash_id for e in it] == [fid]


def test_unregister_and_ask_unregistered(make):
    s = make()
    fid = s.register(QUESTION, 4)
    s.flush(TIMEOUT)
    s.unregister(fid)
    assert s.registered() == []
    with pytest.raises(InputError, match="unknown flash id"):
        s.unregister(fid)
    with pytest.raises(InputError, match="unknown flash id"):
        s.ask(fid)
    r = s.ask(QUESTION, 4)
    assert not r.hit and r.flash_id is None and r.items_behind == 0 and r.seq == -1
    assert r.answer.text == s.query(QUESTION, 4).answer.text


def test_ask_by_id_with_another_limit_is_a_fresh_query(make):
    s = make()
    fid = s.register(QUESTION, 4)
    s.push("1 2 3\n")
    s.flush(TIMEOUT)
    assert s.ask(fid).hit and s.ask(fid, 4).hit
    other = s.ask(fid, 1)  # not the registered limit: answered fresh, with that limit
    assert not other.hit and other.flash_id == fid and other.answer.tokens.size <= 1
    assert other.answer.text == s.query(QUESTION, 1).answer.text
    for bad in (0, -3, 1.5):
        with pytest.raises(InputError, match="max_new_tokens"):
            s.ask(fid, bad)
    with pytest.raises(InputError, match="temperature"):
        s.query(QUESTION, 4, temperature="0.5")  # refused before queueing for the device


def test_register_bad_input_registers_nothing(make):
    s = make()
    fid = s.register(QUESTION, 1)
    before = s.registered()
    for limit in (0, 257, 1.5, True, "8"):
        with pytest.raises(InputError, match="max_new_tokens"):
            s.register(QUESTION, limit)
    with pytest.raises(InputError, match="question_cells"):
        s.register("x" * 65)
    with pytest.raises(InputError, match="empty"):
        s.register("")
    with pytest.raises(InputError, match="str"):
        s.register(b"bytes")
    assert s.registered() == before
    top = s.register(QUESTION, 256)  # the top of the allowed range
    assert [f.flash_id for f in s.registered()] == [fid, top] and top == fid + 1
    s.unregister(top)  # spares close() a 256-token evaluation


def test_push_bad_input_queues_nothing(make):
    s = make()
    s.push("ok\n")
    with pytest.raises(InputError, match="empty"):
        s.push("")
    with pytest.raises(InputError, match="high"):
        Bar(0, 10.0, 9.0, 11.0, 10.0, 5.0)
    bad_bar = Bar(0, 10.0, 11.0, 9.0, 10.0, 5.0)
    object.__setattr__(bad_bar, "high", 8.0)  # corrupted after validation
    with pytest.raises(InputError, match="high"):
        s.push(bad_bar)
    with pytest.raises(InputError):
        dataclasses.replace(bad_bar, low=12.0)
    for item in (None, 42, b"bytes", np.arange(3)):
        with pytest.raises(InputError, match="allowed: a Bar"):
            s.push(item)
    room = s.session.max_item_tokens
    assert room == 1024 - len(PREFIX)
    with pytest.raises(InputError, match=f"can never be ingested; allowed: at most {room}"):
        s.push("z" * (room + 1))  # refused at once, not a later failure
    assert s.pushed_seq == 0
    s.flush(TIMEOUT)
    assert history(s) == "ok\n" and s.failures() == {}


def test_closed_session_refuses_work(make):
    s = make()
    with s:
        s.push("x\n")
    assert s.closed and s.ingested_seq == 0  # close drained the queue
    with pytest.raises(SessionClosedError):
        s.push("y\n")
    with pytest.raises(SessionClosedError):
        s.query("Q?")
    with pytest.raises(SessionClosedError):
        s.register(QUESTION)
    assert s.pushed_seq == 0
    s.close()  # idempotent


def test_failed_append_is_reported_and_later_items_ingest(make):
    s = make(max_batch_tokens=2048)  # all three items in one chunk: exercises the retry
    room = 1024 - len(PREFIX)
    s.push("a" * (room - 100))
    s.push("b" * 200)  # does not fit
    s.push("c" * 50)  # fits
    with pytest.raises(ItemsRefusedError, match="seq 1: CapacityError") as refused:
        s.flush(TIMEOUT)
    assert list(refused.value.refused) == [1]
    failures = s.failures()
    assert list(failures) == [1] and isinstance(failures[1], CapacityError)
    assert s.session.length == 1024 - 50
    assert history(s) == "a" * (room - 100) + "c" * 50
    assert s.ingested_seq == 2
    s.push("d" * 60)  # does not fit either: reported, nothing changes
    with pytest.raises(ItemsRefusedError) as refused:
        s.flush(TIMEOUT)
    assert list(refused.value.refused) == [3]  # each refusal is raised once
    assert list(s.failures()) == [1, 3] and s.session.length == 1024 - 50
    assert s.ingested_seq == 2


def test_constructor_rejects_bad_options(make):
    s = make()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InputError, match="max_batch_tokens"):
            StreamingSession(s.session, max_batch_tokens=bad)
    with pytest.raises(InputError, match="Session"):
        StreamingSession(object())


def test_flush_times_out_while_the_device_is_busy(make):
    s = make()
    with s._device:  # hold the device stream: nothing can be ingested
        s.push("x\n")
        with pytest.raises(TimeoutError, match="flush timed out"):
            s.flush(0.05)
        assert s.ingested_seq == -1
    s.flush(TIMEOUT)
    assert s.ingested_seq == 0


@pytest.mark.parametrize("served_when_interrupted", [False, True])
def test_device_lock_survives_an_interrupted_waiter(served_when_interrupted):
    """A waiter interrupted (Ctrl-C in a notebook during `query`) gives its turn up: later
    holders still get the lock, in order, whether its turn had come or not."""
    lock = FifoLock()
    holding, release = threading.Event(), threading.Event()

    def hold():
        with lock:
            holding.set()
            release.wait(TIMEOUT)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(TIMEOUT)
    real_wait = lock._cv.wait

    def interrupted_wait(timeout=None):
        if served_when_interrupted:  # the holder leaves, then the interrupt lands
            release.set()
            lock._cv.release()
            holder.join(TIMEOUT)
            lock._cv.acquire()
        raise KeyboardInterrupt

    lock._cv.wait = interrupted_wait
    with pytest.raises(KeyboardInterrupt):
        lock.__enter__()
    lock._cv.wait = real_wait
    order = []
    later = [threading.Thread(target=lambda i=i: (lock.__enter__(), order.append(i),
                                                  lock.__exit__(None, None, None)))
             for i in range(2)]
    later[0].start()
    later[0].join(0.2)  # in the queue (or through, if the lock was free) before the second
    later[1].start()
    release.set()
    for t in (holder, *later):
        t.join(TIMEOUT)
    assert order == [0, 1]
    assert lock._serving == lock._next_ticket and not lock._abandoned


def test_defaults_fit_a_small_budget_and_misspelled_options_fail_first(tiny):
    cfg, params = tiny
    budget = Budget(cells=256, windows=(256,), branch_rows=(1,), max_new_tokens=4)
    s = StreamingSession(Session(params, cfg, budget, ByteTokenizer(), prefix=PREFIX))
    try:
        fid = s.register(QUESTION)  # the default limit: 4 here, not 32
        assert s.registered()[0].question.max_new_tokens == 4
        s.flush(TIMEOUT)
        assert s.ask(fid).hit and s.query(QUESTION).answer.text == s.ask(QUESTION).answer.text
        with pytest.raises(TypeError, match="temprature"):
            s.query(QUESTION, temprature=0.5)
        assert s._pending_queries == 0
    finally:
        s.close(timeout=TIMEOUT)


def test_refused_items_surface_in_flush_and_ask(make):
    """overflow="error": items past the cells are refused. flush raises with each refused
    seq and reason (once per refusal), and the cached answer, which lacks them, says so."""
    s = make()
    room = 1024 - len(PREFIX)
    s.push("a" * (room - 10))
    fid = s.register(QUESTION, 4)
    s.flush(TIMEOUT)
    length = s.session.length
    for _ in range(3):
        s.push("b" * 50)  # none fits
    with pytest.raises(ItemsRefusedError, match=r"3 pushed item\(s\) were refused") as e:
        s.flush(TIMEOUT)
    assert list(e.value.refused) == [1, 2, 3]
    assert all(isinstance(err, CapacityError) for err in e.value.refused.values())
    assert "seq 2: CapacityError: appending 50 tokens" in str(e.value)
    stale = s.ask(fid)
    assert stale.hit and stale.seq == 0 and stale.items_behind == 3 and stale.refused == 3
    s.flush(TIMEOUT)  # reported once: nothing new to raise
    assert s.session.length == length and list(s.failures()) == [1, 2, 3]
    s.push("c" * 5)  # fits
    s.flush(TIMEOUT)
    fresh = s.ask(fid)
    assert fresh.seq == 4 and fresh.items_behind == 0 and fresh.refused == 3


class _CountingTokenizer(ByteTokenizer):
    def __init__(self):
        self.calls: list[str] = []

    def encode(self, text: str) -> np.ndarray:
        self.calls.append(text)
        return super().encode(text)


def test_each_question_is_tokenised_once(tiny):
    cfg, params = tiny
    tok = _CountingTokenizer()
    budget = Budget(cells=1024, windows=(1024,), branch_rows=(1, 4), max_new_tokens=256)
    s = StreamingSession(Session(params, cfg, budget, tok, prefix=PREFIX))
    try:
        s.query(QUESTION, 2)
        assert tok.calls.count(QUESTION) == 1  # not once to check and again to answer
        fid = s.register("Registered?", 2)
        for i in range(3):
            s.push(f"{i}\n")
            s.flush(TIMEOUT)
        assert s.answer(fid).seq == 2 and tok.calls.count("Registered?") == 1
        assert not s.ask(fid, 1).hit and tok.calls.count("Registered?") == 1
    finally:
        s.close(TIMEOUT)


class _BadIdTokenizer(ByteTokenizer):
    def encode(self, text: str) -> np.ndarray:
        ids = super().encode(text)
        return np.where(ids == ord("!"), 10_000, ids)


def test_push_checks_tokenizer_ids_on_the_callers_thread(tiny):
    cfg, params = tiny
    budget = Budget(cells=1024, windows=(1024,), branch_rows=(1, 4), max_new_tokens=256)
    s = StreamingSession(Session(params, cfg, budget, _BadIdTokenizer(), prefix=PREFIX))
    try:
        with s._device:  # no device work can happen: the refusal is the caller's own
            with pytest.raises(InputError, match=r"id 10000 at position 2; allowed: ids in "
                                                 r"\[0, 259\)"):
                s.push("ok!\n")
            assert s.pushed_seq == -1
        with pytest.raises(InputError, match="id 10000 at position 1"):
            s.query("Q!", 2)
        with pytest.raises(InputError, match="id 10000 at position 0"):
            s.register("!", 2)
        s.push("ok\n")
        s.flush(TIMEOUT)
        assert s.failures() == {} and np.isfinite(s.query("Q?", 2).answer.first_gap)
    finally:
        s.close(TIMEOUT)


def test_item_encoder_replaces_the_market_default(tiny):
    cfg, params = tiny
    budget = Budget(cells=1024, windows=(1024,), branch_rows=(1, 4), max_new_tokens=256)

    def build(**kw):
        return StreamingSession(Session(params, cfg, budget, ByteTokenizer(), prefix=PREFIX),
                                **kw)

    plain = build(encode_item=items.text_item)
    reading = build(encode_item=lambda r: f"t={r['t']} v={r['v']}\n")
    odd = build(encode_item=lambda item: item.encode())
    try:
        with pytest.raises(InputError, match="allowed: a non-empty str"):
            plain.push(synthetic_bars(1, seed=0)[0])
        plain.push("text\n")
        reading.push({"t": 1, "v": 2.5})
        with pytest.raises(InputError, match="encode_item returned a bytes for a str"):
            odd.push("x")
        for s, text in ((plain, "text\n"), (reading, "t=1 v=2.5\n")):
            s.flush(TIMEOUT)
            assert history(s) == text
    finally:
        for s in (plain, reading, odd):
            s.close(TIMEOUT)
    with pytest.raises(InputError, match="encode_item"):
        build(encode_item="format_bar")
    # The streaming machinery knows no item domain: the market encoder is wired in items.py.
    tree = ast.parse(pathlib.Path(streaming.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(m.startswith("statejax.data") for m in imported), imported


def test_results_compose_an_answer_and_print_readably(make):
    s = make()
    for bar in synthetic_bars(3, seed=0):
        s.push(bar)
    fid = s.register(QUESTION, 4)
    s.flush(TIMEOUT)
    queried = s.query(QUESTION, 4)
    assert [f.name for f in dataclasses.fields(queried)] == ["answer", "seq", "latency_s"]
    assert isinstance(queried.answer, Answer) and s.answer(fid).answer == s.ask(fid).answer
    shown = repr(s.ask(fid))
    assert shown.startswith("FlashResult(answer=Answer(text='") and "array(" not in shown
    for part in ("hit=True", "items_behind=0", "seq=2", "refused=0", "confidence=",
                 "tokens=<4 ids>"):
        assert part in shown, shown
