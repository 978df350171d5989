"""``guestagent userdata validate``: everything the applier would refuse, without applying.

Shell parts get ``sh -n``; ``#cloud-config`` gets cloud-init's schema check when
cloud-init is installed here, and our own handlers' checks (values, SSH keys, sudo rules
through ``visudo -cf``)."""

from __future__ import annotations

from collections import Counter

from guestagent.userdata import cloudconfig, parts
from guestagent.userdata.apply import check_script, prepare
from guestagent.userdata.errors import UserdataError
from guestagent.userdata.handlers import Context, all_handlers
from guestagent.userdata.settings import UserdataSettings
from guestagent.userdata.tree import Tree


def validate(data: bytes, settings: UserdataSettings) -> tuple[str, list[str]]:
    """(summary, warnings); raises UserdataError for the first problem found."""
    warnings: list[str] = []
    prepared = prepare(data, settings)
    decoded = (
        parts.decode(data, settings.max_size, settings.max_decoded_size) if data.strip() else b""
    )
    split = parts.split(decoded) if decoded else []
    for part in split:
        if part.kind == parts.SHELL:
            check_script(part)
        elif part.kind == parts.CLOUD_CONFIG:
            errors = cloudconfig.schema_errors(part.content.decode(), settings.cloud_init)
            if errors is None:
                warnings.append("cloud-init not installed here: schema not checked")
            elif errors:
                raise UserdataError(f"{part.name}: cloud-init schema: {'; '.join(errors)}")
        else:
            warnings.append(f"{part.name}: {part.skipped_because()}")
    with Tree("/", dry_run=True) as tree:
        ctx = Context(tree, settings)
        for handler in all_handlers():
            handler.plan(prepared.config, ctx)
    warnings += [
        f"{k}: not supported by guestagent (only cloud-init applies it)"
        for k in prepared.unsupported_keys
    ]
    kinds = Counter(p.kind for p in split)
    summary = ", ".join(f"{n} {k}" for k, n in kinds.items()) or "empty"
    return summary, warnings
