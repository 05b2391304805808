"""Data for the unlearning driver: loading user splits, encoding, batching.

The embedded benchmark's items come from ``benchmark.make_benchmark``; user splits come from files
(:func:`load_split`): JSONL or a JSON array (:func:`load_jsonl`), parquet, or a Hugging Face ``datasets``
directory written by ``save_to_disk`` (both read through the ``datasets`` library). Records are
``{"prompt", "answer"}`` or TOFU's ``{"question", "answer"[, "paraphrased_answer"][, "perturbed_answer":
[...]]}`` (Maini et al. 2024; question answering: the answer and EOS are supervised; the paraphrased and
perturbed answers are kept for the truth ratio) or ``{"text"}`` (every token supervised; a text longer
than ``max_length`` tokens becomes several overlapping windows, see :func:`encode`).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = [
    "DataError",
    "load_jsonl",
    "load_split",
    "parse_record",
    "position_ids",
    "encode",
    "iterate_batches",
    "pad_rows",
    "split_rows",
]


class DataError(ValueError):
    """Bad user data: the message names the file and line (``path:LINE: what is wrong``) when from JSONL."""


def _text(record: dict, key: str, where: str) -> str:
    if not isinstance(record[key], str) or not record[key].strip():
        raise DataError(f"{where}: '{key}' must be a non-empty string, got {record[key]!r}")
    return record[key]


def parse_record(record, where: str) -> dict:
    """One record -> {"prompt", "answer"[, "paraphrased_answer", "perturbed_answer", "domain", "entity"]} or
    {"text"}; TOFU's ``question`` is the prompt. DataError naming ``where`` otherwise."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "text" in record and "prompt" not in record and "question" not in record:
        return {"text": _text(record, "text", where)}
    prompt_key = "prompt" if "prompt" in record else "question"
    missing = [key for key in (prompt_key, "answer") if key not in record]
    if missing:
        raise DataError(f"{where}: expected keys 'prompt' (or TOFU's 'question') and 'answer', or 'text'; "
                        f"missing {missing}")
    item = {"prompt": _text(record, prompt_key, where), "answer": _text(record, "answer", where)}
    if record.get("paraphrased_answer") is not None:
        item["paraphrased_answer"] = _text(record, "paraphrased_answer", where)
    if record.get("perturbed_answer") is not None:
        perturbed = record["perturbed_answer"]
        perturbed = [perturbed] if isinstance(perturbed, str) else perturbed
        if not isinstance(perturbed, list) or not perturbed or not all(isinstance(a, str) and a.strip()
                                                                        for a in perturbed):
            raise DataError(f"{where}: 'perturbed_answer' must be a non-empty list of non-empty strings, "
                            f"got {record['perturbed_answer']!r}")
        item["perturbed_answer"] = list(perturbed)
    for key in ("domain", "entity"):
        if isinstance(record.get(key), str):
            item[key] = record[key]
    return item


def _parse_line(line: str, where: str) -> dict:
    """One JSONL line -> parse_record's item; DataError naming ``where``."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    return parse_record(record, where)


def load_jsonl(path: str | Path, split: str) -> list[dict]:
    """Read a user split (``split`` names it in errors) from a JSON file: one JSON object per line (JSONL, blank
    lines skipped) or one JSON array of objects; records as :func:`parse_record` takes them.

    Raises DataError ``path:LINE: what is wrong`` on a bad line (``path: record I: ...`` in an array),
    ``split 'NAME' is empty: path`` when no record is found, and ``path: no such file`` when it does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (split '{split}')")
    raw = path.read_bytes()
    if raw.lstrip()[:1] == b"[":
        try:
            records = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text (byte {exc.start + 1}); JSON files must be UTF-8") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        items = [parse_record(record, f"{path}: record {i}") for i, record in enumerate(records)]
    else:
        items = []
        for lineno, line_bytes in enumerate(raw.splitlines(), start=1):
            try:
                line = line_bytes.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {exc.start + 1} of the line); "
                                "JSONL files must be UTF-8") from None
            if line.strip():
                items.append(_parse_line(line, f"{path}:{lineno}"))
    if not items:
        raise DataError(f"split '{split}' is empty: {path}")
    return items


