"""Errors of the user-data capability. Each message is one line saying what and where."""

from __future__ import annotations


class UserdataError(Exception):
    """User-data, a template parameter or a handler input was refused; nothing was changed."""


class ApplyError(UserdataError):
    """A handler failed while applying; its files were restored."""
