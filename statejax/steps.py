"""Jitted, pure steps over `SessionState`: forward, append, and query (generate on a branch).

Every step takes `(params, state, batch...)`, with shapes from the `Budget` (static `window`,
padded chunks) and per-step counters as arrays, so steady-state streaming never recompiles.
"""

import functools

import jax
import jax.numpy as jnp
from flax import struct

from statejax.cache import AppendView, BranchView, FullView
from statejax.errors import InputError
from statejax.model.config import ModelConfig
from statejax.model.layouts import layout_of, per_layer
from statejax.model.llama import FUSED_PARAMS, Transformer, check_linear_impl
from statejax.state import SessionState


@functools.partial(jax.jit, static_argnames=("cfg", "impl", "linear_impl"))
def forward(params, tokens_BxT, *, cfg: ModelConfig, impl: str = "reference",
            linear_impl: str = "xla"):
    """Full causal forward with no cache. Returns logits [B, T, V] float32.

    params: in any layout (`statejax.model.layouts`), as in every step. impl: attention
    (`statejax.cache.IMPLS`); linear_impl: the blocks' linear layers
    (`statejax.model.llama.LINEAR_IMPLS`), as in every step."""
    params = model_params(params, linear_impl)
    b, t = tokens_BxT.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, _ = Transformer(cfg, linear_impl).apply({"params": params}, tokens_BxT, positions,
                                       FullView(impl=impl))
    return logits


@functools.partial(jax.jit, static_argnames=("cfg", "window", "all_logits", "impl",
                                             "linear_impl"),
                   donate_argnames=("state",))
def append(params, state: SessionState, tokens_BxT, num_new_B, *, cfg: ModelConfig,
           window: int, all_logits: bool = False, impl: str = "reference",
           linear_impl: str = "xla"):
    """Appends a padded chunk to every session row. Donates `state`.

    Args:
      params: model parameters in any layout (`statejax.model.layouts`).
      state: session rows; row b gains `num_new_B[b]` cells.
      tokens_BxT: int32 chunk, padded to a budget chunk size; entries t >= num_new[b] ignored.
      num_new_B: int32 valid tokens per row (0 leaves a row untouched).
      window: static attention window S >= lengths + num_new for every row.
      all_logits: return logits for every chunk position instead of the last valid one.
      impl: attention (`statejax.cache.IMPLS`); linear_impl: the blocks' linear layers
        (`statejax.model.llama.LINEAR_IMPLS`).

    Returns:
      (new state, logits): logits [B, V] at each row's last new token, or [B, T, V].
    """
    params = model_params(params, linear_impl)
    t = tokens_BxT.shape[1]
    view = AppendView(state.k, state.v, state.lengths, num_new_B, window=window, impl=impl)
    last = None if all_logits else jnp.maximum(num_new_B - 1, 0)
    logits, view = Transformer(cfg, linear_impl).apply(
        {"params": params}, tokens_BxT, view.positions(t), view, last)
    new_state = SessionState(k=view.k, v=view.v, lengths=state.lengths + num_new_B)
    return new_state, logits


@struct.dataclass
class Generation:
    """Output of a query step for R branch rows (G = the budget's max_new_tokens).

    Attributes:
      tokens: [R, G] int32 generated tokens; entries at or beyond `num_tokens` are padding.
      num_tokens: [R] int32 tokens generated before the stop token or the limit.
      gaps: [R, G] float32 top-1 minus top-2 logit at each generated token.
      first_logits: [R, V] float32 next-token logits after the question (the cached
        distribution pre-positioning answers from); -inf at ids >= valid_vocab.
    """

    tokens: jax.Array
    num_tokens: jax.Array
    gaps: jax.Array
    first_logits: jax.Array


def generates(params, linear_impl: str) -> bool:
    """Whether `query` runs a generation loop (`max_new_cap` > 1) on params in their layout.

    XLA's one-token GEMMs copy slices of stacked or packed weights instead of reading them in
    place, so only per-layer weights or the fused kernels (linear_impl "pallas") generate
    (`docs/serving.md`)."""
    return layout_of(params) == "per_layer" or linear_impl == "pallas"


def model_params(params, linear_impl: str) -> dict:
    """The per-layer tree the model applies, from params in any layout (`model.layouts`).

    With linear_impl "pallas" the fused kernels' parameters (`llama.FUSED_PARAMS`) of
    stacked or packed weights stay in their buffers (`layouts.LaidOutLeaf`): a Pallas call
    takes whole buffers, and handed slices XLA would copy each out first."""
    check_linear_impl(linear_impl)
    return per_layer(params, FUSED_PARAMS if linear_impl == "pallas" else frozenset())


def _mask_vocab(logits_RxV, valid_vocab):
    """Ids >= valid_vocab (model rows the tokenizer cannot decode) can never be produced."""
    ids_V = jnp.arange(logits_RxV.shape[-1], dtype=jnp.int32)
    return jnp.where(ids_V[None, :] < valid_vocab, logits_RxV, -jnp.inf)


