"""Equivalence, isolation, compile-count and bad-input tests of the session core."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from statejax import steps
from statejax.budget import Budget
from statejax.errors import CapacityError, InputError
from statejax.model.config import preset
from statejax.model.llama import init_params
from statejax.perf.query_call import QUERY_PACKED_PER_CALL_ARGS, QUERY_PACKED_SCALAR_ARGS
from statejax.serving import packing
from statejax.serving import session as session_module
from statejax.serving.session import NO_STOP, Session, generation_width
from statejax.state import init_state
from statejax.tokenizer import ByteTokenizer

TOLERANCE = {"float32": dict(atol=2e-5, rtol=2e-5), "bfloat16": dict(atol=0.15, rtol=0.05)}


def _budget(cells=512):
    return Budget(cells=cells, page_size=16, chunk_sizes=(16, 64, 256), question_cells=32,
                  max_new_tokens=16)


def _random_ids(seed, n, vocab=259):
    return np.asarray(jax.random.randint(jax.random.key(seed), (n,), 0, vocab), np.int32)


def _append_all(params, cfg, ids, splits, cells=512):
    """Appends ids split at `splits` through the raw step; returns per-token logits [N, V]."""
    state = init_state(cfg, rows=1, cells=cells)
    budget = _budget(cells)
    out = []
    for chunk in np.split(ids, splits):
        t = budget.chunk_bucket(chunk.size)
        padded = np.zeros((1, t), np.int32)
        padded[0, :chunk.size] = chunk
        window = budget.window_for(int(state.lengths[0]) + chunk.size)
        state, logits = steps.append(params, state, jnp.asarray(padded),
                                     jnp.asarray([chunk.size], jnp.int32), cfg=cfg,
                                     window=window, all_logits=True)
        out.append(np.asarray(logits[0, :chunk.size]))
    return state, np.concatenate(out)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("splits", [[], [1], [16, 32], [15, 17, 64, 65], [7, 50, 51, 100, 163]])
def test_chunked_append_equals_full_forward(dtype, splits):
    cfg = preset("tiny", dtype=dtype)
    params = init_params(cfg, seed=1)
    ids = _random_ids(len(splits) + 3, 177)
    full = np.asarray(steps.forward(params, jnp.asarray(ids)[None], cfg=cfg)[0])
    state, chunked = _append_all(params, cfg, ids, splits)
    np.testing.assert_allclose(chunked, full, **TOLERANCE[dtype])
    assert int(state.lengths[0]) == ids.size
    if splits:  # k chunks and one append leave identical cells (within rounding)
        one_state, _ = _append_all(params, cfg, ids, [])
        np.testing.assert_allclose(np.asarray(state.k[:, :, :177], np.float32),
                                   np.asarray(one_state.k[:, :, :177], np.float32),
                                   **TOLERANCE[dtype])


def test_batched_rows_of_different_lengths_match_single_rows(tiny):
    cfg, params = tiny
    state = init_state(cfg, rows=3, cells=256)
    ids = [_random_ids(s, n) for s, n in [(1, 5), (2, 64), (3, 33)]]
    tokens = np.zeros((3, 64), np.int32)
    for row, x in enumerate(ids):
        tokens[row, :x.size] = x
    num_new = jnp.asarray([x.size for x in ids], jnp.int32)
    state, logits = steps.append(params, state, jnp.asarray(tokens), num_new, cfg=cfg,
                                 window=128)
    for row, x in enumerate(ids):
        full = steps.forward(params, jnp.asarray(x)[None], cfg=cfg)[0, -1]
        np.testing.assert_allclose(logits[row], full, **TOLERANCE["float32"])
    np.testing.assert_array_equal(state.lengths, [5, 64, 33])


def _greedy_reference(params, cfg, ids, steps_n):
    seq = list(ids)
    for _ in range(steps_n):
        logits = steps.forward(params, jnp.asarray(seq, jnp.int32)[None], cfg=cfg)[0, -1]
        seq.append(int(jnp.argmax(logits[:ByteTokenizer().vocab_size])))
    return seq[len(ids):]


def test_query_matches_full_forward_greedy_and_leaves_state_bit_identical(tiny):
    cfg, params = tiny
    session = Session(params, cfg, _budget(), ByteTokenizer(), prefix="system: be brief\n")
    for i in range(5):
        session.append(f"{i} 101.5 102.31 100.98 101.77 12034\n")
    before = jax.tree.map(np.array, session.state)
    question = session.tokenizer.encode("Q: last close? A:")
    answer = session.query(question, max_new_tokens=12)
    after = jax.tree.map(np.array, session.state)
    jax.tree.map(np.testing.assert_array_equal, before, after)

    expected = _greedy_reference(params, cfg, np.concatenate([session.tokens, question]), 12)
    assert answer.tokens.tolist() == expected
    assert answer.context_tokens == session.length
    again = session.query(question, max_new_tokens=12)
    assert again.tokens.tolist() == answer.tokens.tolist()
    assert again.min_gap == answer.min_gap and again.first_gap == answer.first_gap
    assert 0 <= answer.min_gap <= answer.first_gap


def test_first_token_query_compiles_no_loop_and_answers_as_generation_does(tiny):
    cfg, params = tiny
    session = Session(params, cfg, _budget(), ByteTokenizer())
    session.append(_random_ids(3, 70))
    question = _random_ids(4, 12)
    args = (params, session.state, np.int32(0), np.zeros((1, 16), np.int32),
            np.full((1,), 12, np.int32), np.ones((1,), np.int32), np.int32(session.stop_token),
            np.float32(0.0), jax.random.key(0), np.int32(256))
    args[3][0, :12] = question
    static = dict(cfg=cfg, window=session.budget.window_for(session.length),
                  branch_cells=session.budget.branch_cells)
    first = steps.query(*args, **static, max_new_cap=1)
    looped = steps.query(*args, **static, max_new_cap=session.budget.max_new_tokens)
    np.testing.assert_array_equal(first.first_logits, looped.first_logits)
    np.testing.assert_array_equal(first.tokens[:, 0], looped.tokens[:, 0])
    np.testing.assert_array_equal(first.gaps[:, 0], looped.gaps[:, 0])
    np.testing.assert_array_equal(first.num_tokens, looped.num_tokens)
    assert first.tokens.shape == (1, 1)
    loops = [steps.query.lower(*args, **static, max_new_cap=g).as_text().count("stablehlo.while")
             for g in (1, 4)]
    assert loops[1] == loops[0] + 1  # (the PRNG's own loops are in both)
    assert generation_width([1, 1], session.budget) == 1
    assert generation_width([1, 3], session.budget) == session.budget.max_new_tokens
    # Session.query(..., 1) takes the loop-free program and agrees with a longer answer.
    assert session.query(question, 1).tokens[0] == session.query(question, 5).tokens[0]


def test_packed_query_answers_bit_for_bit_as_the_query(tiny):
    """`query_packed` (one array in, one out) is `query` on the unpacked request: tokens,
    counts and gaps (float32 bits through int32) equal, on rows that stop early, run to their
    limit and pad."""
    cfg, params = tiny
    session = Session(params, cfg, _budget(), ByteTokenizer())
    session.append(_random_ids(5, 90))
    question = np.zeros((3, 16), np.int32)
    question[0, :9], question[1, :16] = _random_ids(6, 9), _random_ids(7, 16)
    lengths, max_new = np.array([9, 16, 1], np.int32), np.array([3, 6, 0], np.int32)
    scalars = (np.int32(session.stop_token), np.float32(0.7), jax.random.key(2),
               np.int32(256))
    static = dict(cfg=cfg, window=session.budget.window_for(session.length),
                  branch_cells=session.budget.branch_cells,
                  max_new_cap=session.budget.max_new_tokens)
    gen = steps.query(params, session.state, np.int32(0), question, lengths, max_new,
                      *scalars, **static)
    request = packing.pack_question(question, lengths, max_new)
    assert request.shape == (3, 18) and request.dtype == np.int32
    answer = steps.query_packed(params, session.state, np.int32(0), request, *scalars,
                                **static)
    g = session.budget.max_new_tokens
    assert answer.shape == (3, 2 * g + 1) and answer.dtype == jnp.int32
    tokens, num, gaps = packing.unpack_answer(answer)
    assert gaps.dtype == np.float32 and tokens.shape == gaps.shape == (3, g)
    np.testing.assert_array_equal(tokens, np.asarray(gen.tokens))
    np.testing.assert_array_equal(num, np.asarray(gen.num_tokens))
    np.testing.assert_array_equal(gaps, np.asarray(gen.gaps))
    assert num[2] == 0 and 1 <= num[0] <= 3 and (gaps[:2, 0] > 0).all()


def test_pick_is_argmax_top2_gap_and_categorical_in_one_reduction():
    """`steps._pick`'s one reduction gives what argmax, top_k and categorical give: ties to
    the lower id, masked (-inf) ids never chosen, the same sample for the same key."""
    logits = jax.random.normal(jax.random.key(3), (6, 1000), jnp.float32) * 3
    logits = logits.at[1, 700].set(50.0).at[1, 20].set(50.0)  # a tie: id 20 wins
    logits = logits.at[2, :].set(-jnp.inf).at[2, 999].set(1.0).at[2, 5].set(0.5)
    logits = logits.at[3, 400:].set(-jnp.inf)  # a masked vocabulary tail
    top2 = jax.lax.top_k(logits, 2)[0]
    key = jax.random.key(11)
    greedy, gap = steps._pick(logits, jnp.float32(0.0), key)
    np.testing.assert_array_equal(greedy, jnp.argmax(logits, -1))
    np.testing.assert_array_equal(gap, top2[:, 0] - top2[:, 1])
    assert int(greedy[1]) == 20 and float(gap[1]) == 0.0 and int(greedy[2]) == 999
    for temperature in (0.7, 1.0, 3.0):
        sampled, gap_t = steps._pick(logits, jnp.float32(temperature), key)
        np.testing.assert_array_equal(
            sampled, jax.random.categorical(key, logits / temperature))
        np.testing.assert_array_equal(gap_t, gap)
        assert int(sampled[3]) < 400
    draws = [int(steps._pick(logits, jnp.float32(3.0), jax.random.key(s))[0][0])
             for s in range(8)]
    assert len(set(draws)) > 1  # a real sample, not the argmax
    # NaN ranks above all, as in argmax (an order, so any reduction tree agrees); an all-NaN
    # row picks id 0, never the reduction's identity.
    bad = logits.at[4, 77].set(jnp.nan).at[4, 900].set(jnp.nan).at[5, :].set(jnp.nan)
    greedy_bad, _ = steps._pick(bad, jnp.float32(0.0), key)
    np.testing.assert_array_equal(greedy_bad, jnp.argmax(bad, -1))
    assert (int(greedy_bad[4]), int(greedy_bad[5])) == (77, 0)
    # 16-bit logits with a float32 temperature (what Session passes).
    half = logits.astype(jnp.bfloat16)
    np.testing.assert_array_equal(steps._pick(half, jnp.float32(0.0), key)[0],
                                  jnp.argmax(half, -1))
    # Masked ids stay masked at the largest float32 temperatures (1/t flushes to 0 there:
    # -inf * 0 was a NaN, which ranks first, so a masked id was drawn).
    for temperature in (1e37, 9e37, 3.4e38):
        for s in range(4):
            sampled = steps._pick(logits, jnp.float32(temperature), jax.random.key(s))[0]
            assert int(sampled[2]) in (5, 999) and int(sampled[3]) < 400


def test_seeds_beyond_32_bits_sample_apart(tiny):
    """Every int64 seed gets its own key (jax.random.key keeps only the low 32 bits without
    x64); seeds below 2**32 keep the keys they always had."""
    cfg, params = tiny
    session = Session(params, cfg, _budget(), ByteTokenizer(), stop_token=NO_STOP)
    session.append("1 2 3\n")

    def sample(seed):
        return session.query("ok?", 8, temperature=5.0, seed=seed).tokens.tolist()

    for low in (0, 1):
        assert sample(low) != sample(low + 2**32)
    assert sample(-1) != sample(2**32 - 1)
    assert len({tuple(sample(s)) for s in (2**40, -2**40, 2**63 - 1, -2**63)}) == 4
    key_data = lambda seed: np.asarray(jax.random.key_data(session_module._rng_key(seed)))  # noqa: E731
    np.testing.assert_array_equal(key_data(7), jax.random.key_data(jax.random.key(7)))
    assert key_data(2**32 + 5).tolist() == [1, 5] and key_data(-1).tolist() == [2**32 - 1] * 2
    # No seed's key is a later branch group's key of another seed (groups fold in their start).
    assert key_data(5 + 8 * 2**32).tolist() != np.asarray(jax.random.key_data(
        jax.random.fold_in(session_module._rng_key(5), 8))).tolist()


class _WordTokenizer(ByteTokenizer):
    """Bytes, but whitespace encodes to nothing (as a word-level tokenizer's does)."""

    def encode(self, text: str) -> np.ndarray:
        return super().encode("".join(text.split()))


def test_text_that_encodes_to_no_tokens_is_refused_and_session_unchanged(tiny):
    cfg, params = tiny
    session = Session(params, cfg, _budget(), _WordTokenizer())
    session.append("1 2 3")
    snapshot = _snapshot(session)
    for call in (lambda: session.append("   "), lambda: session.query(" \n ", 4)):
        with pytest.raises(InputError, match="encodes to no tokens"):
            call()
        _assert_unchanged(session, snapshot)


def test_query_batch_equals_single_queries_and_stops_at_stop_token(tiny):
    """Batch == single queries, with no stop token (every requested token is made) and with
    a stop token one answer provably emits and the others do not (both paths stop there)."""
    cfg, params = tiny
    questions = [_random_ids(s, n) for s, n in [(8, 3), (9, 20), (10, 32)]]
    limits = [5, 16, 1]

    def batch_and_singles(stop_token):
        session = Session(params, cfg, _budget(), ByteTokenizer(), stop_token=stop_token)
        session.append(_random_ids(7, 90))
        batch = session.query_batch(questions, limits)
        for q, m, got in zip(questions, limits, batch, strict=True):
            single = session.query(q, m)
            assert got.tokens.tolist() == single.tokens.tolist()
            np.testing.assert_allclose(got.first_gap, single.first_gap, rtol=1e-5)
            np.testing.assert_allclose(got.min_gap, single.min_gap, rtol=1e-5)
        return batch

    full = batch_and_singles(NO_STOP)
    assert [a.tokens.size for a in full] == limits
    # The second answer's first token, made by neither other answer: as the stop token it
    # empties that answer and leaves the others whole, in the batch and alone.
    stop = int(full[1].tokens[0])
    assert stop not in full[0].tokens and stop not in full[2].tokens
    stopped = batch_and_singles(stop)
    assert stopped[1].tokens.size == 0
    for i in (0, 2):
        assert stopped[i].tokens.tolist() == full[i].tokens.tolist()
    # Make the greedy first token the stop token: the answer is then empty.
    first = int(full[0].tokens[0])
    stopping = Session(params, cfg, _budget(), ByteTokenizer(), stop_token=first)
    stopping.append(_random_ids(7, 90))
    assert stopping.query(questions[0], 5).tokens.size == 0


def test_query_on_empty_session_equals_full_forward(tiny):
    cfg, params = tiny
    session = Session(params, cfg, _budget(), ByteTokenizer())
    question = _random_ids(11, 9)
    assert session.query(question, 4).tokens.tolist() == _greedy_reference(params, cfg,
                                                                          question, 4)


def test_streaming_steady_state_never_recompiles(tiny):
    cfg, params = tiny
    budget = Budget(cells=2048, chunk_sizes=(16, 64), windows=(2048,), question_cells=32,
                    max_new_tokens=16)
    session = Session(params, cfg, budget, ByteTokenizer())
    rng = np.random.default_rng(0)
    session.append(_random_ids(1, 10))   # warm-up: both chunk sizes, one query shape
    session.append(_random_ids(2, 40))
    session.query("warm up?", 8)
    session.query("warm up?", 1)  # first-token queries compile without the generation loop
    compiled = (steps.append._cache_size(), steps.query._cache_size())
    for i in range(40):
        session.append(_random_ids(100 + i, int(rng.integers(1, 64))))
        if i % 10 == 0:
            session.query(f"question {i}?", int(rng.integers(1, 16)))
    assert (steps.append._cache_size(), steps.query._cache_size()) == compiled


def test_compiled_shapes_stay_within_budget(tiny):
    cfg, params = tiny
    budget = Budget(cells=512, chunk_sizes=(16, 64), question_cells=16, max_new_tokens=4)
    session = Session(params, cfg, budget, ByteTokenizer(), overflow="slide")
    append_before, query_before = steps.append._cache_size(), steps.query._cache_size()
    for i in range(60):
        session.append(_random_ids(i, 1 + (i * 7) % 40))
        session.query("q?", 1 + i % 2)
    limit = budget.compiled_shapes()
    assert steps.append._cache_size() - append_before <= limit["append"]
    assert steps.query._cache_size() - query_before <= limit["query"]
    assert session.evicted_tokens > 0


def test_slide_overflow_keeps_prefix_and_whole_recent_items(tiny):
    cfg, params = tiny
    budget = _budget(cells=256)
    prefix = "SYSTEM PROMPT\n"
    session = Session(params, cfg, budget, ByteTokenizer(), prefix=prefix, overflow="slide",
                      keep_fraction=0.5)
    items = [f"item {i:03d} 101.5 102.3\n" for i in range(20)]
    for item in items:
        session.append(item)
    text = ByteTokenizer().decode(session.tokens)
    assert text.startswith(prefix)
    kept = text[len(prefix):]
    assert kept.endswith(items[-1]) and kept.startswith("item ")
    assert kept in "".join(items)
    assert session.evicted_tokens == len("".join(items)) - len(kept)
    # The slid session equals a fresh one that saw only what it kept.
    fresh = Session(params, cfg, budget, ByteTokenizer(), prefix=prefix)
    fresh.append(kept)
    np.testing.assert_array_equal(fresh.tokens, session.tokens)
    assert fresh.query("q?", 6).tokens.tolist() == session.query("q?", 6).tokens.tolist()


def _snapshot(session):
    return session.tokens, jax.tree.map(np.array, session.state)


def _assert_unchanged(session, snapshot):
    tokens, state = snapshot
    np.testing.assert_array_equal(session.tokens, tokens)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, session.state), state)


