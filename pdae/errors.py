"""The project's user-facing exception."""

from __future__ import annotations


# One-line, user-actionable error: names the offending thing and the fix. The CLI prints it without a traceback.
class PdaeError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def brief(err: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message if it is short, else its type name (a message is never cut)."""
    first = (str(err).strip().splitlines() or [""])[0].strip()
    return first if first and len(first) <= limit else type(err).__name__
