"""One-line errors: the helper every module uses to reduce an exception to the line a user reads."""

from __future__ import annotations


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of ``err``'s message (its type name when it has none), at most ``limit`` characters."""
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:limit]
