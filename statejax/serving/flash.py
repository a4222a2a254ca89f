"""The flash registry: registered questions and their cached answers.

Not thread-safe on its own: `StreamingSession` calls it under its host lock.
"""

from __future__ import annotations

import dataclasses
import itertools

from statejax.errors import InputError
from statejax.serving.question import Question
from statejax.serving.results import FlashAnswer, FlashEvent


@dataclasses.dataclass(frozen=True)
class FlashQuery:
    """A registered question (text), evaluated greedily after data arrives."""

    flash_id: int
    question: Question


class FlashRegistry:
    """Registered flash queries by id and by text, and the latest answer of each.

    Attributes:
      dirty: the registry or the data changed since the last evaluation began.
    """

    def __init__(self):
        self._entries: dict[int, FlashQuery] = {}
        self._by_text: dict[str, list[int]] = {}  # text -> ids, so `find` is O(1)
        self._answers: dict[int, FlashAnswer] = {}
        self._ids = itertools.count()
        self.dirty = False

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, question: Question) -> FlashQuery:
        """Registers a prepared question (with text); returns its entry, id >= 0."""
        entry = FlashQuery(next(self._ids), question)
        self._entries[entry.flash_id] = entry
        self._by_text.setdefault(question.text, []).append(entry.flash_id)
        self.dirty = True
        return entry

    def get(self, flash_id) -> FlashQuery:
        """The entry of `flash_id`; InputError naming the registered ids if unknown."""
        if flash_id not in self._entries:
            raise InputError(f"unknown flash id {flash_id!r}; registered: "
                             f"{sorted(self._entries)}")
        return self._entries[flash_id]

    def remove(self, flash_id) -> None:
        """Removes an entry and its cached answer; InputError if unknown."""
        text = self.get(flash_id).question.text
        del self._entries[flash_id]
        self._by_text[text].remove(flash_id)
        if not self._by_text[text]:
            del self._by_text[text]
        self._answers.pop(flash_id, None)

    def find(self, text: str, max_new_tokens: int | None) -> FlashQuery | None:
        """The first entry asking `text` with this limit (None: any limit), else None."""
        for i in self._by_text.get(text, ()):
            if max_new_tokens in (None, self._entries[i].question.max_new_tokens):
                return self._entries[i]
        return None

    def entries(self) -> list[FlashQuery]:
        """Every entry, in id order."""
        return [self._entries[i] for i in sorted(self._entries)]

    def answer(self, flash_id: int) -> FlashAnswer | None:
        """The cached answer of a registered id, or None before its first evaluation."""
        return self._answers.get(self.get(flash_id).flash_id)

    def store(self, current: FlashAnswer) -> FlashEvent | None:
        """Caches an answer; returns the event when its text changed (None if unchanged or
        the entry was unregistered meanwhile)."""
        if current.flash_id not in self._entries:
            return None
        previous = self._answers.get(current.flash_id)
        self._answers[current.flash_id] = current
        if previous is None or previous.answer.text != current.answer.text:
            return FlashEvent(current.flash_id, previous, current)
        return None
