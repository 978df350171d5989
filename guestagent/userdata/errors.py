"""Errors of the user-data capability. Each message is one line saying what and where."""

from __future__ import annotations

import unicodedata


def bad_char(ch: str) -> bool:
    """Cc (C0/C1 controls: newline, CR, NUL, ESC, NEL) and Zl/Zp (line and paragraph
    separators, which Python's ``splitlines`` and some terminals treat as line breaks)."""
    return unicodedata.category(ch) in ("Cc", "Zl", "Zp")


def one_line(message: str) -> str:
    """``message`` as one printable line: control characters and line separators escaped
    (a newline becomes the two characters backslash and n), so an error never spans lines
    or moves a terminal's cursor."""
    if not any(bad_char(ch) for ch in message):
        return message
    return "".join(
        ch.encode("unicode_escape").decode("ascii") if bad_char(ch) else ch for ch in message
    )


class UserdataError(Exception):
    """User-data, a template parameter or a handler input was refused; nothing was changed.

    Its text is always one line: whatever part of the input it quotes is escaped."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class ApplyError(UserdataError):
    """A handler failed while applying; its files were restored."""
