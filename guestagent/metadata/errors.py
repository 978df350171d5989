"""Errors of the metadata client. Every message is one line that says what went wrong."""

from __future__ import annotations


class MetadataError(Exception):
    """Base of every metadata failure."""


class ServiceUnavailable(MetadataError):
    """The service could not be reached or kept failing (timeouts, resets, 5xx, token refused)."""


class BadAnswer(MetadataError):
    """The service answered, but the answer is not what the cloud documents."""
