"""Item encoders: what turns a pushed item into the text a `StreamingSession` ingests.

An encoder is any callable item -> non-empty str that raises `InputError` for an item it
does not take. `market_item` (OHLCV `Bar`s or text) is the streaming default.
"""

from collections.abc import Callable
from typing import Any

from statejax.data.market import Bar, format_bar
from statejax.errors import InputError

ItemEncoder = Callable[[Any], str]


def text_item(item: Any) -> str:
    """Takes text as it is: a non-empty str."""
    if not isinstance(item, str):
        raise InputError(f"push got a {type(item).__name__}; allowed: a non-empty str")
    if not item:
        raise InputError("push got empty text; allowed: at least one character")
    return item


def market_item(item: Any) -> str:
    """A `Bar` as its text line (`format_bar`), or text as it is."""
    if isinstance(item, Bar):
        item.validate()  # a Bar altered after construction must not slip through
        return format_bar(item)
    if isinstance(item, str):
        if not item:
            raise InputError("push got empty text; allowed: a Bar or at least one character")
        return item
    raise InputError(f"push got a {type(item).__name__}; allowed: a Bar or a non-empty str")
