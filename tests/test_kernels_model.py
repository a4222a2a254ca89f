"""Model-level equivalence with impl="pallas" (the kernels in interpret mode on CPU).

Small versions of the session-core equivalences: chunked appends through `append_attention`
equal a full reference forward, and a query through `cascade_attention` equals greedy decoding
by full forwards.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from statejax import cache, steps
from statejax.budget import Budget
from statejax.session import Session
from statejax.state import init_state
from statejax.tokenizer import ByteTokenizer

TOLERANCE = dict(atol=2e-5, rtol=2e-5)  # float32 tiny model, as test_session_core


def _budget():
    # One window (128) and two chunk sizes: few compiles of the interpreted kernels.
    return Budget(cells=128, page_size=16, chunk_sizes=(16, 64), question_cells=16,
                  max_new_tokens=8)


def _random_ids(seed, n, vocab=259):
    return np.asarray(jax.random.randint(jax.random.key(seed), (n,), 0, vocab), np.int32)


def test_pallas_runs_interpreted_on_cpu():
    assert cache.pallas_interpret() == (jax.default_backend() == "cpu")


def test_pallas_is_rejected_where_no_kernel_exists(tiny):
    cfg, params = tiny
    with pytest.raises(ValueError, match="impl='pallas'"):
        steps.forward(params, jnp.zeros((1, 4), jnp.int32), cfg=cfg, impl="pallas")


def test_chunked_append_with_pallas_equals_full_forward(tiny):
    cfg, params = tiny
    ids = _random_ids(3, 50)
    full = np.asarray(steps.forward(params, jnp.asarray(ids)[None], cfg=cfg)[0])
    budget = _budget()
    state = init_state(cfg, rows=1, cells=budget.cells)
    chunked = []
    for chunk in np.split(ids, [16, 33]):  # chunk buckets 16, 64, 64; rows at n = 0, 16, 33
        padded = np.zeros((1, budget.chunk_bucket(chunk.size)), np.int32)
        padded[0, :chunk.size] = chunk
        state, logits = steps.append(params, state, jnp.asarray(padded),
                                     jnp.asarray([chunk.size], jnp.int32), cfg=cfg,
                                     window=budget.cells, all_logits=True, impl="pallas")
        chunked.append(np.asarray(logits[0, :chunk.size]))
    np.testing.assert_allclose(np.concatenate(chunked), full, **TOLERANCE)


def _greedy_reference(params, cfg, ids, steps_n):
    seq = list(ids)
    for _ in range(steps_n):
        logits = steps.forward(params, jnp.asarray(seq, jnp.int32)[None], cfg=cfg)[0, -1]
        seq.append(int(jnp.argmax(logits)))
    return seq[len(ids):]


def test_query_with_pallas_equals_greedy_full_forward(tiny):
    cfg, params = tiny
    session = Session(params, cfg, _budget(), ByteTokenizer(), impl="pallas")
    session.append(_random_ids(5, 40))
    before = jax.tree.map(np.array, session.state)
    question = _random_ids(6, 9)
    answer = session.query(question, max_new_tokens=6)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, session.state))
    expected = _greedy_reference(params, cfg, np.concatenate([session.tokens, question]), 6)
    assert answer.tokens.tolist() == expected
    # A first-token query (compiled without the generation loop) agrees too.
    assert session.query(question, max_new_tokens=1).tokens.tolist() == expected[:1]
