"""What queries return: one `Answer`, and the results that wrap it with the data it saw.

`Answer` is the model's reply; `QueryResult` and `FlashResult` add where in the stream it was
made and how it was served. Kept apart from the threading machinery so that readers of
results (studies, notebooks, listeners) need not import it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


def confidence_from_gap(min_gap: float) -> float:
    """Maps a logit gap to a confidence in [0.5, 1).

    confidence = sigmoid(min_gap): the probability the model gives its chosen token against
    the runner-up alone (a two-way softmax), at the answer's least certain step. 0.5 means a
    tie somewhere; near 1 means every step was clear.

    Args:
      min_gap: top-1 minus top-2 logit (natural-log units), >= 0 for greedy decoding.

    Returns:
      confidence, a float in [0.5, 1) for min_gap >= 0.
    """
    return 1.0 / (1.0 + math.exp(-float(min_gap)))


@dataclasses.dataclass(frozen=True, repr=False)
class Answer:
    """The model's reply to one question.

    Attributes:
      text: decoded answer (stop token excluded).
      tokens: [G'] int32 generated tokens.
      first_gap: top-1 minus top-2 logit of the first generated token.
      min_gap: smallest such gap over the generated tokens (the answer's confidence).
      context_tokens: n, the session cells the question attended to.
    """

    text: str
    tokens: np.ndarray
    first_gap: float
    min_gap: float
    context_tokens: int

    @property
    def confidence(self) -> float:
        """`confidence_from_gap(min_gap)`, in [0.5, 1)."""
        return confidence_from_gap(self.min_gap)

    def __repr__(self) -> str:
        # The token ids are noise next to their text: shown as a count.
        return (f"Answer(text={self.text!r}, confidence={self.confidence:.3f}, "
                f"first_gap={self.first_gap:.3g}, min_gap={self.min_gap:.3g}, "
                f"tokens=<{self.tokens.size} ids>, context_tokens={self.context_tokens})")


@dataclasses.dataclass(frozen=True)
class QueryResult:
    """A streaming query's answer and the data it saw.

    Attributes:
      answer: the `Answer`.
      seq: sequence number of the newest item in the cells it read (-1: none yet).
      latency_s: seconds from the call to the answer, waiting for the device included.
    """

    answer: Answer
    seq: int
    latency_s: float


@dataclasses.dataclass(frozen=True)
class FlashAnswer:
    """A flash query's cached answer.

    Attributes:
      flash_id: the registered question's id.
      answer: the `Answer`.
      seq: the newest ingested item when it was evaluated (-1: prefix only).
      evaluated_at: `time.monotonic()` when the evaluation finished, in seconds.
    """

    flash_id: int
    answer: Answer
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
    """What `StreamingSession.ask` returns.

    Attributes:
      answer: the `Answer`.
      seq: the newest ingested item the answer reflects (-1: prefix only).
      items_behind: items processed after `seq` that the answer does not reflect: ingested
        since it was evaluated, or refused. 0 means nothing processed is missing from it.
      refused: items refused so far (`StreamingSession.failures`); their data is in no answer.
      hit: True when served from the flash cache with no device work.
      flash_id: the matching registered question, or None.
      latency_s: seconds from the call to the answer.
    """

    answer: Answer
    seq: int
    items_behind: int
    refused: int
    hit: bool
    flash_id: int | None
    latency_s: float
