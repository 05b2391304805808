"""Resumable, checksummed state of a driver run (``OUT/state/``), and the fingerprint it belongs to.

Every JSON file in the state carries its own checksum: it is stored as
``{"sha256": <hex digest of the canonical JSON of data>, "data": ...}``; a checkpoint (``.pt``) is
verified against the digest recorded in the JSON written after it (the stage record that says the
checkpoint exists). A file that is truncated, empty, hand-edited or otherwise damaged is therefore
detected when it is read, and reported as :class:`StateCorrupt` naming the file and the remedy,
never used. Every write goes through a temporary file and ``os.replace`` (``report.atomic_write``),
so a reader sees an old file or a new one, never half of one.

The fingerprint (:func:`content_digest`, :func:`model_identity`) identifies what a state was computed
from by content, not by path: the items of every data split and the bytes of the model's files.
Rerunning into the same ``OUT`` with edited data or other weights is a :class:`StateMismatch`
(or a fresh state with ``--restart``).
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import Optional

from .files import atomic_write, json_safe

__all__ = [
    "StateError",
    "StateMismatch",
    "StateCorrupt",
    "content_digest",
    "file_digest",
    "model_identity",
    "StateDir",
]

# Files of a Hugging Face model directory that decide its numbers (weights, config, tokenizer).
_MODEL_FILE_PATTERNS = ("config.json", "generation_config.json", "*.safetensors", "*.bin", "*.pt",
                        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                        "merges.txt", "tokenizer.model", "chat_template.jinja", "*.index.json")
_CHUNK = 1 << 22  # bytes per read while hashing


class StateError(ValueError):
    """A problem with OUT/state that the user must resolve; the message says how (one line)."""


class StateMismatch(StateError):
    """OUT/state belongs to a different configuration (model, data, diagnostics or run spec)."""


class StateCorrupt(StateError):
    """A state file is damaged (unreadable, truncated or failing its checksum)."""


def _canonical(obj) -> bytes:
    return json.dumps(json_safe(obj), sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def content_digest(obj) -> str:
    """sha256 (hex) of the canonical JSON of ``obj`` (sorted keys, no whitespace, NaN as null)."""
    return hashlib.sha256(_canonical(obj)).hexdigest()


def file_digest(path) -> str:
    """sha256 (hex) of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def model_identity(path) -> dict:
    """{relative file name: sha256} of the files of a model directory that decide its numbers.

    Weights, config and tokenizer files (not README or info files). Cost: one read of every weight
    byte (about 10-30 s for a 7B model in bf16; milliseconds for the embedded model).
    """
    root = Path(path)
    files = sorted({p for pattern in _MODEL_FILE_PATTERNS for p in root.glob(pattern) if p.is_file()})
    if not files:
        raise StateError(f"{root}: no model files (config, weights, tokenizer) to identify the model by")
    return {p.name: file_digest(p) for p in files}


class _HashingWriter(io.RawIOBase):
    """A write-only file that feeds every byte into ``digest`` on its way to ``handle``."""

    def __init__(self, handle, digest):
        super().__init__()
        self.handle, self.digest = handle, digest

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.digest.update(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


class StateDir:
    """Checksummed JSON records and verified checkpoints under one directory (see the module docstring).

    ``remedy`` is appended to every StateCorrupt message (how to recover: delete the file, or restart).
    """

    def __init__(self, root, remedy: str = "delete that file to recompute it, or rerun with --restart"):
        self.root = Path(root)
        self.remedy = remedy

    def path(self, rel) -> Path:
        return self.root / rel

    def exists(self, rel) -> bool:
        return self.path(rel).exists()

    def clear(self) -> None:
        """Remove the whole state (``--restart``)."""
        shutil.rmtree(self.root, ignore_errors=True)

    def _corrupt(self, rel, what: str, remedy: Optional[str] = None) -> StateCorrupt:
        return StateCorrupt(f"state file {self.path(rel)} is damaged ({what}); {remedy or self.remedy}")

    def write_json(self, rel, data) -> str:
        """Write ``data`` (JSON-ready; NaN / Inf stored as null) with its checksum; returns the digest."""
        data = json_safe(data)
        digest = content_digest(data)
        text = json.dumps({"sha256": digest, "data": data}, indent=1, allow_nan=False) + "\n"
        atomic_write(self.path(rel), lambda h: h.write(text.encode("utf-8")))
        return digest

    def read_json(self, rel, remedy: Optional[str] = None):
        """The data of a record written by :meth:`write_json`; StateCorrupt (with ``remedy``, else the
        directory's) if it does not verify."""
        path = self.path(rel)
        try:
            record = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._corrupt(rel, f"not valid JSON: {exc}", remedy) from None
        if not isinstance(record, dict) or set(record) != {"sha256", "data"}:
            raise self._corrupt(rel, "not a checksummed record", remedy)
        if content_digest(record["data"]) != record["sha256"]:
            raise self._corrupt(rel, "checksum mismatch", remedy)
        return record["data"]

    def save_torch(self, rel, obj) -> str:
        """torch.save ``obj`` atomically; returns the sha256 of the bytes written (record it in a JSON)."""
        import torch

        digest = hashlib.sha256()

        def write(handle):
            torch.save(obj, _HashingWriter(handle, digest))  # hashed as written: no second copy in memory

        atomic_write(self.path(rel), write)
        return digest.hexdigest()

    def load_torch(self, rel, digest: str, **load_kwargs):
        """torch.load a checkpoint after checking its bytes against ``digest``; StateCorrupt otherwise."""
        import torch

        path = self.path(rel)
        if not path.is_file():
            raise self._corrupt(rel, "missing, though a finished record names it")
        if file_digest(path) != digest:
            raise self._corrupt(rel, "checksum mismatch")
        return torch.load(path, weights_only=True, **load_kwargs)

    def remove(self, rel) -> None:
        self.path(rel).unlink(missing_ok=True)
