"""Atomic file writes and strict JSON for the driver's outputs (reports, plots, state).

Every file is written to a temporary file beside its destination, flushed and fsynced, then moved over
it with ``os.replace``: a reader sees the old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "json_safe", "atomic_write_json"]


def atomic_write(path, write) -> None:
    """Call ``write(handle)`` on a temporary binary file next to ``path``, fsync, then os.replace it onto
    ``path``: readers see the old file or the new one, never half of one; the temporary goes on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and os.replace: readers see old or new, never half."""
    atomic_write(Path(path), lambda h: h.write(text.encode("utf-8")))


def json_safe(obj):
    """``obj`` with every NaN / Inf float (in dicts, lists, tuples) replaced by None: strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path, obj) -> None:
    """Atomically write ``obj`` as indented strict JSON (undefined numbers, NaN / Inf, stored as None)."""
    atomic_write_text(path, json.dumps(json_safe(obj), indent=1, allow_nan=False) + "\n")