def _datasets_records(path: Path, split: str) -> list:
    """The records of a ``save_to_disk`` directory or a parquet file, through the ``datasets`` library (a
    DatasetDict's member named ``split``, or its only member)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading datasets directories and parquet files needs the 'datasets' package "
                        "(pip install 'repforget-kernels[driver]')") from None
    if path.is_dir():
        try:
            data = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as exc:
            raise DataError(f"{path}: not a datasets directory written by save_to_disk ({exc})") from None
    else:
        data = datasets.load_dataset("parquet", data_files=str(path), split="train")
    if isinstance(data, datasets.DatasetDict):
        if split in data:
            data = data[split]
        elif len(data) == 1:
            data = next(iter(data.values()))
        else:
            raise DataError(f"{path}: holds splits {sorted(data)}, none named '{split}'")
    return data.to_list()


def load_split(path: str | Path, split: str) -> list[dict]:
    """A user split from ``path``: a JSON / JSONL file (:func:`load_jsonl`), a parquet file or a ``save_to_disk``
    directory (the ``datasets`` library); records as :func:`parse_record` takes them. DataError naming the file
    (and the record) on anything wrong, and on an empty split."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".parquet":
        items = [parse_record(record, f"{path}: record {i}") for i, record in enumerate(_datasets_records(path, split))]
        if not items:
            raise DataError(f"split '{split}' is empty: {path}")
        return items
    return load_jsonl(path, split)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _answer_ids(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt and answer, the answer tokenised in context (BPE merges across the space)."""
    prompt_ids = _ids(tokenizer, prompt)
    full_ids = _ids(tokenizer, prompt + " " + answer)
    if full_ids[:len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        return prompt_ids, full_ids[len(prompt_ids):]
    return prompt_ids, _ids(tokenizer, " " + answer)


def _text_windows(ids: list[int], skip: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) windows of a text's tokens: one row when it fits in max_length, else windows of
    max_length tokens overlapping by max_length // 4, each token supervised exactly once (the first ``skip``
    tokens, a BOS, never; the overlap of a later window is unsupervised context)."""
    if len(ids) <= max_length:
        return [(ids, [-100] * skip + ids[skip:])]
    overlap = max_length // 4
    stride = max_length - overlap
    rows, start = [], 0
    while True:
        window = ids[start:start + max_length]
        context = skip if start == 0 else overlap
        rows.append((window, [-100] * context + window[context:]))
        if start + max_length >= len(ids):
            return rows
        start += stride


def _prompt_text(tokenizer, prompt: str, chat_template: bool) -> str:
    """The prompt as the model sees it: raw, or rendered as one user turn by the tokenizer's chat template
    (generation prompt appended)."""
    if not chat_template:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("chat_template=True (--chat-template) but the tokenizer has no chat template (tokenizer.chat_template is "
                         "empty): use an instruct model's tokenizer, or leave --chat-template out")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def _example_rows(tokenizer, item: dict, max_length: int, chat_template: bool) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) rows of one item: a question-answer item is one row truncated to max_length keeping
    the answer (prompt cut from the left); a text item is one row or several windows (:func:`_text_windows`)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if "text" in item:
        return _text_windows(bos + _ids(tokenizer, item["text"]) + eos, len(bos), max_length)
    if chat_template:  # the template writes its own BOS and turn markers; the answer follows the turn
        bos = []
        prompt_ids = _ids(tokenizer, _prompt_text(tokenizer, item["prompt"], True))
        answer_ids = _ids(tokenizer, item["answer"])
    else:
        prompt_ids, answer_ids = _answer_ids(tokenizer, item["prompt"], item["answer"])
    answer_ids = (answer_ids + eos)[:max_length - len(bos) - 1]
    keep = max_length - len(bos) - len(answer_ids)  # >= 1 prompt token survives
    prompt_ids = bos + prompt_ids[max(0, len(prompt_ids) - keep):]
    return [(prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids)]


def encode(tokenizer, examples: list[dict], max_length: int = 64, *, chat_template: bool = False) -> dict[str, torch.Tensor]:
    """Tokenise items into right-padded tensors.

    Returns ``input_ids`` (N, T) long, ``attention_mask`` (N, T) long (1 = real token) and ``labels``
    (N, T) long, aligned with input_ids (the model shifts): -100 on the prompt, on padding and on a
    leading BOS; answer tokens and the EOS supervised; for ``{"text"}`` items every real token is.
    T is the longest row, at most ``max_length``; a too-long prompt is cut from the left so the answer
    survives; a text longer than max_length tokens is split into windows of max_length tokens
    overlapping by max_length // 4 (each token supervised once), so N >= the number of items when texts
    are long. ``chat_template``: each prompt is rendered as a user turn by the tokenizer's chat template
    (instruct models) and the answer follows it. Cost: one tokenizer call per item.
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
        rows.extend(_example_rows(tokenizer, item, max_length, chat_template))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return pad_rows(rows, pad)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) long positions that follow the mask: the k-th real token of a row is at position k - 1 whatever
    the padding before it (left padding), 0 on padding. Absolute-position models (GPT-2) need them."""
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).clamp_min(0) * mask


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
