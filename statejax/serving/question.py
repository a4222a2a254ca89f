"""A question checked and tokenised once: `Session.prepare` makes it, every query path takes it.

`StreamingSession.query`, flash registration and the request-driven baselines prepare a
question on the caller's thread; the device path (`Session.answer`) then packs its ids
without checking or encoding them again.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Question:
    """A validated question for one session's shapes.

    Attributes:
      ids: [Tq] int32 token ids, read only, 1 <= Tq <= budget.question_cells, each in
        [0, V) of the session's tokenizer.
      max_new_tokens: tokens to generate, 1..the session's cap.
      text: the text it was encoded from, or None when given as token ids.
    """

    ids: np.ndarray
    max_new_tokens: int
    text: str | None = None

    def __post_init__(self):
        # Read only: a question checked once must not change after its check.
        ids = np.array(self.ids, np.int32)
        ids.setflags(write=False)
        object.__setattr__(self, "ids", ids)

    def _key(self) -> tuple:
        return self.text, self.ids.tobytes(), self.max_new_tokens

    def __eq__(self, other) -> bool:
        return isinstance(other, Question) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        shown = f"text={self.text!r}" if self.text is not None else f"ids={self.ids.tolist()}"
        return f"Question({shown}, max_new_tokens={self.max_new_tokens})"
