"""Moved: the service contract lives in :mod:`guestagent.service` (the bottom of the import
graph). This name stays so code written against it keeps working."""

from guestagent.service import Service

__all__ = ["Service"]
