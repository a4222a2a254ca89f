"""Errors raised for bad input. Every message names what was wrong and what is allowed."""


class InputError(ValueError):
    """Bad input from a caller: wrong value, dtype, rank or range. State is left unchanged."""


class CapacityError(InputError):
    """The session's cells are exhausted and its overflow policy is `error`."""


class SessionClosedError(RuntimeError):
    """An operation on a session that was closed."""
