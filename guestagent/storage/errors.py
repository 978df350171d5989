"""Errors of the storage capability. Every message is one line a user can act on."""

from __future__ import annotations


class StorageError(Exception):
    """A transfer, listing or mount failed; the message says what and what to do."""


class BadInput(StorageError):
    """The request itself is wrong (URL, key, path, mapping, archive); nothing was changed."""


class RemoteError(StorageError):
    """The object store answered with an error (status and S3 error code kept)."""

    def __init__(self, message: str, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class AccessDenied(RemoteError):
    """403: the credentials were refused or lack the permission."""


class NotFound(RemoteError):
    """404: no such bucket or object."""


class Unavailable(StorageError):
    """The object store or the credential service could not be reached in time."""
