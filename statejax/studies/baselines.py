"""Request-driven baselines inside the framework: same model, same steps, same budget.

Both engines drive a private `Session` and answer with `Session.query` (the same branch step as
the stateful path), so the only difference from a statejax session is how much of the context
each request prefills:

- `StatelessEngine`: the whole context, every request (engines without prefix caching).
- `PrefixCacheEngine`: only the part after the longest run of full pages identical to the
  previous prompt's (vLLM automatic prefix caching with one cached prompt).

Rewinding the private session is metadata only (`Session.truncate`): cells beyond a row's length
are never read, so a rewound session equals one prefilled into fresh cells.
"""

import hashlib

import numpy as np

from statejax.budget import Budget
from statejax.errors import CapacityError
from statejax.model.config import ModelConfig
from statejax.serving.question import Question
from statejax.serving.results import Answer
from statejax.serving.session import Session
from statejax.tokenizer import Tokenizer, validate_token_ids


class _RequestEngine:
    """A reusable session row that each request rewinds and refills."""

    def __init__(self, params, cfg: ModelConfig, budget: Budget, tokenizer: Tokenizer, *,
                 stop_token: int | None = None, impl: str = "reference",
                 linear_impl: str = "xla"):
        self.session = Session(params, cfg, budget, tokenizer, stop_token=stop_token,
                               impl=impl, linear_impl=linear_impl)

    def _check_context(self, context_ids) -> np.ndarray:
        """Context -> [N] int32 ids, 1 <= N <= budget.cells (the engine has no overflow)."""
        ids = validate_token_ids(context_ids, self.session.cfg.vocab_size)
        cells = self.session.budget.cells
        if ids.size > cells:
            raise CapacityError(f"context has {ids.size} tokens; the engine holds at most "
                                f"{cells} (budget.cells)")
        return ids

    def _check_request(self, context_ids, question, max_new_tokens, temperature, seed):
        """Checks a whole request before any cell changes, so a refused one changes nothing.

        Returns:
          ([N] int32 context ids, the prepared `Question`).
        """
        ids = self._check_context(context_ids)
        prepared = self.session.prepare(question, max_new_tokens)
        self.session.validate_sampling(temperature, seed)
        return ids, prepared

    def _answer(self, question: Question, temperature, seed) -> Answer:
        return self.session.answer([question], temperature=temperature, seed=seed)[0]


class StatelessEngine(_RequestEngine):
    """Every query re-prefills context + question.

    Args: as `Session` (`params`, `cfg`, `budget`, `tokenizer`, `stop_token`, `impl`,
    `linear_impl`).
    """

    def query(self, context_ids, question, max_new_tokens: int | None = None, *,
              temperature: float = 0.0, seed: int = 0) -> Answer:
        """Prefills `context_ids` ([N] int32, N >= 1) from cell 0, then answers on a branch.

        The context is appended in chunks of the budget's largest chunk size. Raises
        `InputError` (`CapacityError` for N > budget.cells) before touching the session.
        """
        ids, prepared = self._check_request(context_ids, question, max_new_tokens,
                                            temperature, seed)
        self.session.truncate(0)
        self.session.append(ids)
        return self._answer(prepared, temperature, seed)


def page_hashes(ids: np.ndarray, page_size: int) -> list[bytes]:
    """Chain hashes of the full pages of `ids` ([N] int32): h_i = H(h_{i-1}, page_i).

    A page's hash identifies the whole prefix up to its end, so equal hashes at page i mean
    equal prompts up to (i + 1) * page_size tokens.
    """
    hashes, prev = [], b""
    for start in range(0, ids.size - page_size + 1, page_size):
        page = np.ascontiguousarray(ids[start:start + page_size], np.int32)
        prev = hashlib.blake2b(prev + page.tobytes(), digest_size=16).digest()
        hashes.append(prev)
    return hashes


class PrefixCacheEngine(_RequestEngine):
    """vLLM-style automatic prefix caching: reuse the previous prompt's matching full pages.

    The engine keeps the cells of the previous prompt (the context ids; the question is always
    recomputed on a branch) and a chain hash per full page (`budget.page_size` tokens). A new
    prompt keeps the longest run of leading pages whose hashes match and recomputes the rest.
    Hashing the prompt is host work on the request's critical path, as in vLLM
    (`docs/serving.md`).

    Args: as `Session` (`params`, `cfg`, `budget`, `tokenizer`, `stop_token`, `impl`,
    `linear_impl`).

    Attributes:
      last_reused_tokens: cells kept from the previous prompt by the latest request.
    """

    def __init__(self, params, cfg: ModelConfig, budget: Budget, tokenizer: Tokenizer, *,
                 stop_token: int | None = None, impl: str = "reference",
                 linear_impl: str = "xla"):
        super().__init__(params, cfg, budget, tokenizer, stop_token=stop_token, impl=impl,
                         linear_impl=linear_impl)
        self._hashes: list[bytes] = []
        self.last_reused_tokens = 0

    def load(self, context_ids):
        """Makes the cached prompt `context_ids` ([N] int32, N >= 1), reusing matching pages.

        Raises `InputError` (`CapacityError` for N > budget.cells) with the cache unchanged.

        Returns:
          The number of cells kept from the previous prompt (also `last_reused_tokens`).
        """
        return self._load(self._check_context(context_ids))

    def _load(self, ids: np.ndarray) -> int:
        hashes = page_hashes(ids, self.session.budget.page_size)
        matched = 0
        for old, new in zip(self._hashes, hashes, strict=False):
            if old != new:
                break
            matched += 1
        reused = matched * self.session.budget.page_size
        self.session.truncate(reused)
        # Pages past `matched` are hashed into the cache only once their cells are written, so
        # an append whose step fails (the session rolls the item back) leaves a consistent cache.
        self._hashes = hashes[:matched]
        if reused < ids.size:
            self.session.append(ids[reused:])
        self._hashes = hashes
        self.last_reused_tokens = reused
        return reused

    def query(self, context_ids, question, max_new_tokens: int | None = None, *,
              temperature: float = 0.0, seed: int = 0) -> Answer:
        """Loads `context_ids` (reusing full pages of the previous prompt), answers on a branch.

        The whole request is checked first: a refused one keeps the cached prompt.
        """
        ids, prepared = self._check_request(context_ids, question, max_new_tokens,
                                            temperature, seed)
        self._load(ids)
        return self._answer(prepared, temperature, seed)
