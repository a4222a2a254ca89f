"""Packed training sequences: one bar stream, many question branches, each in serving form.

Layout of one sequence of T = C + M * Tb tokens (ByteTokenizer ids):

    [ context: prefix + bar lines, padded to C ][ branch 1: Tb ] ... [ branch M: Tb ]

Branch j is a question asked after the first `cut_j` bars, exactly as a `Session` asks it: its
tokens sit at positions n_j, n_j + 1, ... (n_j = context tokens up to that bar) and attend to
context tokens [0, n_j) plus their own branch causally, never to later bars or other branches
(`PackedView`). So one forward over a context of ~9 bars trains M questions whose number of
preceding bars varies from 1 to ~9 (the model must read the *end* of the context), at a cost
of M * Tb extra tokens instead of M separate sequences. Training and serving see the same
tokens at the same positions: a test checks the packed logits equal a plain forward over
context[:n_j] + branch.

Loss weights: answer tokens and their closing "\\n" weigh 1; context tokens weigh
`context_weight` (0.1 by default); question tokens and padding weigh 0. Why: the bars are
mostly noise (prices are a random walk), so with equal weights ~C noisy tokens per sequence
would drown the ~M * 5 answer tokens that carry the task; a small weight keeps the model a
language model of the stream (it must know the format to read it) without that dilution.

Serving contexts grow to thousands of tokens, training contexts hold ~9 bars. With
`jump_prob` > 0, some sequences shift the positions of everything after a bar boundary by a
large gap, so the prefix and old bars sit as far back as in a long session (questions then
read only bars after the gap). It costs no compute; docs/ladder.md reports accuracy at 5x
the training context length.

Every batch is a pure function of (seed, step, split): training resumes exactly from any step
without saving a data iterator. Train and held-out streams never share a bar stream (the
synthetic generator's seeds are even for train and odd for held-out).
"""

import dataclasses
import itertools
import math
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from statejax import attention
from statejax.data.market import Bar, format_bar, iter_synthetic_bars
from statejax.errors import InputError
from statejax.tokenizer import ByteTokenizer
from statejax.train import tasks

TRAIN, HELDOUT = 0, 1  # splits
_TOK = ByteTokenizer()
# The most bars any question reads (direction of the last 5 reads 6).
_MOST_BARS_NEEDED = max(tasks.bars_needed(q, k) for q in tasks.QUESTION_TYPES
                        for k in tasks.valid_ks(q, 1 << 30))


@dataclasses.dataclass(frozen=True)
class PackSpec:
    """Shape and sampling of packed sequences.

    Attributes:
      context_tokens: C, room for prefix + bar lines.
      num_branches: M question branches per sequence.
      branch_tokens: Tb, room for one question + answer + "\\n".
      context_weight: loss weight of context tokens (answers weigh 1).
      min_price, max_price: the stream's start price is log-uniform in this range.
      max_index: the first bar's index is log-uniform in [0, max_index), so indices have
        1 to 4 digits as in a stream that has run for a while.
      jump_prob, jump_max: with probability `jump_prob`, positions after a random bar
        boundary are shifted by a gap log-uniform in [1, jump_max], so the model sees the
        prefix and old bars at the relative distances a long serving context has (RoPE
        depends on distance only); questions then read only bars after the gap.
    """

    context_tokens: int = 384
    num_branches: int = 16
    branch_tokens: int = 40
    context_weight: float = 0.1
    min_price: float = 20.0
    max_price: float = 500.0
    max_index: int = 10_000
    jump_prob: float = 0.0
    jump_max: int = 0

    @property
    def seq_len(self) -> int:
        """T = C + M * Tb."""
        return self.context_tokens + self.num_branches * self.branch_tokens


class Batch(NamedTuple):
    """B packed sequences (numpy on the host, jax arrays inside jit).

    Attributes:
      tokens: [B, T] int32 input ids (pad 256 where empty).
      targets: [B, T] int32 next token of the same segment.
      weights: [B, T] float32 loss weight of each target.
      positions: [B, T] int32 RoPE positions (a branch continues its context at n_j).
      segments: [B, T] int32, 0 for context tokens, j for branch j (1..M).
      context_limit: [B, T] int32 context tokens visible to each token: t + 1 in the context,
        n_j in branch j (an unused branch slot's padding gets t + 1, as context tokens:
        its loss weight is zero, so no result depends on it).
      qtypes: [B, M] int32 index into `tasks.QUESTION_TYPES` of each branch, -1 if unused.
    """

    tokens: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    positions: np.ndarray
    segments: np.ndarray
    context_limit: np.ndarray
    qtypes: np.ndarray


