"""The embedded model: a subword tokenizer and a small Qwen2 LM pretrained offline on the benchmark, cached.

``load_tiny(cache_dir, corpus, variant=...)`` returns the model, pretraining it on first use:

- ``original``: trained on forget + retain facts and the utility tasks (``benchmark.pretraining_items``);
- ``other_seed``: the same data, another initialisation and data order (a null: how far two
  independent trainings of the same knowledge lie apart);
- ``retain_oracle``: trained from scratch without the forget entities (what real deletion looks like);
- ``random_init``: the architecture at initialisation, never trained (the null of no structure).

The tokenizer is byte-level BPE trained with ``tokenizers`` on the whole benchmark's text (so answers
span 2-5 tokens and nothing is out of vocabulary), shared by every variant. Pretraining is NLL on the
answer tokens (+ EOS) with AdamW, linear warmup and cosine decay, for ``PRETRAIN["epochs"]`` epochs, with
an exact-match check every ``check_every`` epochs (on the first ``check_items`` items of each judged split)
that stops early once forget and retain (or retain alone for the oracle) reach ``goal``. Each model is written to ``cache_dir/tiny-<variant>-<key>`` (a normal
Hugging Face directory: weights, config, tokenizer, plus ``info.json`` with what pretraining reached),
through a temporary directory and ``os.replace``; the key hashes the corpus, seed, architecture and
recipe, so a changed recipe never reuses a stale cache.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from .benchmark import pretraining_items
from .data import encode
from .evaluate import evaluate
from .train import TrainConfig, relearn

__all__ = ["VARIANTS", "PRETRAIN", "TINY", "SPECIAL_TOKENS", "build_tokenizer", "tiny_config", "pretrain", "cache_path",
           "load_tiny"]

VARIANTS = ("original", "other_seed", "retain_oracle", "random_init")
SPECIAL_TOKENS = ("<pad>", "<eos>")
TINY = {"hidden_size": 128, "intermediate_size": 640, "num_hidden_layers": 6, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64}
VOCAB_SIZE = 2048
# target: the exact match the original model must reach on forget and retain (else pretraining fails)
PRETRAIN = {"lr": 3e-3, "batch_size": 16, "epochs": 40, "warmup_steps": 200, "check_every": 4, "check_items": 240,
            "goal": 0.97, "target": 0.95}
_CACHE_VERSION = 2  # bump when the recipe changes in a way the key does not see
_ANSWER_WEIGHT = 6  # extra copies of every answer in the tokenizer's training texts
_OTHER_SEED_OFFSET = 7919  # the other-seed null is pretrained with seed + this offset


def _texts(corpus: dict) -> list:
    """Training texts of the tokenizer: every item, plus every answer ``_ANSWER_WEIGHT`` more times (so the
    answer vocabulary gets merged into few tokens: 2-6 per answer)."""
    items = [item for split in corpus.values() for item in split]
    return [f"{i['prompt']} {i['answer']}" for i in items] + [f" {i['answer']}" for i in items] * _ANSWER_WEIGHT


def build_tokenizer(corpus: dict, vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Byte-level BPE over the whole benchmark (deterministic for a corpus); ids 0, 1 are <pad>, <eos>; no BOS."""
    if not isinstance(corpus, dict) or not corpus:
        raise ValueError(f"corpus must be a non-empty dict of splits, got {type(corpus).__name__}")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(_texts(corpus), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


def tiny_config(vocab_size: int, architecture: dict = TINY) -> Qwen2Config:
    """The embedded architecture (default ``TINY``): Qwen2, 6 blocks, hidden 128 (MLP 640), 4 heads (2 KV heads),
    tied embeddings: 2.0M parameters with the 2048-token vocabulary."""
    if not isinstance(vocab_size, int) or vocab_size < len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be an int >= {len(SPECIAL_TOKENS)}, got {vocab_size!r}")
    return Qwen2Config(vocab_size=vocab_size, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
                       bos_token_id=None, use_cache=False, **architecture)


def _schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warmup to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def pretrain(model, tokenizer, corpus: dict, *, include_forget: bool = True, seed: int = 0,
             recipe: dict = PRETRAIN, progress: bool = True) -> dict:
    """NLL pretraining on ``benchmark.pretraining_items`` in place; returns what it reached.

    Stops at the first exact-match check where the judged splits (forget and retain; retain alone without
    the forget data) reach ``recipe["goal"]``, else after ``recipe["epochs"]``. Returns {"epochs", "steps",
    "seconds", "final_loss", "em": {split: exact match} on forget, retain, forget_paraphrase,
    retain_paraphrase, holdout and utility}.
    """
    data = encode(tokenizer, pretraining_items(corpus, include_forget=include_forget))
    judged = ("forget", "retain") if include_forget else ("retain",)
    report = ("forget", "retain", "forget_paraphrase", "retain_paraphrase", "holdout", "utility")
    checks = {k: encode(tokenizer, corpus[k][:recipe["check_items"]]) for k in judged}  # a fixed subset, for speed
    total = recipe["epochs"] * -(-data["input_ids"].shape[0] // recipe["batch_size"])
    start, cpu_start, em = time.perf_counter(), time.process_time(), {}
    bar = tqdm(total=recipe["epochs"], desc="pretrain (epochs)", disable=not progress, leave=False)

    def check(epochs: int) -> bool:
        """Early stop: every ``check_every`` epochs, stop once the judged splits reach the goal."""
        bar.update(1)
        if epochs % recipe["check_every"] and epochs != recipe["epochs"]:
            return False
        em.update(evaluate(model, checks, tokenizer=tokenizer, batch_size=128)["em"])
        bar.set_postfix({f"{k}_em": f"{v:.3f}" for k, v in em.items()})
        return min(em.values()) >= recipe["goal"]

    cfg = TrainConfig(lr=recipe["lr"], epochs=recipe["epochs"], batch_size=recipe["batch_size"], seed=seed,
                      progress=False)
    try:
        result = relearn(model, data, cfg, schedule=lambda step: _schedule(step, total, recipe["warmup_steps"]),
                         on_epoch=check)
    finally:
        bar.close()
    model.eval()
    final = evaluate(model, {k: encode(tokenizer, corpus[k]) for k in report if corpus.get(k)}, tokenizer=tokenizer,
                     batch_size=128)
    return {"epochs": result["epochs"], "steps": result["steps"], "seconds": round(time.perf_counter() - start, 2),
            "cpu_seconds": round(time.process_time() - cpu_start, 2), "final_loss": result["final_loss"],
            "em": final["em"], "token_acc": final["token_acc"]}


def _key(corpus: dict, variant: str, seed: int, architecture: dict, recipe: dict, vocab_size: int) -> str:
    blob = json.dumps({"corpus": corpus, "variant": variant, "seed": seed, "tiny": architecture, "vocab": vocab_size,
                       "pretrain": recipe, "version": _CACHE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _save_atomic(model, tokenizer, info: dict, final: Path) -> None:
    """Write model + tokenizer + info.json into a temp dir beside ``final``, then os.replace it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "info.json").write_text(json.dumps(info, indent=2))
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "info.json").is_file():  # someone else finished first: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cache_path(cache_dir, corpus: dict, *, variant: str = "original", seed: int = 0, architecture: dict = TINY,
               recipe: dict = PRETRAIN, vocab_size: int = VOCAB_SIZE) -> Path:
    """The cache directory of one variant (it holds ``info.json`` once pretrained)."""
    key = _key(corpus, variant, seed, architecture, dict(PRETRAIN, **recipe), vocab_size)
    return Path(cache_dir) / f"tiny-{variant}-{key}"


def load_tiny(cache_dir, corpus: dict, *, variant: str = "original", seed: int = 0, device="cpu",
              progress: bool = True, load_tokenizer=None, architecture: dict = TINY, recipe: dict = PRETRAIN,
              vocab_size: int = VOCAB_SIZE):
    """(model, tokenizer, info) of one embedded-model variant (see the module docstring), from the cache or
    pretrained now. ``load_tokenizer(path)`` reads a cached tokenizer (models.load_tokenizer);
    ``architecture`` / ``recipe`` / ``vocab_size`` replace TINY / PRETRAIN / VOCAB_SIZE (tests build smaller
    models with the same code)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    missing = [s for s in ("forget", "retain", "utility_train") if not corpus.get(s)]
    if missing:
        raise ValueError(f"corpus needs non-empty splits {missing} to pretrain the embedded model")
    recipe = dict(PRETRAIN, **recipe)
    final = cache_path(cache_dir, corpus, variant=variant, seed=seed, architecture=architecture, recipe=recipe,
                       vocab_size=vocab_size)
    if (final / "info.json").is_file():
        model = Qwen2ForCausalLM.from_pretrained(final, local_files_only=True, dtype=torch.float32)
        info = json.loads((final / "info.json").read_text())
        info.update(cached=True, path=str(final))
        return model.to(device), load_tokenizer(final), info
    tokenizer = build_tokenizer(corpus, vocab_size)
    init_seed = seed + (_OTHER_SEED_OFFSET if variant == "other_seed" else 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = Qwen2ForCausalLM(tiny_config(len(tokenizer), architecture)).to(device)
    pre = {}
    if variant != "random_init":
        pre = pretrain(model, tokenizer, corpus, include_forget=variant != "retain_oracle", seed=init_seed,
                       recipe=recipe, progress=progress)
        if variant == "original" and min(pre["em"]["forget"], pre["em"]["retain"]) < recipe["target"]:
            raise RuntimeError(f"pretraining reached only forget EM {pre['em']['forget']:.3f}, retain EM "
                               f"{pre['em']['retain']:.3f} < {recipe['target']} after {pre['epochs']} epochs")
    info = {"name": "tiny", "variant": variant, "seed": init_seed,
            "params": sum(p.numel() for p in model.parameters()), "layers": model.config.num_hidden_layers,
            "dtype": "float32", "pretrain": pre, "path": str(final)}
    _save_atomic(model, tokenizer, info, final)
    return model.eval(), tokenizer, {**info, "cached": False}
