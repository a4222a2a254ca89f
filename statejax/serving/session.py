"""A session on the host: one row of KV cells advanced as data arrives, queried on branches.

Context is partitioned as frozen prefix (e.g. a system prompt) -> data region (streamed items)
-> transient query branches. `Session` is single-threaded; `statejax.serving.streaming` adds the
data plane / query plane threads and flash queries on top.

A query is checked and tokenised once (`prepare` -> `Question`) and answered from prepared
questions (`answer`); `query` and `query_batch` do both. Every id, from token arrays or from
the tokenizer, is checked against the vocabulary before any device work.

Overflow policy when the cells are full:
- `"error"` (default): the append is refused with `CapacityError`; nothing changes.
- `"slide"`: the oldest data items are dropped (the frozen prefix is kept) so that the kept
  data fills at most `keep_fraction` of the data region, and the kept window is re-prefilled
  at positions starting from 0. This costs one prefill of the kept window.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from statejax import steps
from statejax.budget import Budget
from statejax.cache import IMPLS
from statejax.errors import CapacityError, InputError
from statejax.model.config import ModelConfig
from statejax.model.layouts import layout_of
from statejax.serving.packing import pack_questions, unpack_answer
from statejax.serving.question import Question
from statejax.serving.results import Answer
from statejax.state import init_state
from statejax.tokenizer import Tokenizer, check_fits_vocab, encode_checked, validate_token_ids


@functools.lru_cache(maxsize=64)
def _rng_key(seed: int) -> jax.Array:
    """PRNG key of a query seed (any int64), made once per seed (making one is a device
    dispatch): the threefry key whose data is the seed's two 32-bit halves (two's
    complement), which `jax.random.key` gives with x64 on. Without x64 it keeps only the low
    half (2**32 would sample as 0). Seeds in [0, 2**32) keep the keys they always had; no
    seed's key is another's folded (`query_batch` folds group numbers into it)."""
    halves = np.array([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF], np.uint32)
    return jax.random.wrap_key_data(halves, impl="threefry2x32")


@functools.lru_cache(maxsize=256)
def _device_scalar(value, dtype: str) -> jax.Array:
    """A step's scalar input (a row, the stop token, a temperature ...) kept on the device,
    made once per value: as numpy it would cross from the host on every call
    (`docs/serving.md`). Arrays are immutable: sharing is safe."""
    return jax.device_put(np.asarray(value, dtype))


OVERFLOW_POLICIES = ("error", "slide")
DEFAULT_MAX_NEW_TOKENS = 32  # a query's limit when none is given (capped by the budget)
_MAX_TEMPERATURE = float(np.finfo(np.float32).max)  # the step takes a float32
NO_STOP = -1  # a `stop_token` that never stops generation: every requested token is made


def generation_width(limits, budget: Budget) -> int:
    """`steps.query`'s static max_new_cap for these per-branch limits: 1 when every branch
    wants only its first token (that program has no generation loop), else the budget's."""
    return 1 if max(limits) == 1 else budget.max_new_tokens


