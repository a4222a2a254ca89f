"""Model-level equivalence with impl="pallas" (the kernels in interpret mode on CPU).

Small versions of the session-core equivalences: chunked appends through `append_attention`
equal a full reference forward, and a query through `cascade_attention` equals greedy decoding
by full forwards. impl="pallas-mosaic" (ingestion by the Mosaic GPU append kernel): in jax's
GPU interpreter on CPU (jax 0.10), compiled on a Hopper GPU (marker `gpu`), an error elsewhere.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from statejax import cache, steps
from statejax.budget import Budget
from statejax.errors import InputError
from statejax.model.config import preset
from statejax.model.llama import init_params
from statejax.serving.session import Session
from statejax.state import init_state
from statejax.tokenizer import ByteTokenizer
from tests.kernels import mgpu_interpreter
from tests.kernels.test_kernels import GPU

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


def _append_in_chunks(params, cfg, ids, impl):
    """Logits [len(ids), V] of `ids` appended in three chunks (buckets 16, 64, 64; rows at
    n = 0, 16, 33) to a fresh one-row session."""
    budget = _budget()
    state = init_state(cfg, rows=1, cells=budget.cells)
    chunked = []
    for chunk in np.split(ids, [16, 33]):
        padded = np.zeros((1, budget.chunk_bucket(chunk.size)), np.int32)
        padded[0, :chunk.size] = chunk
        state, logits = steps.append(params, state, jnp.asarray(padded),
                                     jnp.asarray([chunk.size], jnp.int32), cfg=cfg,
                                     window=budget.cells, all_logits=True, impl=impl)
        chunked.append(np.asarray(logits[0, :chunk.size], np.float32))
    return np.concatenate(chunked)


def test_chunked_append_with_pallas_equals_full_forward(tiny):
    cfg, params = tiny
    ids = _random_ids(3, 50)
    full = np.asarray(steps.forward(params, jnp.asarray(ids)[None], cfg=cfg)[0])
    np.testing.assert_allclose(_append_in_chunks(params, cfg, ids, "pallas"), full,
                               **TOLERANCE)


@pytest.mark.parametrize("cells, kernel", [(8192, "statejax_decode"),
                                           (4096, "statejax_append")])
def test_a_short_chunk_over_many_cells_is_split_along_them(cells, kernel):
    """impl="pallas" appends a chunk over a window of `SPLIT_APPEND_BLOCKS` KV blocks or more
    by the decode kernel split along the cells (a few query rows over many cells), fewer by
    the append kernel; either way as the reference attends (two rows at different lengths,
    one with padding), and the cells it writes are the reference's."""
    rng = np.random.default_rng(cells)
    k_cells, v_cells = (jnp.asarray(rng.standard_normal((2, 2, cells, 1, 16)), jnp.float32)
                        for _ in range(2))
    q, k_new, v_new = (jnp.asarray(rng.standard_normal((2, 5, heads, 16)), jnp.float32)
                       for heads in (2, 1, 1))
    view = cache.AppendView(k=k_cells, v=v_cells, lengths=jnp.asarray([cells - 9, 300]),
                            num_new=jnp.asarray([5, 3]), window=cells, impl="pallas")
    step = jax.jit(lambda view, *new: view.update_and_attend(1, *new))
    (out, got), (want_out, want) = (step(v, q, k_new, v_new)
                                    for v in (view, view.replace(impl="reference")))
    assert kernel in str(jax.make_jaxpr(step)(view, q, k_new, v_new))
    np.testing.assert_allclose(out[0], want_out[0], **TOLERANCE)
    np.testing.assert_allclose(out[1, :3], want_out[1, :3], **TOLERANCE)  # its valid tokens
    np.testing.assert_array_equal(got.k, want.k)
    np.testing.assert_array_equal(got.v, want.v)


# ------------------------------------------------ impl="pallas-mosaic": Mosaic GPU ingestion

# bf16 weights and cells; the kernel's bf16 probabilities and approximate exp2 against the
# reference's float32 softmax. In the interpreter the logits came out identical; a row that
# sees 3 cells too many moved them by 0.32.
MOSAIC_TOLERANCE = dict(atol=2e-2, rtol=2e-2)
_INTERPRETER_DEADLINE_S = 300


def _mosaic_model():
    """A two-layer bf16 model whose attention the Mosaic kernel takes (D = 64, GQA 2)."""
    cfg = preset("tiny", head_dim=64, dtype="bfloat16")
    return cfg, init_params(cfg, seed=1)


def _check_mosaic_ingestion():
    cfg, params = _mosaic_model()
    ids = _random_ids(3, 50)
    want = _append_in_chunks(params, cfg, ids, "reference")
    got = _append_in_chunks(params, cfg, ids, "pallas-mosaic")
    np.testing.assert_allclose(got, want, **MOSAIC_TOLERANCE)
    return got, want


def run_mosaic_ingestion_in_interpreter():
    """Subprocess entry: the Mosaic kernel's compiled-only entry point swapped for jax's GPU
    interpreter (patched as in test_kernels_mgpu), everything else as the model runs it."""
    from statejax.kernels import append_attention_mgpu as mg

    jax.config.update("jax_numpy_rank_promotion", "raise")  # as tests/conftest.py
    mg.append_attention_mgpu = lambda *args, **kwargs: mg._append_mgpu(
        *args, **kwargs, interpret=mgpu_interpreter.params())
    with mgpu_interpreter.patched():
        got, want = _check_mosaic_ingestion()
        assert not mgpu_interpreter.races_found()
    print("max abs error", float(np.max(np.abs(got - want))))


@pytest.mark.skipif(not mgpu_interpreter.supported(),
                    reason="the GPU-interpreter patch is written for jax 0.10's internals")
def test_chunked_append_with_pallas_mosaic_in_the_gpu_interpreter():
    ok, output = mgpu_interpreter.run_with_deadline(
        "import test_kernels_model as t; t.run_mosaic_ingestion_in_interpreter()",
        _INTERPRETER_DEADLINE_S)
    assert ok, output
    assert "max abs error" in output


@pytest.mark.skipif(GPU, reason="checks the error where no GPU compiles the kernel")
def test_pallas_mosaic_raises_where_no_gpu_compiles_it():
    cfg, params = _mosaic_model()
    state = init_state(cfg, rows=1, cells=128)
    with pytest.raises(InputError, match="mosaic_gpu backend compiles for a Hopper GPU"):
        steps.append(params, state, jnp.ones((1, 16), jnp.int32),
                     jnp.asarray([16], jnp.int32), cfg=cfg, window=128, impl="pallas-mosaic")


def test_unknown_impl_is_rejected(tiny):
    cfg, params = tiny
    state = init_state(cfg, rows=1, cells=128)
    with pytest.raises(ValueError, match="allowed here: \\('reference', 'pallas', "
                                         "'pallas-mosaic'\\)"):
        steps.append(params, state, jnp.ones((1, 16), jnp.int32),
                     jnp.asarray([16], jnp.int32), cfg=cfg, window=128, impl="mosaic")


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a Hopper GPU (compiled Mosaic GPU kernel)")
def test_chunked_append_with_pallas_mosaic_on_the_gpu():
    _check_mosaic_ingestion()


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
