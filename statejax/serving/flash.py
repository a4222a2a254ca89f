"""What streaming queries and flash queries return: answers with their data's sequence number.

Used by `statejax.serving.streaming`; kept apart so that readers of results (studies,
notebooks, listeners) need not import the threading machinery.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


def confidence_from_gap(min_gap: float) -> float:
    """Maps a logit gap to a confidence in [0.5, 1).

    confidence = sigmoid(min_gap) = 1 / (1 + exp(-min_gap)), where min_gap is the smallest
    top-1 minus top-2 logit gap over an answer's generated tokens. It is the probability the
    model gives its chosen token against the runner-up alone (a two-way softmax), at the
    answer's least certain step: 0.5 means a tie somewhere, near 1 means every step was clear.

    Args:
      min_gap: logit gap (natural-log units), >= 0 for greedy decoding.

    Returns:
      confidence, a float in [0.5, 1) for min_gap >= 0.
    """
    return 1.0 / (1.0 + math.exp(-float(min_gap)))


@dataclasses.dataclass(frozen=True)
class QueryResult:
    """A user query's answer and the data it saw.

    Attributes:
      text: decoded answer (stop token excluded).
      tokens: [G'] int32 generated tokens.
      first_gap: top-1 minus top-2 logit of the first generated token.
      min_gap: smallest such gap over the generated tokens.
      context_tokens: n, session cells the query attended to.
      seq: sequence number of the newest item in those cells (-1: none yet).
      latency_s: seconds from the call to the answer, waiting for the device included.
    """

    text: str
    tokens: np.ndarray
    first_gap: float
    min_gap: float
    context_tokens: int
    seq: int
    latency_s: float

    @property
    def confidence(self) -> float:
        """`confidence_from_gap(min_gap)`, in [0.5, 1)."""
        return confidence_from_gap(self.min_gap)


@dataclasses.dataclass(frozen=True)
class FlashQuery:
    """A registered question: evaluated after data arrives, greedy, up to max_new_tokens."""

    flash_id: int
    question: str
    max_new_tokens: int


@dataclasses.dataclass(frozen=True)
class FlashAnswer:
    """A flash query's cached answer.

    Attributes:
      flash_id, question: the registered question.
      text, tokens, first_gap, min_gap, context_tokens: as in `QueryResult`.
      confidence: `confidence_from_gap(min_gap)`, in [0.5, 1).
      seq: ingested_seq the answer reflects (-1: prefix only).
      evaluated_at: `time.monotonic()` when the evaluation finished, in seconds.
    """

    flash_id: int
    question: str
    text: str
    tokens: np.ndarray
    first_gap: float
    min_gap: float
    confidence: float
    context_tokens: int
    seq: int
    evaluated_at: float


@dataclasses.dataclass(frozen=True)
class FlashEvent:
    """A flash answer's text changed (previous is None for the first answer)."""

    flash_id: int
    previous: FlashAnswer | None
    current: FlashAnswer


@dataclasses.dataclass(frozen=True)
class FlashResult:
    """What `ask` returns.

    Attributes:
      text, tokens, first_gap, min_gap, confidence, context_tokens: the answer.
      seq: ingested_seq the answer reflects.
      items_behind: ingested items the answer has not seen (ingested_seq - seq); 0 = fresh.
      hit: True when served from the flash cache with no device work.
      flash_id: the matching registered question, or None.
      latency_s: seconds from the call to the answer.
    """

    text: str
    tokens: np.ndarray
    first_gap: float
    min_gap: float
    confidence: float
    context_tokens: int
    seq: int
    items_behind: int
    hit: bool
    flash_id: int | None
    latency_s: float