@pytest.mark.parametrize("bad, match", [
    ("", "empty text"),
    (np.zeros((0,), np.int32), "empty"),
    (np.array([1, 2, 600]), "out of range"),
    (np.array([1, -1]), "out of range"),
    (np.array([1.0, 2.0]), "dtype float64"),
    (np.array([[1, 2]]), "1-D"),
    ("x" * 300, "overflow"),
])
def test_bad_append_is_refused_and_session_unchanged(tiny, bad, match):
    cfg, params = tiny
    session = Session(params, cfg, _budget(cells=256), ByteTokenizer(), prefix="p\n")
    session.append("1 2 3\n")
    snapshot = _snapshot(session)
    with pytest.raises(InputError, match=match):
        session.append(bad)
    _assert_unchanged(session, snapshot)


def test_capacity_exhausted_is_a_capacity_error(tiny):
    cfg, params = tiny
    session = Session(params, cfg, _budget(cells=256), ByteTokenizer())
    session.append("x" * 250)
    snapshot = _snapshot(session)
    with pytest.raises(CapacityError, match="free room: 6 tokens"):
        session.append("y" * 7)
    _assert_unchanged(session, snapshot)
    session.append("y" * 6)
    assert session.length == 256


def _fail_on_call(monkeypatch, n: int):
    """`steps.append` raises on its n-th call from now; the calls before it run."""
    real, calls = steps.append, []

    def append(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("step failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(steps, "append", append)


def test_a_step_failing_mid_item_leaves_the_session_as_it_was(tiny, monkeypatch):
    """The item's first chunk went in (its step donated the state) and the second failed:
    the session is as before the item, e.g. for the streaming worker's per-item retry."""
    cfg, params = tiny
    budget = _budget(cells=512)  # chunks of at most 256 tokens
    session = Session(params, cfg, budget, ByteTokenizer(), prefix="p\n")
    session.append("1 2 3\n")
    old_state, tokens, starts = session.state, session.tokens, list(session._item_starts)
    _fail_on_call(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="step failed"):
        session.append("y" * 300)
    monkeypatch.undo()
    assert old_state.k.is_deleted()  # the first chunk ran: the old buffers are gone
    np.testing.assert_array_equal(session.tokens, tokens)
    assert session._item_starts == starts and int(session.state.lengths[0]) == tokens.size
    # It goes on as a session that never saw the item.
    fresh = Session(params, cfg, budget, ByteTokenizer(), prefix="p\n")
    fresh.append("1 2 3\n")
    np.testing.assert_allclose(session.append("4 5\n"), fresh.append("4 5\n"),
                               **TOLERANCE[cfg.dtype])
    np.testing.assert_array_equal(session.tokens, fresh.tokens)
    assert session.query("q?", 6).tokens.tolist() == fresh.query("q?", 6).tokens.tolist()


def test_a_step_failing_in_a_slide_restores_the_old_cells(tiny, monkeypatch):
    cfg, params = tiny
    session = Session(params, cfg, _budget(cells=256), ByteTokenizer(), prefix="p\n",
                      overflow="slide")
    for i in range(6):
        session.append(f"item {i} " + "x" * 30)
    snapshot, evicted = _snapshot(session), session.evicted_tokens
    _fail_on_call(monkeypatch, 1)  # the re-prefill of the kept window
    with pytest.raises(RuntimeError, match="step failed"):
        session.append("item 6 " + "x" * 60)
    _assert_unchanged(session, snapshot)
    assert session.evicted_tokens == evicted


@pytest.mark.parametrize("question, max_new, match", [
    ("q" * 33, 4, "at most 32"),
    ("", 4, "empty"),
    ("ok?", 0, r"allowed: 1\.\.16"),
    ("ok?", 17, r"allowed: 1\.\.16"),
    ("ok?", 2.5, "an int"),
    ("ok?", True, "an int"),
])
def test_bad_query_is_refused_and_session_unchanged(tiny, question, max_new, match):
    cfg, params = tiny
    session = Session(params, cfg, _budget(), ByteTokenizer())
    session.append("1 2 3\n")
    snapshot = _snapshot(session)
    with pytest.raises(InputError, match=match):
        session.query(question, max_new)
    _assert_unchanged(session, snapshot)


def test_query_arguments_are_checked(tiny):
    cfg, params = tiny
    session = Session(params, cfg, _budget(), ByteTokenizer())
    session.append("1 2 3\n")
    snapshot = _snapshot(session)
    for kw, match in ((dict(temperature="0.5"), "temperature"), (dict(temperature=None),
                                                                   "temperature"),
                      (dict(temperature=-1.0), "temperature"),
                      (dict(temperature=1e39), r"allowed: a number in \[0, 3\.403e\+38\]"),
                      (dict(temperature=float("nan")), "temperature"),
                      (dict(seed=1.5), "seed"),
                      (dict(seed="a"), "seed"), (dict(seed=2**70), "seed"),
                      (dict(seed=True), "seed")):
        with pytest.raises(InputError, match=match):
            session.query("ok?", 4, **kw)
    with pytest.raises(InputError, match="max_new_tokens is a int; allowed: a list"):
        session.query_batch(["ok?"], 4)
    with pytest.raises(InputError, match="questions is a str; allowed: a list"):
        session.query_batch("ok?", [4])
    _assert_unchanged(session, snapshot)


def test_sampled_answers_differ_across_branch_groups(tiny):
    """A batch larger than the largest branch-row bucket runs in groups; each group draws
    its own samples (the first as a batch of its own would)."""
    cfg, params = tiny
    budget = Budget(cells=512, chunk_sizes=(16, 64), question_cells=16, max_new_tokens=8,
                    branch_rows=(1, 2))
    session = Session(params, cfg, budget, ByteTokenizer(), stop_token=NO_STOP)
    session.append("1 2 3\n")
    sample = dict(temperature=2.0, seed=3)
    answers = session.query_batch(["same"] * 4, [8] * 4, **sample)
    texts = [a.tokens.tolist() for a in answers]
    assert texts[:2] == [a.tokens.tolist() for a in session.query_batch(["same"] * 2, [8] * 2,
                                                                         **sample)]
    assert texts[2:] != texts[:2]  # the second group does not repeat the first


def test_bad_budgets_are_refused():
    for kw, match in ((dict(cells=-16), "cells=-16; allowed: a positive int"),
                      (dict(page_size=0), "page_size=0"), (dict(cells=256.0), "cells=256.0"),
                      (dict(max_new_tokens=0), "max_new_tokens=0"),
                      (dict(question_cells=0), "question_cells=0"),
                      (dict(chunk_sizes=(16.5, 64)), "chunk_sizes"),
                      (dict(windows=(0, 4096)), "windows")):
        with pytest.raises(InputError, match=match):
            Budget(**kw)


def test_budget_has_no_rows_knob():
    """`rows` was read by nothing (a session holds one row): it is gone, not ignored."""
    with pytest.raises(TypeError, match="rows"):
        Budget(rows=2)
    assert not hasattr(Budget(), "rows")


def test_bad_session_options_are_refused(tiny):
    cfg, params = tiny
    tok = ByteTokenizer()
    for kw, match in ((dict(stop_token=10**6), "stop_token"), (dict(stop_token=-2),
                                                               "stop_token"),
                      (dict(stop_token="eos"), "stop_token"), (dict(impl="bogus"), "impl"),
                      (dict(keep_fraction="0.5"), "keep_fraction")):
        with pytest.raises(InputError, match=match):
            Session(params, cfg, _budget(), tok, **kw)
    with pytest.raises(InputError, match="budget is a str"):
        Session(params, cfg, "big", tok)
    assert Session(params, cfg, _budget(), tok, stop_token=NO_STOP).stop_token == NO_STOP
    with pytest.raises(InputError, match="overflow='drop'"):
        Session(params, cfg, _budget(), ByteTokenizer(), overflow="drop")
    with pytest.raises(CapacityError, match="exceeds"):
        Session(params, cfg, _budget(cells=256), ByteTokenizer(), prefix="p" * 300)
    with pytest.raises(InputError, match="vocabulary"):
        Session(params, preset("tiny", vocab_size=200), _budget(), ByteTokenizer())


def test_default_limit_is_capped_by_the_budget(tiny):
    """No max_new_tokens means 32 or the budget's cap if smaller (here 16): the user asked
    for no limit, so none of theirs can be refused."""
    cfg, params = tiny
    session = Session(params, cfg, _budget(), ByteTokenizer(), stop_token=NO_STOP)
    session.append("1 2 3\n")
    answer = session.query("ok?")
    assert answer.tokens.size == 16
    np.testing.assert_array_equal(answer.tokens, session.query("ok?", 16).tokens)
    assert session.validate_max_new_tokens(None) == 16
    big = Session(params, cfg, Budget(cells=512, chunk_sizes=(16, 64), question_cells=32,
                                      max_new_tokens=64), ByteTokenizer())
    assert big.validate_max_new_tokens(None) == 32


def test_only_the_question_crosses_from_the_host_per_query(tiny, monkeypatch):
    """A query's scalars (row, stop token, temperature, vocabulary) are device arrays made
    once per value and reused; only the question crosses from the host, as one array
    (`steps.query_packed`)."""
    cfg, params = tiny
    session = Session(params, cfg, _budget(), ByteTokenizer(), prefix="p\n")
    session.append("1 2 3\n")
    calls = []
    query = steps.query_packed

    def recording(*args, **static):
        calls.append(args)
        return query(*args, **static)

    monkeypatch.setattr(steps, "query_packed", recording)
    first = session.query("q?", 4, temperature=0.5, seed=3)
    again = session.query("r?", 4, temperature=0.5, seed=3)
    greedy = session.query("q?", 4)
    monkeypatch.undo()
    scalars = QUERY_PACKED_SCALAR_ARGS  # row, stop_token, temperature, valid_vocab
    assert scalars == (2, 4, 5, 7) and QUERY_PACKED_PER_CALL_ARGS == (3,)
    for args in calls:
        assert isinstance(args[3], np.ndarray) and args[3].dtype == np.int32
        assert all(isinstance(args[i], jax.Array) for i in scalars)
    # The request: the question's tokens, then its length, then the tokens to generate.
    ids = session.tokenizer.encode("q?")
    assert calls[0][3][0, :ids.size].tolist() == ids.tolist()
    assert calls[0][3][0, -2:].tolist() == [ids.size, 4]
    assert all(calls[0][i] is calls[1][i] for i in scalars)  # made once, reused
    assert calls[2][5] is not calls[0][5] and float(calls[2][5]) == 0.0
    assert [int(calls[0][i]) for i in (2, 4, 7)] == [0, session.stop_token,
                                                    session.tokenizer.vocab_size]
    assert float(calls[0][5]) == 0.5
    # The answers are those of the steps' numpy inputs.
    for answer, question, temperature in ((first, "q?", 0.5), (again, "r?", 0.5),
                                          (greedy, "q?", 0.0)):
        ids = session.tokenizer.encode(question)
        q = np.zeros((1, session.budget.chunk_bucket(ids.size)), np.int32)
        q[0, :ids.size] = ids
        gen = steps.query(
            params, session.state, np.int32(0), q, np.asarray([ids.size], np.int32),
            np.asarray([4], np.int32), np.int32(session.stop_token), np.float32(temperature),
            session_module._rng_key(3 if temperature else 0),
            np.int32(session.tokenizer.vocab_size), cfg=cfg,
            window=session.budget.window_for(session.length),
            branch_cells=session.budget.branch_cells,
            max_new_cap=generation_width([4], session.budget), impl=session.impl)
        assert answer.tokens.tolist() == np.asarray(
            gen.tokens[0, :int(gen.num_tokens[0])]).tolist()


@pytest.mark.parametrize("bad, got", [(None, "NoneType"), (123, "int"), (b"1 2 3", "bytes"),
                                      (4.5, "float")])
def test_wrong_types_name_the_type_and_what_is_allowed(tiny, bad, got):
    cfg, params = tiny
    session = Session(params, cfg, _budget(), ByteTokenizer())
    session.append("1 2 3\n")
    snapshot = _snapshot(session)
    allowed = r"takes text \(str\) or token ids \(a 1-D integer array\); got "
    with pytest.raises(InputError, match="append " + allowed + got):
        session.append(bad)
    with pytest.raises(InputError, match="query " + allowed + got):
        session.query(bad, 4)
    with pytest.raises(InputError, match=r"encode takes text \(str\); got " + got):
        session.encode(bad)
    _assert_unchanged(session, snapshot)


class _BadIdTokenizer(ByteTokenizer):
    """Bytes, but "!" encodes to an id past every vocabulary and "~" to -1 (a buggy
    tokenizer, or one paired with the wrong model)."""

    def encode(self, text: str) -> np.ndarray:
        ids = super().encode(text)
        return np.where(ids == ord("!"), 10_000, np.where(ids == ord("~"), -1, ids))


def test_tokenizer_ids_outside_the_vocabulary_are_refused_before_any_device_work(
        tiny, monkeypatch):
    """Once let through, an id past the embedding table wrote NaN into the cells and every
    later answer had first_gap=nan."""
    cfg, params = tiny
    session = Session(params, cfg, _budget(), _BadIdTokenizer(), prefix="p\n")
    session.append("1 2 3\n")
    snapshot = _snapshot(session)

    def no_device_work(*args, **kwargs):
        raise AssertionError("a step ran on unchecked ids")

    monkeypatch.setattr(steps, "append", no_device_work)
    monkeypatch.setattr(steps, "query_packed", no_device_work)
    for text, bad_id, pos in (("4 5!\n", 10_000, 3), ("~6", -1, 0)):
        match = rf"id {bad_id} at position {pos}; allowed: ids in \[0, 259\)"
        for call in (session.append, session.query, session.prepare, session.encode):
            with pytest.raises(InputError, match=match):
                call(text)
    with pytest.raises(InputError, match=r"id 10000 at position 1"):
        Session(params, cfg, _budget(), _BadIdTokenizer(), prefix="p!")
    monkeypatch.undo()
    _assert_unchanged(session, snapshot)
    assert np.isfinite(session.query("ok?", 4).first_gap)


def test_a_question_is_prepared_once_and_answered_as_a_query(tiny):
    cfg, params = tiny
    session = Session(params, cfg, _budget(), ByteTokenizer())
    session.append("1 2 3\n")
    question = session.prepare("ok?", 6)
    assert question.text == "ok?" and question.max_new_tokens == 6
    assert question.ids.tolist() == session.encode("ok?").tolist()
    with pytest.raises(ValueError, match="read-only"):
        question.ids[0] = 1  # checked once: it cannot change after its check
    (answer,) = session.answer([question])
    assert answer.tokens.tolist() == session.query("ok?", 6).tokens.tolist()
    for bad in ("ok?", [], ["ok?"], None):
        with pytest.raises(InputError, match="answer takes a non-empty list of Questions"):
            session.answer(bad)
    small = Session(params, cfg, Budget(cells=512, chunk_sizes=(16, 64), question_cells=2,
                                        max_new_tokens=4), ByteTokenizer())
    with pytest.raises(InputError, match="does not fit this session's budget"):
        small.answer([question])
