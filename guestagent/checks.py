"""Checks that settings sections share (at the bottom of the import graph: a section's
``validate()`` uses them without importing ``guestagent.config``, which imports every
section)."""

from __future__ import annotations

from urllib.parse import urlsplit


def check_url(value: str, name: str, schemes: tuple[str, ...] = ("http", "https")) -> None:
    """Raise ``ValueError("<name>: ...")`` unless ``value`` is an absolute URL with a host."""
    try:
        parts = urlsplit(value)
        _ = parts.port
    except ValueError as exc:
        raise ValueError(f"{name}: bad URL {value!r}: {exc}") from None
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError(f"{name}: bad URL {value!r}: want {'/'.join(schemes)}://host[:port]")