def _first_wins(a, a_id, b, b_id):
    """Whether (a, a_id) ranks first: the larger value, NaN above all (as `argmax`), ties to
    the lower id. A total order, so the reduction is the same whatever XLA's tree shape."""
    a_nan, b_nan = jnp.isnan(a), jnp.isnan(b)
    same = (a == b) | (a_nan & b_nan)
    return (a_nan & ~b_nan) | (a > b) | (same & (a_id < b_id))


def _merge_picks(a, b):
    """Combiner of `_pick`'s reduction: two (best, its id, second best, best sample score, its
    id) summaries -> one; ties go to the lower id, as `argmax` and `lax.top_k` break them."""
    (a1, a_id, a2, a_s, a_sid), (b1, b_id, b2, b_s, b_sid) = a, b
    a_wins = _first_wins(a1, a_id, b1, b_id)
    a_sample = _first_wins(a_s, a_sid, b_s, b_sid)
    return (jnp.where(a_wins, a1, b1), jnp.where(a_wins, a_id, b_id),
            jnp.where(a_wins, jnp.maximum(a2, b1), jnp.maximum(b2, a1)),
            jnp.where(a_sample, a_s, b_s), jnp.where(a_sample, a_sid, b_sid))


def _pick(logits_RxV, temperature, key):
    """Greedy at temperature 0, else a sample; also the top-1 minus top-2 logit gap.

    One variadic reduction over the vocabulary finds the argmax, the second-best logit and
    the sample (`jax.random.categorical`'s Gumbel argmax, same draws), so a GPU makes one
    pass over the vocabulary instead of three (`docs/serving.md`).

    Args:
      logits_RxV: [R, V] logits (any float dtype); -inf marks ids never to pick.
      temperature: float32 scalar; 0 means greedy.
      key: PRNG key of the sample.

    Returns:
      (token [R] int32, gap [R] float32).
    """
    logits_RxV = logits_RxV.astype(jnp.float32)  # one dtype for the reduction's operands
    ids_RxV = jnp.broadcast_to(jnp.arange(logits_RxV.shape[1], dtype=jnp.int32),
                               logits_RxV.shape)
    # Masked ids stay -inf at any temperature: XLA may divide by multiplying with 1/t, which
    # flushes to 0 above ~8.5e37 (f32), and -inf * 0 would be a NaN that the pick ranks first.
    scaled_RxV = jnp.where(logits_RxV == -jnp.inf, -jnp.inf,
                           logits_RxV / jnp.maximum(temperature, 1e-6))
    scores_RxV = jax.random.gumbel(key, logits_RxV.shape, logits_RxV.dtype) + scaled_RxV
    neg_inf = jnp.array(-jnp.inf, jnp.float32)
    no_id = jnp.array(jnp.iinfo(jnp.int32).max, jnp.int32)
    best, best_id, second, _, sampled = jax.lax.reduce(
        (logits_RxV, ids_RxV, jnp.full_like(logits_RxV, -jnp.inf), scores_RxV, ids_RxV),
        (neg_inf, no_id, neg_inf, neg_inf, no_id), _merge_picks, (1,))
    return jnp.where(temperature > 0, sampled, best_id), best - second


@functools.partial(jax.jit, static_argnames=("cfg", "window", "branch_cells", "max_new_cap",
                                             "impl", "linear_impl"))
