"""JSON documents a user or a client writes (a job, a control request), read strictly.

``json.loads`` keeps the last of two equal keys in one object without a word: a job with
``"InstanceCount"`` twice runs with whichever came last, and the user never learns the
other was ignored. :func:`loads` refuses it, naming the key.
"""

from __future__ import annotations

import json
from typing import Any


class DuplicateKey(ValueError):
    """One JSON object names the same key twice."""

    def __init__(self, key: str) -> None:
        super().__init__(f"key {key!r} appears twice in one object: keep one")
        self.key = key


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for ``json.loads``: the object as a dict, or DuplicateKey."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(key)
        out[key] = value
    return out


def loads(text: str | bytes, **kwargs: Any) -> Any:
    """``json.loads`` refusing a repeated key (DuplicateKey, a ValueError)."""
    return json.loads(text, object_pairs_hook=unique_keys, **kwargs)