def bar_stream(rng: np.random.Generator, spec: PackSpec, split: int) -> Iterator[Bar]:
    """An endless synthetic bar stream with a random start price, start index and regime.

    Args:
      rng: source of the stream's seed and offsets.
      spec: price and index ranges.
      split: TRAIN or HELDOUT; the two never share a generator seed.
    """
    seed = 2 * int(rng.integers(2**30)) + split
    price = math.exp(rng.uniform(math.log(spec.min_price), math.log(spec.max_price)))
    first = int(math.exp(rng.uniform(0.0, math.log(spec.max_index)))) - 1
    skip = int(rng.integers(64))  # do not always start from the generator's calm state
    stream = itertools.islice(iter_synthetic_bars(seed=seed, start_price=round(price, 2)),
                              skip, None)
    for bar in stream:
        yield dataclasses.replace(bar, index=bar.index - skip + first)


def make_sequence(spec: PackSpec, rng: np.random.Generator, split: int = TRAIN) -> Batch:
    """One packed sequence (fields as in `Batch`, without the leading B axis)."""
    c, m, tb, t = spec.context_tokens, spec.num_branches, spec.branch_tokens, spec.seq_len
    tokens = np.full(t, _TOK.pad_id, np.int32)
    targets = np.full(t, _TOK.pad_id, np.int32)
    weights = np.zeros(t, np.float32)
    positions = np.arange(t, dtype=np.int32)
    segments = np.zeros(t, np.int32)
    context_limit = np.arange(1, t + 1, dtype=np.int32)
    qtypes = np.full(m, -1, np.int32)

    context = list(_TOK.encode(tasks.prompt_prefix()))
    bars, ends = [], []  # ends[i]: context length after bar i
    for bar in bar_stream(rng, spec, split):
        line = _line(bar)
        if len(context) + line.size > c:
            break
        context.extend(line)
        bars.append(bar)
        ends.append(len(context))
    if not bars:
        raise InputError(f"context_tokens={c} holds no bar after the prefix")
    n = len(context)
    tokens[:n] = context
    targets[:n - 1] = context[1:]
    weights[:n - 1] = spec.context_weight

    # Far-context augmentation: the prefix and bars [0, jump_bars) move `gap` positions
    # further back, as if `gap` more tokens had streamed in between (a long session's
    # distances, at no compute). Branches are cut after the jump's window, so the bars a
    # question reads are never split by the gap.
    jump_bars, gap = 0, 0
    if spec.jump_max > 0 and len(bars) >= _MOST_BARS_NEEDED and rng.random() < spec.jump_prob:
        jump_bars = int(rng.integers(len(bars) - _MOST_BARS_NEEDED + 1))
        gap = int(math.exp(rng.uniform(0.0, math.log(spec.jump_max))))
        jump_at = ends[jump_bars - 1] if jump_bars else ends[0] - len(_line(bars[0]))
        positions[jump_at:c] += gap

    # Round-robin over types from a random start: balanced per-type counts in every batch.
    start = int(rng.integers(len(tasks.QUESTION_TYPES)))
    for j in range(m):
        qi = (start + j) % len(tasks.QUESTION_TYPES)
        qtype = tasks.QUESTION_TYPES[qi]
        ks = tasks.valid_ks(qtype, len(bars))
        if not ks:
            continue  # context too short for this type; the slot stays unused
        least = min(tasks.bars_needed(qtype, k) for k in ks)
        if gap:
            least = max(least, jump_bars + _MOST_BARS_NEEDED)
        cut = int(rng.integers(least, len(bars) + 1))
        question, ans = tasks.make_question(qtype, bars[:cut], rng)
        q_ids = _TOK.encode(question)
        ids = np.concatenate([q_ids, _TOK.encode(ans + "\n")])
        if ids.size > tb:
            raise InputError(f"branch of {ids.size} tokens exceeds branch_tokens={tb}: "
                             f"{question + ans!r}")
        s = c + j * tb
        n_j = ends[cut - 1]
        tokens[s:s + ids.size] = ids
        targets[s:s + ids.size - 1] = ids[1:]
        weights[s + q_ids.size - 1:s + ids.size - 1] = 1.0  # targets = answer + "\n"
        positions[s:s + tb] = n_j + gap + np.arange(tb)
        segments[s:s + tb] = j + 1
        context_limit[s:s + tb] = n_j
        qtypes[j] = qi
    return Batch(tokens, targets, weights, positions, segments, context_limit, qtypes)


