"""The project's user-facing exception."""

from __future__ import annotations


# One-line, user-actionable error: names the offending thing and the fix. The CLI prints it without a traceback.
class PdaeError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
