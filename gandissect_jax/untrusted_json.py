"""Parsing JSON that strangers may have written, with every failure a ``json.JSONDecodeError``.

``json.load`` raises ``RecursionError`` (not a ``ValueError``) on arrays or objects nested a few
thousand levels deep, so a 200 kB ``labels.json``, checkpoint ``config.json``, ``dissect.json`` or
``.progress/settings.json`` of ``[[[[...]]]]`` escaped every reader's ``except ValueError`` /
``except json.JSONDecodeError`` as a traceback. :func:`load` and :func:`loads` are ``json.load``
and ``json.loads`` with that failure turned into a :class:`JSONNestingError`, a subclass of
``json.JSONDecodeError`` (itself a ``ValueError``), so each reader's existing handler names the
file as it does for any other malformed JSON.
"""

from __future__ import annotations

import json
from typing import IO, Any


class JSONNestingError(json.JSONDecodeError):
    """The document nests arrays or objects deeper than Python's JSON parser can follow."""


def loads(text: str | bytes) -> Any:
    """``json.loads(text)``; JSONNestingError (a json.JSONDecodeError) instead of RecursionError."""
    try:
        return json.loads(text)
    except RecursionError:
        doc = text.decode("utf-8", "replace") if isinstance(text, (bytes, bytearray)) else text
        raise JSONNestingError("arrays or objects nested too deeply to be a document of ours", doc, 0) from None


def load(handle: IO) -> Any:
    """``json.load(handle)``; JSONNestingError (a json.JSONDecodeError) instead of RecursionError."""
    return loads(handle.read())


__all__ = ["JSONNestingError", "load", "loads"]