def query(params, state: SessionState, row, question_RxT, question_len_R, max_new_R,
          stop_token, temperature, rng, valid_vocab, *, cfg: ModelConfig, window: int,
          branch_cells: int, max_new_cap: int, impl: str = "reference",
          linear_impl: str = "xla") -> Generation:
    """Answers R questions on branches of session row `row`; the state is not written.

    The branches read the row's cells [0, n) and write only private cells allocated here,
    which are dropped on return: discarding a branch costs nothing.

    Args:
      params: model parameters in any layout (`statejax.model.layouts`; stacked or packed:
        first-token queries only, `max_new_cap` 1).
      state: session rows (read only).
      row: int32 scalar, which session row to branch from.
      question_RxT: int32 question tokens, padded to a chunk size.
      question_len_R: int32 valid question tokens per branch (>= 1).
      max_new_R: int32 tokens to generate per branch, 0..max_new_cap (0: padding row).
      stop_token: int32 scalar; generation of a branch stops when it emits it.
      temperature: float32 scalar; 0 means greedy.
      rng: PRNG key for sampling; generated token i draws with `fold_in(fold_in(rng, 0), i)`
        (the step's own sub-stream: a caller may fold other integers into a root key for
        other calls, as `Session.query_batch` does per group of branches).
      valid_vocab: int32 scalar; only ids below it are generated (the tokenizer's vocabulary
        may be smaller than the model's embedding table).
      window: static S >= n.
      branch_cells: static Tb >= question length + max_new.
      max_new_cap: static G, the width of the generation buffers. G = 1 compiles no
        generation loop (nor its carried buffers and per-turn condition), the step a
        first-token query should use.
      impl, linear_impl: as `append`.

    Returns:
      A `Generation`.
    """
    if max_new_cap > 1 and not generates(params, linear_impl):
        raise InputError(f"{layout_of(params)} layer weights (statejax.model.layouts) with "
                         f"linear_impl={linear_impl!r} run first-token queries (max_new_cap="
                         f"1), not a generation loop (max_new_cap={max_new_cap}); pass "
                         "per-layer params (layouts.per_layer) or linear_impl='pallas' to "
                         "generate")
    params = model_params(params, linear_impl)
    model = Transformer(cfg, linear_impl)
    r, t = question_RxT.shape
    # Each branch cell holds its K heads, then its V heads (`BranchView`). A first-token
    # step keeps no cells: nothing reads them after it.
    cells_shape = (cfg.num_layers, r, branch_cells, 2 * cfg.num_kv_heads, cfg.head_dim)
    cells = None if max_new_cap == 1 else jnp.zeros(cells_shape, cfg.jnp_dtype)
    view = BranchView(state.k, state.v, jnp.asarray(row, jnp.int32), state.lengths[row],
                      cells, jnp.zeros((r,), jnp.int32), question_len_R, window=window,
                      impl=impl)
    first_logits, view = model.apply({"params": params}, question_RxT, view.positions(t), view,
                                     question_len_R - 1)
    first_logits = _mask_vocab(first_logits, valid_vocab)
    # fold_in per token rather than a key split and carried along: XLA then computes the key
    # inside the sample's kernel instead of carrying it through the loop.
    token_rng = jax.random.fold_in(rng, 0)
    token, gap = _pick(first_logits, temperature, jax.random.fold_in(token_rng, 0))

    def record(i, token, gap, tokens, gaps, num, done):
        live = ~done
        tokens = tokens.at[:, i].set(jnp.where(live, token, 0))
        gaps = gaps.at[:, i].set(jnp.where(live, gap, 0.0))
        stopped = token == stop_token
        num = jnp.where(live & ~stopped, i + 1, num)
        done = done | stopped | (i + 1 >= max_new_R)
        return tokens, gaps, num, done

    tokens = jnp.zeros((r, max_new_cap), jnp.int32)
    gaps = jnp.zeros((r, max_new_cap), jnp.float32)
    num = jnp.zeros((r,), jnp.int32)
    done = max_new_R <= 0
    tokens, gaps, num, done = record(0, token, gap, tokens, gaps, num, done)
    if max_new_cap == 1:
        return Generation(tokens=tokens, num_tokens=num, gaps=gaps, first_logits=first_logits)

    def cond(carry):
        i, _, _, _, _, done, _ = carry
        return (i < max_new_cap) & ~jnp.all(done)

    def body(carry):
        i, token, tokens, gaps, num, done, view = carry
        step_view = view.replace(branch_lengths=question_len_R + i - 1,
                                 num_new=jnp.ones((r,), jnp.int32))
        logits, step_view = model.apply({"params": params}, token[:, None],
                                        step_view.positions(1), step_view,
                                        jnp.zeros((r,), jnp.int32))
        logits = _mask_vocab(logits, valid_vocab)
        token, gap = _pick(logits, temperature, jax.random.fold_in(token_rng, i))
        tokens, gaps, num, done = record(i, token, gap, tokens, gaps, num, done)
        return i + 1, token, tokens, gaps, num, done, step_view

    carry = (jnp.int32(1), token, tokens, gaps, num, done, view)
    _, _, tokens, gaps, num, _, _ = jax.lax.while_loop(cond, body, carry)
    return Generation(tokens=tokens, num_tokens=num, gaps=gaps, first_logits=first_logits)


@functools.partial(jax.jit, static_argnames=("cfg", "window", "branch_cells", "max_new_cap",
                                             "impl", "linear_impl"))
def query_packed(params, state: SessionState, row, request_RxT2, stop_token, temperature, rng,
                 valid_vocab, *, cfg: ModelConfig, window: int, branch_cells: int,
                 max_new_cap: int, impl: str = "reference",
                 linear_impl: str = "xla") -> jax.Array:
    """`query` with one array in and one out: what a host-driven lone query passes.

    On a GPU each host transfer is its own copy that a lone query waits for, so the question
    goes in as one array and the answer comes out as one (`docs/serving.md`).

    Args:
      request_RxT2: int32 [R, T + 2], `statejax.serving.packing.pack_question(question_RxT,
        question_len_R, max_new_R)`.
      the rest: as `query`.

    Returns:
      answer [R, 2G + 1] int32: tokens [R, G], num_tokens [R], then gaps [R, G] as float32
      bits (`statejax.serving.packing.unpack_answer`); not the next-token logits.
    """
    gen = query(params, state, row, request_RxT2[:, :-2], request_RxT2[:, -2],
                request_RxT2[:, -1], stop_token, temperature, rng, valid_vocab, cfg=cfg,
                window=window, branch_cells=branch_cells, max_new_cap=max_new_cap, impl=impl,
                linear_impl=linear_impl)
    return jnp.concatenate([gen.tokens, gen.num_tokens[:, None],
                            jax.lax.bitcast_convert_type(gen.gaps, jnp.int32)], axis=1)
