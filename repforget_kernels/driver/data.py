"""Data for the unlearning driver: JSONL loading, encoding, batching.

The embedded benchmark's items come from ``benchmark.make_benchmark``; user splits come from JSONL files
(:func:`load_jsonl`). Items are ``{"prompt", "answer", ...}`` (question answering: the answer and EOS are
supervised) or ``{"text"}`` (every token supervised).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = [
    "DataError",
    "load_jsonl",
    "encode",
    "iterate_batches",
    "pad_rows",
    "split_rows",
]


class DataError(ValueError):
    """Bad user data: the message names the file and line (``path:LINE: what is wrong``) when from JSONL."""


def _parse_line(line: str, where: str) -> dict:
    """One JSONL record -> {"prompt", "answer"[, "domain"]} or {"text"}; DataError naming ``where``."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "text" in record and "prompt" not in record:
        if not isinstance(record["text"], str) or not record["text"].strip():
            raise DataError(f"{where}: 'text' must be a non-empty string")
        return {"text": record["text"]}
    missing = [key for key in ("prompt", "answer") if key not in record]
    if missing:
        raise DataError(f"{where}: expected keys 'prompt' and 'answer' (or 'text'), missing {missing}")
    for key in ("prompt", "answer"):
        if not isinstance(record[key], str) or not record[key].strip():
            raise DataError(f"{where}: '{key}' must be a non-empty string, got {record[key]!r}")
    item = {"prompt": record["prompt"], "answer": record["answer"]}
    if isinstance(record.get("domain"), str):
        item["domain"] = record["domain"]
    return item


def load_jsonl(path: str | Path, split: str) -> list[dict]:
    """Read a user split (``split`` names it in errors): one JSON object per line, ``{"prompt", "answer"}`` or
    ``{"text"}``; blank lines skipped.

    Raises DataError ``path:LINE: what is wrong`` on a bad line, ``split 'NAME' is empty: path`` when no
    record is found, and ``path: no such file`` when it does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (split '{split}')")
    items = []
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {exc.start + 1} of the line); "
                                "JSONL files must be UTF-8") from None
            if line.strip():
                items.append(_parse_line(line, f"{path}:{lineno}"))
    if not items:
        raise DataError(f"split '{split}' is empty: {path}")
    return items


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _answer_ids(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt and answer, the answer tokenised in context (BPE merges across the space)."""
    prompt_ids = _ids(tokenizer, prompt)
    full_ids = _ids(tokenizer, prompt + " " + answer)
    if full_ids[:len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        return prompt_ids, full_ids[len(prompt_ids):]
    return prompt_ids, _ids(tokenizer, " " + answer)


def _example_ids(tokenizer, item: dict, max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one item, truncated to max_length keeping the answer (prompt cut from the left)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if "text" in item:
        ids = (bos + _ids(tokenizer, item["text"]) + eos)[:max_length]
        return ids, [-100] * len(bos) + ids[len(bos):]
    prompt_ids, answer_ids = _answer_ids(tokenizer, item["prompt"], item["answer"])
    answer_ids = (answer_ids + eos)[:max_length - len(bos) - 1]
    keep = max_length - len(bos) - len(answer_ids)  # >= 1 prompt token survives
    prompt_ids = bos + prompt_ids[max(0, len(prompt_ids) - keep):]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def encode(tokenizer, examples: list[dict], max_length: int = 64) -> dict[str, torch.Tensor]:
    """Tokenise items into right-padded tensors.

    Returns ``input_ids`` (N, T) long, ``attention_mask`` (N, T) long (1 = real token) and ``labels``
    (N, T) long, aligned with input_ids (the model shifts): -100 on the prompt, on padding and on a
    leading BOS; answer tokens and the EOS supervised; for ``{"text"}`` items every real token is.
    T is the longest example, at most ``max_length``; a too-long prompt is cut from the left so the
    answer survives. Cost: one tokenizer call per item.
    """
    if not isinstance(examples, list) or not examples:
        raise ValueError(f"examples must be a non-empty list of dicts, got {type(examples).__name__} "
                         f"of length {len(examples) if hasattr(examples, '__len__') else '?'}")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    rows = []
    for i, item in enumerate(examples):
        if not isinstance(item, dict) or not ("text" in item or {"prompt", "answer"} <= item.keys()):
            raise ValueError(f"examples[{i}] must be a dict with 'prompt' and 'answer' or 'text', got {item!r}")
        rows.append(_example_ids(tokenizer, item, max_length))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return pad_rows(rows, pad)


def pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (token ids, labels) pairs of equal per-row length into an encode()-style dict of (N, T) longs."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (N, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (N, T)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)  # (N, T)
    for i, (ids, labs) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, :len(ids)] = 1
        labels[i, :len(labs)] = torch.tensor(labs, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def split_rows(encoded: dict) -> list[tuple[list[int], list[int]]]:
    """Each encoded row as (prompt ids, supervised ids): the prompt is every real token before the first
    supervised label (BOS included), the supervised ids the rest of the real tokens (answer, EOS)."""
    rows = []
    for ids, mask, labels in zip(encoded["input_ids"], encoded["attention_mask"], encoded["labels"]):
        real = int(mask.sum())
        supervised = (labels[:real] != -100).nonzero().flatten()
        start = int(supervised[0]) if len(supervised) else real
        rows.append((ids[:start].tolist(), ids[start:real].tolist()))
    return rows


def iterate_batches(encoded: dict, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[dict]:
    """Yield batches of an encode() output (every tensor key with N rows is sliced; others pass through).

    Each batch is trimmed to its longest real sequence (trailing all-padding columns dropped from every
    (B, T) tensor). ``shuffle`` permutes rows with a generator seeded by ``seed`` (same order each call).
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if "attention_mask" not in encoded or "input_ids" not in encoded:
        raise ValueError(f"encoded must be an encode() output with input_ids and attention_mask, got keys {list(encoded)}")
    n, width = encoded["input_ids"].shape
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]  # (B,)
        used = int(encoded["attention_mask"][idx].sum(1).max())
        batch = {}
        for key, value in encoded.items():
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == n:
                value = value[idx]
                if value.dim() >= 2 and value.shape[1] == width:
                    value = value[:, :used]
            batch[key] = value
        yield batch
