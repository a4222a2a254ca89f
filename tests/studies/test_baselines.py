"""The request-driven baselines answer exactly as a stateful session does; prefix reuse is exact."""

import numpy as np
import pytest

from statejax.budget import Budget
from statejax.errors import CapacityError, InputError
from statejax.serving.session import Session
from statejax.studies.baselines import PrefixCacheEngine, StatelessEngine, page_hashes
from statejax.tokenizer import ByteTokenizer

# Several chunks per context (largest chunk 64) and several pages (16).
BUDGET = Budget(cells=512, page_size=16, chunk_sizes=(16, 64), question_cells=64,
                max_new_tokens=8)
MAX_NEW = 8


def _ids(rng, n):
    return rng.integers(0, 256, size=n).astype(np.int32)


def _assert_same(answer, expected):
    np.testing.assert_array_equal(answer.tokens, expected.tokens)
    np.testing.assert_allclose(answer.first_gap, expected.first_gap, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(answer.min_gap, expected.min_gap, rtol=1e-4, atol=1e-5)
    assert answer.context_tokens == expected.context_tokens


@pytest.fixture(scope="module")
def setup(tiny):
    cfg, params = tiny
    return cfg, params, ByteTokenizer()


def test_stateless_matches_streamed_session(setup):
    cfg, params, tok = setup
    rng = np.random.default_rng(0)
    items = [_ids(rng, n) for n in (37, 90, 5, 61)]
    question = _ids(rng, 21)
    session = Session(params, cfg, BUDGET, tok)
    engine = StatelessEngine(params, cfg, BUDGET, tok)
    answers = []
    for item in items:
        session.append(item)
        expected = session.query(question, MAX_NEW)
        got = engine.query(session.tokens, question, MAX_NEW)
        _assert_same(got, expected)
        answers.append(got)
    # A shorter context after a longer one: the rewind leaves nothing behind.
    again = engine.query(items[0], question, MAX_NEW)
    np.testing.assert_array_equal(again.tokens, answers[0].tokens)
    assert again.first_gap == answers[0].first_gap


def test_prefix_cache_reuses_full_pages(setup):
    cfg, params, tok = setup
    rng = np.random.default_rng(1)
    question = _ids(rng, 30)
    old = _ids(rng, 150)
    new = np.concatenate([old, _ids(rng, 70)])
    stateless = StatelessEngine(params, cfg, BUDGET, tok)
    engine = PrefixCacheEngine(params, cfg, BUDGET, tok)

    first = engine.query(old, question, MAX_NEW)
    assert engine.last_reused_tokens == 0
    _assert_same(first, stateless.query(old, question, MAX_NEW))

    second = engine.query(new, question, MAX_NEW)
    assert engine.last_reused_tokens == (150 // 16) * 16
    _assert_same(second, stateless.query(new, question, MAX_NEW))

    changed = new.copy()
    changed[3] = (changed[3] + 1) % 256
    third = engine.query(changed, question, MAX_NEW)
    assert engine.last_reused_tokens == 0
    _assert_same(third, stateless.query(changed, question, MAX_NEW))

    # A change in a later page keeps the pages before it; the same prompt keeps all full pages.
    later = changed.copy()
    later[100] = (later[100] + 1) % 256
    _assert_same(engine.query(later, question, MAX_NEW),
                 stateless.query(later, question, MAX_NEW))
    assert engine.last_reused_tokens == (100 // 16) * 16
    engine.query(later, question, MAX_NEW)
    assert engine.last_reused_tokens == (later.size // 16) * 16


def test_page_hashes_chain():
    ids = np.arange(50, dtype=np.int32)
    hashes = page_hashes(ids, 16)
    assert len(hashes) == 3
    other = ids.copy()
    other[0] = 99
    # A change in page 0 changes every later page's hash, not only page 0's.
    assert all(a != b for a, b in zip(hashes, page_hashes(other, 16), strict=True))
    assert page_hashes(ids[:48], 16) == hashes


def test_truncate_is_checked_and_exact(setup):
    cfg, params, tok = setup
    rng = np.random.default_rng(2)
    session = Session(params, cfg, BUDGET, tok, prefix=_ids(rng, 10))
    items = [_ids(rng, 40), _ids(rng, 25)]
    session.append(items[0])
    expected = session.query(items[1][:20], MAX_NEW)
    session.append(items[1])
    for bad in (9, session.length + 1, 3.0, True):
        with pytest.raises(InputError):
            session.truncate(bad)
    session.truncate(50)
    assert session.length == 50 and session.tokens.size == 50
    _assert_same(session.query(items[1][:20], MAX_NEW), expected)


# Requests refused before any cell changes: (context, question, max_new_tokens, kwargs, error,
# message). "long" stands for a context of BUDGET.cells + 88 tokens.
_BAD_REQUESTS = {
    "long_context": ("long", "q", MAX_NEW, {}, CapacityError,
                     r"context has 600 tokens; the engine holds at most 512 \(budget.cells\)"),
    "empty_question": (None, "", MAX_NEW, {}, InputError, "empty text"),
    "long_question": (None, "q" * 65, MAX_NEW, {}, InputError,
                      r"question has 65 tokens; the branch room allows at most 64"),
    "no_new_tokens": (None, "q", 0, {}, InputError, r"max_new_tokens=0; allowed: 1\.\.8"),
    "negative_temperature": (None, "q", MAX_NEW, {"temperature": -1.0}, InputError,
                             r"temperature=-1\.0; allowed: a number in \[0, 3\.403e\+38\]"),
    "text_seed": (None, "q", MAX_NEW, {"seed": "x"}, InputError, r"seed='x'; allowed: an int"),
}


def _bad_context(kind, cached, rng):
    # A bad prompt sharing only its first 3 pages with the cached one: a prefix-cache engine
    # that cut its cache before refusing would keep 48 of the cached prompt's 176 full-page cells.
    if kind == "long":
        return np.concatenate([cached[:48], _ids(rng, BUDGET.cells + 88 - 48)])
    return np.concatenate([cached[:48], _ids(rng, 100)])


@pytest.mark.parametrize("case", list(_BAD_REQUESTS))
@pytest.mark.parametrize("engine_cls", [StatelessEngine, PrefixCacheEngine])
def test_refused_query_changes_nothing(setup, engine_cls, case):
    cfg, params, tok = setup
    rng = np.random.default_rng(3)
    cached, question = _ids(rng, 180), _ids(rng, 12)
    engine = engine_cls(params, cfg, BUDGET, tok)
    twin = engine_cls(params, cfg, BUDGET, tok)
    engine.query(cached, question, MAX_NEW)
    twin.query(cached, question, MAX_NEW)
    kind, bad_question, max_new, kwargs, error, message = _BAD_REQUESTS[case]
    with pytest.raises(error, match=message):
        engine.query(_bad_context(kind, cached, rng), bad_question, max_new, **kwargs)
    np.testing.assert_array_equal(engine.session.tokens, cached)
    if engine_cls is PrefixCacheEngine:
        assert engine.last_reused_tokens == 0
    # The next request reuses every cached full page and answers as the untouched twin.
    got = engine.query(cached, question, MAX_NEW)
    _assert_same(got, twin.query(cached, question, MAX_NEW))
    if engine_cls is PrefixCacheEngine:
        assert engine.last_reused_tokens == twin.last_reused_tokens == 176


def test_stateless_refuses_bad_context_ids_first(setup):
    cfg, params, tok = setup
    rng = np.random.default_rng(4)
    cached, question = _ids(rng, 40), _ids(rng, 12)
    engine = StatelessEngine(params, cfg, BUDGET, tok)
    engine.query(cached, question, MAX_NEW)
    for bad in (np.asarray([1, cfg.vocab_size], np.int32), np.zeros((0,), np.int32)):
        with pytest.raises(InputError):
            engine.query(bad, question, MAX_NEW)
        np.testing.assert_array_equal(engine.session.tokens, cached)


def test_prefix_cache_load_refuses_long_context_first(setup):
    cfg, params, tok = setup
    rng = np.random.default_rng(5)
    cached = _ids(rng, 180)
    engine = PrefixCacheEngine(params, cfg, BUDGET, tok)
    assert engine.load(cached) == 0
    with pytest.raises(CapacityError, match=r"context has 600 tokens; the engine holds at most "
                                            r"512 \(budget.cells\)") as info:
        engine.load(_bad_context("long", cached, rng))
    # The message names the engine's limit, not the session's overflow policy.
    assert "slide" not in str(info.value)
    np.testing.assert_array_equal(engine.session.tokens, cached)
    assert engine.last_reused_tokens == 0
    assert engine.load(cached) == 176
