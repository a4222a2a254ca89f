"""Errors raised for bad input. Every message names what was wrong and what is allowed."""


class InputError(ValueError):
    """Bad input from a caller: wrong value, dtype, rank or range. State is left unchanged."""


class CapacityError(InputError):
    """The session's cells are exhausted and its overflow policy is `error`."""


class ItemsRefusedError(InputError):
    """Pushed items the session refused; each left it as it was and is in no answer.

    Attributes:
      refused: {seq: the exception that refused it}, in sequence order.
    """

    def __init__(self, refused: dict[int, Exception]):
        self.refused = dict(sorted(refused.items()))
        reasons = "; ".join(f"seq {seq}: {type(e).__name__}: {e}"
                            for seq, e in self.refused.items())
        super().__init__(f"{len(self.refused)} pushed item(s) were refused and are in no "
                         f"answer: {reasons}")


class SessionClosedError(RuntimeError):
    """An operation on a session that was closed."""
