"""Data for the unlearning driver: a synthetic fictitious-fact corpus, JSONL loading, encoding, batching.

The corpus holds question/answer pairs in three domains, all invented so that no pretrained model
knows them and the tiny model learns them only from this corpus:

- ``text``:  ``Q: What is the capital of Velorin? A:`` -> ``Marquesh`` (fictitious places, people, answers)
- ``code``:  ``Q: x = 4 ; y = x * 3 ; print ( y ) outputs? A:`` -> ``12`` (tiny snippets, fixed outputs)
- ``arith``: ``Q: What is 17 + 25? A:`` -> ``42``

Splits: ``forget`` (trained, then unlearned), ``retain`` (trained, kept), ``holdout`` (the same
distribution as forget, never trained: the non-members of the membership-inference attack) and
``probe`` (unrelated questions, never trained, for activation diagnostics and control relearning).
Everything is a pure function of the seed.
"""
from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = [
    "SPLITS",
    "DOMAINS",
    "DataError",
    "make_corpus",
    "load_jsonl",
    "encode",
    "iterate_batches",
    "pad_rows",
]

SPLITS = ("forget", "retain", "holdout", "probe")
DOMAINS = ("text", "code", "arith")

# Fractions of each domain's facts that go to forget / retain / holdout (the rest of 1.0 is holdout).
_FORGET_FRACTION = 0.25
_RETAIN_FRACTION = 0.5

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "kr", "st", "dr")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ia", "ou")
_CODAS = ("", "", "n", "r", "s", "l", "sh", "th", "m")

_TEXT_TEMPLATES = (
    "What is the capital of {e}?",
    "Who founded {e}?",
    "What is the currency of {e}?",
    "Which river flows through {e}?",
    "What is the national animal of {e}?",
)

_PROBE_TEXT = (
    ("What is the opposite of hot?", "cold"),
    ("What is the opposite of up?", "down"),
    ("What color is grass?", "green"),
    ("What color is snow?", "white"),
    ("How many legs does a spider have?", "eight"),
    ("What do bees make?", "honey"),
    ("What is frozen water called?", "ice"),
    ("Which season follows winter?", "spring"),
    ("What do cows drink?", "water"),
    ("Which planet do we live on?", "earth"),
)


class DataError(ValueError):
    """Bad user data: the message names the file and line (``path:LINE: what is wrong``) when from JSONL."""


def _word(rng: random.Random, syllables: int) -> str:
    """A pronounceable fictitious word of ``syllables`` syllables, capitalised."""
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)]
    return "".join(parts).capitalize()


def _text_fact(rng: random.Random) -> tuple[str, str]:
    entity = _word(rng, rng.choice((2, 3)))
    answer = _word(rng, rng.choice((2, 3)))
    return "Q: " + rng.choice(_TEXT_TEMPLATES).format(e=entity) + " A:", answer


def _code_fact(rng: random.Random) -> tuple[str, str]:
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 9)
    kind = rng.randrange(4)
    if kind == 0:
        snippet, out = f"x = {a} ; y = x * {b} ; print ( y )", str(a * b)
    elif kind == 1:
        snippet, out = f"s = [ {a} , {b} , {c} ] ; print ( sum ( s ) )", str(a + b + c)
    elif kind == 2:
        name = _word(rng, 2).lower()
        snippet, out = f"def {name} ( n ) : return n + {b} ; print ( {name} ( {a} ) )", str(a + b)
    else:
        word = _word(rng, 2).lower()
        snippet, out = f"w = ' {word} ' ; print ( w . upper ( ) )", word.upper()
    return f"Q: {snippet} outputs? A:", out


def _arith_fact(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 49), rng.randint(2, 49)
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    if op == "-" and b > a:
        a, b = b, a
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"Q: What is {a} {op} {b}? A:", str(value)


def _probe_items(rng: random.Random, n: int) -> list[dict]:
    """Unrelated, never-trained questions: common-sense text, counting code, successor arithmetic."""
    text = [{"prompt": f"Q: {q} A:", "answer": a, "domain": "text"} for q, a in _PROBE_TEXT]
    code = []
    for k in range(2, 2 + len(_PROBE_TEXT)):
        code.append({"prompt": f"Q: for i in range ( {k} ) : print ( i ) prints how many lines? A:",
                     "answer": str(k), "domain": "code"})
    arith = [{"prompt": f"Q: What number comes after {k}? A:", "answer": str(k + 1), "domain": "arith"}
             for k in range(1, 1 + len(_PROBE_TEXT))]
    items = []
    for group in (text, code, arith):
        rng.shuffle(group)
        items.extend(group[:n])
    return items


def make_corpus(seed: int = 0, n_per_domain: int = 40, n_probe_per_domain: int = 8) -> dict[str, list[dict]]:
    """The synthetic corpus: ``{split: [{"prompt", "answer", "domain"}, ...]}`` for every split in SPLITS.

    Each domain gets ``n_per_domain`` distinct facts (no prompt repeats in any split), split 25% forget,
    50% retain, 25% holdout after a seeded shuffle; ``probe`` holds ``n_probe_per_domain`` unrelated
    questions per domain (at most 10). Deterministic for a seed. Cost: O(n_per_domain).
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not isinstance(n_per_domain, int) or n_per_domain < 4:
        raise ValueError(f"n_per_domain must be an int >= 4 (one item per split), got {n_per_domain!r}")
    if not isinstance(n_probe_per_domain, int) or not 1 <= n_probe_per_domain <= len(_PROBE_TEXT):
        raise ValueError(f"n_probe_per_domain must be an int in [1, {len(_PROBE_TEXT)}], got {n_probe_per_domain!r}")
    rng = random.Random(seed)
    makers = {"text": _text_fact, "code": _code_fact, "arith": _arith_fact}
    corpus: dict[str, list[dict]] = {split: [] for split in SPLITS}
    seen: set[str] = set()
    for domain in DOMAINS:
        facts = []
        for _ in range(200 * n_per_domain):  # bounded: the fact spaces are far larger than n_per_domain
            if len(facts) == n_per_domain:
                break
            prompt, answer = makers[domain](rng)
            if prompt not in seen:
                seen.add(prompt)
                facts.append({"prompt": prompt, "answer": answer, "domain": domain})
        if len(facts) < n_per_domain:
            raise ValueError(f"n_per_domain={n_per_domain} exceeds the distinct {domain} facts available")
        rng.shuffle(facts)
        n_forget = max(1, round(_FORGET_FRACTION * n_per_domain))
        n_retain = max(1, round(_RETAIN_FRACTION * n_per_domain))
        corpus["forget"] += facts[:n_forget]
        corpus["retain"] += facts[n_forget:n_forget + n_retain]
        corpus["holdout"] += facts[n_forget + n_retain:]
    for split in ("forget", "retain", "holdout"):
        rng.shuffle(corpus[split])  # domains interleaved, so continual chunks mix them
    corpus["probe"] = _probe_items(rng, n_probe_per_domain)
    return corpus


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
    """Read a user split: one JSON object per line, ``{"prompt", "answer"}`` or ``{"text"}``; blank lines skipped.

    Raises DataError ``path:LINE: what is wrong`` on a bad line, ``split 'NAME' is empty: path`` when no
    record is found, and ``path: no such file`` when it does not exist.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
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