def _line(bar: Bar) -> np.ndarray:
    return _TOK.encode(format_bar(bar))


def make_batch(spec: PackSpec, *, seed: int, step: int, batch_size: int,
               split: int = TRAIN) -> Batch:
    """Batch number `step` of a split: B sequences, a pure function of the arguments."""
    rng = np.random.default_rng([seed, split, step])
    rows = [make_sequence(spec, rng, split) for _ in range(batch_size)]
    return Batch(*(np.stack(field) for field in zip(*rows, strict=True)))


def packed_mask(segments_BxT, context_limit_BxT):
    """[B, T, T] bool: query t may attend key s (its context prefix, or its branch causally).

    The dense specification of `PackedView`'s attention pattern (tests compare the two).
    """
    t = segments_BxT.shape[1]
    idx = jnp.arange(t, dtype=jnp.int32)
    seg_q, seg_k = segments_BxT[:, :, None], segments_BxT[:, None, :]
    in_context = (seg_k == 0) & (idx[None, None, :] < context_limit_BxT[:, :, None])
    in_branch = (seg_q == seg_k) & (seg_q != 0) & (idx[None, None, :] <= idx[None, :, None])
    return in_context | in_branch


@struct.dataclass
class PackedView:
    """Cache view for packed sequences: causal context, branches over a context prefix.

    Attention is computed in blocks instead of one dense [T, T] mask, which would spend most
    of its work on masked pairs: context x context (causal), branches x context (each branch
    up to its cut), branch x its own tokens (causal); the two branch parts are merged by
    log-sum-exp, as `BranchView` does at serving time.

    Attributes:
      branch_limit: [B, M] int32 context tokens branch m reads (n_m; for an unused slot a
        value no loss depends on).
      spec: the packing (static): C, M, Tb.
      impl: attention implementation.
    """

    branch_limit: jax.Array
    spec: PackSpec = struct.field(pytree_node=False)
    impl: str = struct.field(pytree_node=False, default="reference")

    @classmethod
    def for_batch(cls, batch: Batch, spec: PackSpec, impl: str = "reference"):
        c, tb = spec.context_tokens, spec.branch_tokens
        return cls(branch_limit=batch.context_limit[:, c::tb], spec=spec, impl=impl)

    one_qkv_buffer = False  # `statejax.cache.View`: q, k and v in three buffers

    def update_and_attend(self, layer, q_BxTxHxD, k_BxTxKxD, v_BxTxKxD):
        del layer
        if self.impl != "reference":
            raise ValueError(f"attention impl={self.impl!r}; allowed here: 'reference'")
        c, m, tb = self.spec.context_tokens, self.spec.num_branches, self.spec.branch_tokens
        b, _, h, d = q_BxTxHxD.shape
        kh = k_BxTxKxD.shape[2]
        k_ctx, v_ctx = k_BxTxKxD[:, :c], v_BxTxKxD[:, :c]
        causal_CxC = jnp.tril(jnp.ones((c, c), bool))
        out_ctx, _ = attention.attend(q_BxTxHxD[:, :c], k_ctx, v_ctx,
                                      jnp.broadcast_to(causal_CxC, (b, c, c)))

        q_br = q_BxTxHxD[:, c:]  # [B, M*Tb, H, D]
        limit_BxMTb = jnp.repeat(self.branch_limit, tb, axis=1)
        ctx_mask = jnp.arange(c, dtype=jnp.int32)[None, None, :] < limit_BxMTb[:, :, None]
        out_a, lse_a = attention.attend(q_br, k_ctx, v_ctx, ctx_mask)
        fold = lambda x, heads: x.reshape(b * m, tb, heads, d)
        causal_TbxTb = jnp.tril(jnp.ones((tb, tb), bool))
        out_b, lse_b = attention.attend(fold(q_br, h), fold(k_BxTxKxD[:, c:], kh),
                                        fold(v_BxTxKxD[:, c:], kh),
                                        jnp.broadcast_to(causal_TbxTb, (b * m, tb, tb)))
        out_br, _ = attention.merge_partials(out_a, lse_a, out_b.reshape(out_a.shape),
                                             lse_b.reshape(lse_a.shape))
        return jnp.concatenate([out_ctx, out_br], axis=1), self