class Session:
    """One session row: frozen prefix, then appended data; queries never change it.

    Args:
      params: model parameters for `cfg`.
      cfg: model shape.
      budget: capacities (cells, chunk sizes, windows, question room, generation cap).
      tokenizer: text <-> ids; must fit the model's vocabulary.
      prefix: frozen prefix, text or token ids (kept across `"slide"` overflows).
      overflow: `"error"` or `"slide"` (module docstring).
      keep_fraction: share of the data region kept by `"slide"`, in (0, 1).
      stop_token: generation stops at this id, one of the tokenizer's (default: its eos);
        `NO_STOP` generates every requested token.
      impl: attention implementation for every step (`statejax.cache.IMPLS`).
      linear_impl: the blocks' linear layers in every step (`statejax.model.llama.
        LINEAR_IMPLS`: "xla", or "pallas" for the fused kernels, which read stacked or
        packed weights in place: `steps.model_params`).
    """

    def __init__(self, params, cfg: ModelConfig, budget: Budget, tokenizer: Tokenizer, *,
                 prefix: str | np.ndarray = "", overflow: str = "error",
                 keep_fraction: float = 0.5, stop_token: int | None = None,
                 impl: str = "reference", linear_impl: str = "xla"):
        if not isinstance(budget, Budget):
            raise InputError(f"budget is a {type(budget).__name__}; allowed: a "
                             "statejax.budget.Budget")
        if overflow not in OVERFLOW_POLICIES:
            raise InputError(f"overflow={overflow!r}; allowed: {OVERFLOW_POLICIES}")
        if not _is_real(keep_fraction) or not 0.0 < keep_fraction < 1.0:
            raise InputError(f"keep_fraction={keep_fraction!r}; allowed: 0 < keep_fraction < 1")
        if impl not in IMPLS:
            raise InputError(f"impl={impl!r}; allowed: {IMPLS}")
        steps.check_linear_impl(linear_impl)
        check_fits_vocab(tokenizer, cfg.vocab_size)
        stop = tokenizer.eos_id if stop_token is None else stop_token
        if not _is_int(stop) or not (stop == NO_STOP or 0 <= stop < tokenizer.vocab_size):
            raise InputError(f"stop_token={stop_token!r}; allowed: a token id in [0, "
                             f"{tokenizer.vocab_size}) or NO_STOP ({NO_STOP}: never stop)")
        self.params, self.cfg, self.budget, self.tokenizer = params, cfg, budget, tokenizer
        self.overflow, self.keep_fraction, self.impl = overflow, keep_fraction, impl
        self.linear_impl = linear_impl
        self.stop_token = int(stop)
        self._state = init_state(cfg, rows=1, cells=budget.cells)
        # Host mirror of the cells' tokens, and where each appended item starts (slide cuts
        # only at item boundaries so no item is kept in part).
        self._tokens = np.zeros((0,), np.int32)
        self._item_starts: list[int] = []
        self.prefix_len = 0
        self.evicted_tokens = 0
        prefix_ids = self._ids(prefix, "prefix", allow_empty=True)
        if prefix_ids.size:
            self._check_room(prefix_ids.size)
            self._prefill(prefix_ids)
            self.prefix_len = int(prefix_ids.size)

    # ------------------------------------------------------------------ data plane

    @property
    def length(self) -> int:
        """n, tokens in the session's cells (prefix + data)."""
        return int(self._tokens.size)

    @property
    def max_item_tokens(self) -> int:
        """The most tokens one appended item can ever have: the data region (cells after the
        prefix) under `"error"`, the kept data window under `"slide"`."""
        data_room = self.budget.cells - self.prefix_len
        return data_room if self.overflow == "error" else int(self.keep_fraction * data_room)

    @property
    def tokens(self) -> np.ndarray:
        """[n] int32 copy of the tokens in the session's cells."""
        return self._tokens.copy()

    @property
    def state(self):
        """The device `SessionState` (one row). Read only: steps donate it."""
        return self._state

    def append(self, data: str | np.ndarray):
        """Appends one item (text or [N] token ids) to the data region.

        Raises `InputError` for a wrong type, empty input, ids outside the vocabulary (from
        the tokenizer too), wrong dtype or rank, and `CapacityError` when the cells are full
        under the `"error"` policy; the session
        is unchanged in every failure. An error raised by a step (e.g. a kernel refusing the
        last chunk's shape after earlier chunks went in) also leaves it as it was: the item's
        tokens are rolled back (`_restore`).

        Returns:
          [V] float32 logits after the item's last token.
        """
        ids = self._ids(data, "append")
        if self.length + ids.size > self.budget.cells and self.overflow == "error":
            raise CapacityError(
                f"appending {ids.size} tokens to a session holding {self.length} of "
                f"{self.budget.cells} cells would overflow; free room: "
                f"{self.budget.cells - self.length} tokens (overflow='error'; use "
                f"overflow='slide' to drop the oldest data)")
        # The item-start list only grows before a step can fail (a slide replaces it after).
        before = (self._state, self._tokens, len(self._item_starts), self.evicted_tokens)
        try:
            if self.length + ids.size > self.budget.cells:
                return self._slide_and_append(ids)
            self._item_starts.append(self.length)
            return self._prefill(ids)
        except BaseException:
            self._restore(*before)
            raise

    def _restore(self, state, tokens, num_items, evicted_tokens):
        """Puts back what `append` found. A step that ran donated that state (its buffers are
        gone); the state it left holds the old cells and the new ones beyond, so the old
        length restores it (cells at or beyond a row's length are never read; `truncate`)."""
        if state is not self._state and state.k.is_deleted():
            state = self._state.replace(lengths=jnp.full((1,), tokens.size, jnp.int32))
        self._state, self._tokens, self.evicted_tokens = state, tokens, evicted_tokens
        del self._item_starts[num_items:]

    def truncate(self, n: int):
        """Keeps the first `n` cells (prefix_len <= n <= length) and drops the rest.

        Metadata only: cells at or beyond a row's length are never read and the next append
        overwrites them, so this is equivalent to re-prefilling the first `n` tokens into
        fresh cells. The request-driven baselines (`statejax.studies.baselines`) rewind with it.
        """
        if not _is_int(n) or not self.prefix_len <= n <= self.length:
            raise InputError(f"truncate(n={n!r}); allowed: an int in "
                             f"{self.prefix_len}..{self.length} (prefix_len..length)")
        self._state = self._state.replace(lengths=jnp.full((1,), n, jnp.int32))
        self._tokens = self._tokens[:n]
        self._item_starts = [s for s in self._item_starts if s < n]

    def _prefill(self, ids: np.ndarray):
        """Appends ids in chunks of at most the largest chunk size. ids: [N] int32."""
        logits = None
        for start in range(0, ids.size, self.budget.max_chunk):
            chunk = ids[start:start + self.budget.max_chunk]
            t = self.budget.chunk_bucket(chunk.size)
            padded = np.zeros((1, t), np.int32)
            padded[0, :chunk.size] = chunk
            window = self.budget.window_for(self.length + chunk.size)
            # numpy inputs go straight to the jitted call (no per-argument jnp dispatch).
            self._state, logits = steps.append(
                self.params, self._state, padded, np.asarray([chunk.size], np.int32),
                cfg=self.cfg, window=window, impl=self.impl, linear_impl=self.linear_impl)
            self._tokens = np.concatenate([self._tokens, chunk])
        return logits[0]

    def _slide_and_append(self, ids: np.ndarray):
        data_room = self.budget.cells - self.prefix_len
        keep_budget = self.max_item_tokens
        if ids.size > keep_budget:
            raise CapacityError(
                f"an item of {ids.size} tokens is larger than the kept data window of "
                f"{keep_budget} tokens (keep_fraction={self.keep_fraction} of {data_room})")
        data_end = self.length + ids.size
        cut = next((s for s in self._item_starts if data_end - s <= keep_budget), self.length)
        kept = np.concatenate([self._tokens[:self.prefix_len], self._tokens[cut:], ids])
        self.evicted_tokens += cut - self.prefix_len
        starts = [s - cut + self.prefix_len for s in self._item_starts if s >= cut]
        starts.append(self.length - cut + self.prefix_len)
        self._state = init_state(self.cfg, rows=1, cells=self.budget.cells)
        self._tokens = np.zeros((0,), np.int32)
        logits = self._prefill(kept)
        self._item_starts = starts
        return logits

    # ------------------------------------------------------------------ query plane

    def query(self, question: str | np.ndarray, max_new_tokens: int | None = None, *,
              temperature: float = 0.0, seed: int = 0) -> Answer:
        """Answers one question on a branch; the session's cells are left bit-identical.

        Args:
          question: text or [Tq] token ids, 1..budget.question_cells tokens.
          max_new_tokens: 1..min(256, budget.max_new_tokens); None: 32, or the budget's cap
            if smaller.
          temperature: 0 for greedy, else sampling temperature.
          seed: sampling seed (an int64).
        """
        return self.answer([self.prepare(question, max_new_tokens)], temperature=temperature,
                           seed=seed)[0]

    def query_batch(self, questions, max_new_tokens, *, temperature: float = 0.0,
                    seed: int = 0) -> list[Answer]:
        """Answers R questions as R branches of this session in as few steps as possible.

        Args:
          questions: R questions, text or token ids, each 1..question_cells tokens.
          max_new_tokens: R ints in 1..min(256, budget.max_new_tokens) (None: the default,
            as in `query`).
          temperature: 0 for greedy, else sampling temperature.
          seed: sampling seed.
        """
        for name, values in (("questions", questions), ("max_new_tokens", max_new_tokens)):
            if not isinstance(values, list | tuple):
                raise InputError(f"{name} is a {type(values).__name__}; allowed: a list or "
                                 "tuple (one entry per question)")
        if len(questions) != len(max_new_tokens) or not questions:
            raise InputError(f"need one max_new_tokens per question and at least one question;"
                             f" got {len(questions)} questions, {len(max_new_tokens)} limits")
        prepared = [self.prepare(q, m) for q, m in zip(questions, max_new_tokens, strict=True)]
        return self.answer(prepared, temperature=temperature, seed=seed)

    def prepare(self, question: str | np.ndarray, max_new_tokens: int | None = None) -> Question:
        """Checks and tokenises a question once, for `answer` (on any thread, no device work).

        Args:
          question: text or [Tq] token ids, 1 <= Tq <= budget.question_cells.
          max_new_tokens: as `query`.

        Returns:
          a `Question` with [Tq] int32 ids.

        Raises:
          InputError: wrong type, empty, too long, an id outside the vocabulary, a bad limit.
        """
        ids = self._ids(question, "query")
        if ids.size > self.budget.question_cells:
            raise InputError(f"question has {ids.size} tokens; the branch room allows at most "
                             f"{self.budget.question_cells} (budget.question_cells)")
        return Question(ids, self.validate_max_new_tokens(max_new_tokens),
                        question if isinstance(question, str) else None)

    def answer(self, questions: Sequence[Question], *, temperature: float = 0.0,
               seed: int = 0) -> list[Answer]:
        """Answers R prepared questions (`prepare`) as R branches, without re-encoding them.

        Args:
          questions: R >= 1 `Question`s from this session's `prepare`.
          temperature, seed: as `query`.

        Returns:
          R `Answer`s, in order.
        """
        if not isinstance(questions, list | tuple) or not questions or not all(
                isinstance(q, Question) for q in questions):
            raise InputError("answer takes a non-empty list of Questions (Session.prepare); got "
                             f"{type(questions).__name__}")
        for q in questions:  # prepared for other shapes (another session's budget)
            if q.ids.size > self.budget.question_cells or (
                    q.max_new_tokens > self.budget.max_new_tokens):
                raise InputError(f"{q!r} does not fit this session's budget (question_cells="
                                 f"{self.budget.question_cells}, max_new_tokens="
                                 f"{self.budget.max_new_tokens}); allowed: Session.prepare here")
        self.validate_sampling(temperature, seed)
        answers = []
        largest = self.budget.branch_rows[-1]
        for start in range(0, len(questions), largest):
            # Each group of branches draws its own samples (one key would repeat them).
            key = _rng_key(seed) if start == 0 else jax.random.fold_in(_rng_key(seed), start)
            answers += self._answer_rows(list(questions[start:start + largest]), temperature,
                                         key)
        return answers

    def _answer_rows(self, questions: list[Question], temperature, key) -> list[Answer]:
        limits = [q.max_new_tokens for q in questions]
        # One numpy array in and one out (`docs/serving.md`); the scalars stay on the device.
        answer = steps.query_packed(
            self.params, self._state, _device_scalar(0, "int32"),
            pack_questions(questions, self.budget),
            _device_scalar(self.stop_token, "int32"), _device_scalar(temperature, "float32"),
            key, _device_scalar(self.tokenizer.vocab_size, "int32"), cfg=self.cfg,
            window=self.budget.window_for(self.length), branch_cells=self.budget.branch_cells,
            max_new_cap=generation_width(limits, self.budget), impl=self.impl,
            linear_impl=self.linear_impl)
        tokens, num, gaps = unpack_answer(answer)
        answers = []
        for i, limit in enumerate(limits):
            # Gaps cover every emitted token, the stop token included.
            emitted = max(min(int(num[i]) + 1, limit), 1)
            toks = tokens[i, :num[i]].astype(np.int32)
            answers.append(Answer(text=self.tokenizer.decode(toks), tokens=toks,
                                  first_gap=float(gaps[i, 0]),
                                  min_gap=float(gaps[i, :emitted].min()),
                                  context_tokens=self.length))
        return answers

    # ------------------------------------------------------------------ validation

    def validate_sampling(self, temperature, seed):
        """Checks temperature (a real in [0, float32 max]: the step takes a float32) and seed
        (an int64)."""
        if not _is_real(temperature) or not 0 <= temperature <= _MAX_TEMPERATURE:
            raise InputError(f"temperature={temperature!r}; allowed: a number in "
                             f"[0, {_MAX_TEMPERATURE:.4g}] (finite, float32)")
        if not _is_int(seed) or not -2**63 <= seed < 2**63:
            raise InputError(f"seed={seed!r}; allowed: an int in [-2**63, 2**63)")

    def validate_max_new_tokens(self, max_new_tokens) -> int:
        """Checks 1 <= max_new_tokens <= min(256, budget.max_new_tokens); None means
        `DEFAULT_MAX_NEW_TOKENS` or that cap if smaller (the user asked for no limit). With
        stacked or packed weights (`statejax.model.layouts`) and XLA's linear layers the cap
        is 1: they run no generation loop (`steps.generates`)."""
        layout = layout_of(self.params)
        generates = steps.generates(self.params, self.linear_impl)
        cap = min(256, self.budget.max_new_tokens) if generates else 1
        if max_new_tokens is None:
            return min(DEFAULT_MAX_NEW_TOKENS, cap)
        if not _is_int(max_new_tokens):
            raise InputError(f"max_new_tokens={max_new_tokens!r}; allowed: an int in 1..{cap}")
        if not 1 <= max_new_tokens <= cap:
            why = ("" if generates else f" (this session's weights are {layout}, "
                   "statejax.model.layouts: first-token queries only with linear_impl 'xla'; "
                   "per-layer weights or linear_impl 'pallas' generate)")
            raise InputError(f"max_new_tokens={max_new_tokens}; allowed: 1..{cap}{why}")
        return int(max_new_tokens)

    def encode(self, text: str) -> np.ndarray:
        """Text -> [N] int32 ids (N >= 1), every id checked on this thread (no device work).

        Raises:
          InputError: not a str, empty text, text of no tokens, an id the tokenizer returns
            outside [0, V) (naming the id and its position).
        """
        if not isinstance(text, str):
            raise InputError(f"encode takes text (str); got {type(text).__name__}")
        return self._ids(text, "encode")

    def _ids(self, data, what: str, allow_empty: bool = False) -> np.ndarray:
        """Text or token ids -> [N] int32 ids checked against the vocabulary."""
        if isinstance(data, str):
            if not data and not allow_empty:
                raise InputError(f"{what} got empty text; allowed: at least one character")
            ids = encode_checked(self.tokenizer, data) if data else np.zeros((0,), np.int32)
            if data and ids.size == 0 and not allow_empty:
                raise InputError(f"text {data[:40]!r} encodes to no tokens with this "
                                 "tokenizer; allowed: text of at least one token")
            return ids
        if not isinstance(data, np.ndarray | jax.Array | list | tuple):
            raise InputError(f"{what} takes text (str) or token ids (a 1-D integer array); got "
                             f"{type(data).__name__}")
        if allow_empty and np.size(data) == 0:
            return np.zeros((0,), np.int32)
        return validate_token_ids(data, self.cfg.vocab_size)

    def _check_room(self, n: int):
        if n > self.budget.cells:
            raise CapacityError(f"a prefix of {n} tokens exceeds the session's "
                                f"{self.budget.cells} cells")


def _is_int(x) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)

