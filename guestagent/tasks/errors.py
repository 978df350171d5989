"""Errors of the task launcher."""

from __future__ import annotations


class JobError(ValueError):
    """A job description (JSON or job.cfg) is refused; the message says where and what to do.

    Raised before anything is stored, downloaded or run.
    """


class TaskError(Exception):
    """A job could not be run, found or stopped (state store, runner, daemon)."""
