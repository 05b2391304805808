"""Models for the driver: the embedded model, local Hugging Face checkpoints, layer discovery, LoRA adapters,
export, memory plan.

Never downloads. ``load_model("tiny", ...)`` is the embedded Qwen2 model of ``pretrain`` (pretrained on
the embedded benchmark on first use, then cached; ``variant`` picks the original or one of the null
models). Any other spec is a local directory or a preset (``yi-6b``, ``qwen2.5-7b``) found in the local
HF cache, loaded with ``local_files_only=True``.
"""
from __future__ import annotations

import contextlib
import copy
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from repforget_kernels.activations import decoder_layers

__all__ = [
    "PRESETS",
    "ModelNotFound",
    "resolve_model_path",
    "load_tokenizer",
    "load_model",
    "decoder_layers",  # the library's (repforget_kernels.decoder_layers), re-exported for the driver
    "LoraSettings",
    "with_lora",
    "is_lora",
    "merged_copy",
    "export_model",
    "check_lora_targets",
    "lora_parameters",
    "memory_plan",
]

PRESETS = {"yi-6b": "01-ai/Yi-6B", "qwen2.5-7b": "Qwen/Qwen2.5-7B"}


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters (Hu et al. 2022) trained in place of the full weights: rank ``rank``, scale alpha / rank,
    on the linear layers named by ``targets`` (peft's target_modules; "all-linear": every linear layer of the
    decoder blocks, the output head excluded)."""

    rank: int
    alpha: float = 16.0
    targets: tuple = ("all-linear",)

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an int >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"LoRA targets must be non-empty module names, got {self.targets!r}")


def with_lora(model, settings: LoraSettings):
    """``model`` wrapped by peft with fresh LoRA adapters (B = 0: the wrapped model computes what ``model`` does);
    only the adapters require gradients. ValueError when a target matches no module."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("--lora-rank needs the 'peft' package (pip install 'repforget-kernels[driver]')") from None
    targets = "all-linear" if tuple(settings.targets) == ("all-linear",) else list(settings.targets)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=targets, lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def check_lora_targets(model, settings: LoraSettings) -> None:
    """ValueError unless every LoRA target names a module of ``model`` (peft's rule: the full name or its last
    dotted parts), before any training starts."""
    if tuple(settings.targets) == ("all-linear",):
        return
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in settings.targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"LoRA targets {missing} match no module of the model; its linear layers are named {leaves}")


def is_lora(model) -> bool:
    """Whether ``model`` is a peft model carrying adapters."""
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def merged_copy(model):
    """A plain transformers model with the adapters of a peft ``model`` merged into copies of its weights
    (``model`` itself is left as it is); costs one copy of the weights."""
    return copy.deepcopy(model).merge_and_unload().eval()


def export_model(model, tokenizer, directory: Path) -> Path:
    """Write ``model`` as a Hugging Face directory loadable by AutoModelForCausalLM.from_pretrained: config,
    safetensors weights and the tokenizer; a peft model is written merged, with its adapters in
    ``directory/adapter``. The directory is filled under a temporary name and renamed, so a directory that
    exists is complete. Returns it."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    plain = merged_copy(model) if is_lora(model) else model
    if is_lora(model):
        model.save_pretrained(str(tmp / "adapter"))
    plain.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)
    return directory


class ModelNotFound(FileNotFoundError):
    """A model directory or preset that is not on this machine; the message says what to download."""


def _hf_cache_dirs() -> list[Path]:
    """The local HF hub cache, as huggingface_hub resolves it: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache."""
    if os.environ.get("HF_HUB_CACHE"):
        return [Path(os.environ["HF_HUB_CACHE"])]
    home = Path(os.environ["HF_HOME"]) if os.environ.get("HF_HOME") else Path.home() / ".cache" / "huggingface"
    return [home / "hub"]


def _snapshot(repo_dir: Path) -> Path | None:
    """The snapshot of a cached repo that refs/main points to, else the newest one holding config.json."""
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        snap = repo_dir / "snapshots" / ref.read_text().strip()
        if (snap / "config.json").is_file():
            return snap
    snaps = [p for p in (repo_dir / "snapshots").glob("*") if (p / "config.json").is_file()]
    return max(snaps, key=lambda p: p.stat().st_mtime) if snaps else None


def resolve_model_path(spec: str) -> Path:
    """A local model directory for ``spec``: an existing directory with config.json, or a preset in the HF cache.

    Presets: "yi-6b" -> 01-ai/Yi-6B, "qwen2.5-7b" -> Qwen/Qwen2.5-7B, looked up in
    ``<cache>/models--ORG--NAME/snapshots/*``. Raises ModelNotFound naming the repo id to download and
    the directories searched. Never downloads.
    """
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"model spec must be a non-empty string, got {spec!r}")
    if spec.lower() in PRESETS:
        repo = PRESETS[spec.lower()]
        searched = [d / ("models--" + repo.replace("/", "--")) for d in _hf_cache_dirs()]
        for repo_dir in searched:
            snap = _snapshot(repo_dir)
            if snap is not None:
                return snap
        raise ModelNotFound(
            f"model preset '{spec}' ({repo}) is not on this machine; searched {', '.join(map(str, searched))}. "
            f"Download it first (`huggingface-cli download {repo}`) or pass a local directory as the model")
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ModelNotFound(f"model directory not found: {path} (not a preset either: {', '.join(PRESETS)})")
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"{path} has no config.json: not a Hugging Face model directory")
    return path


# Encoded by both candidate tokenizers of a directory to tell whether they agree: words, digits,
# punctuation, repeated spaces and non-ASCII text.
_TOKENIZER_PROBE = "Q: What is the capital of Velorin? A: Marquesh, 1987 -- x = 4 ; print ( y )  naïve Ünïcode 東京"


def load_tokenizer(path) -> PreTrainedTokenizerFast:
    """The tokenizer saved in a model directory, exactly as saved.

    ``AutoTokenizer`` picks its class from the model type and may rebuild the tokenizer from the
    vocabulary with that class's own pre-tokenizer (a word-level tokenizer saved beside a Qwen2 config
    comes back as a Qwen2Tokenizer that splits words into letters). When the directory holds a
    ``tokenizer.json``, its serialised pipeline is the truth: if AutoTokenizer's class encodes a probe
    text differently from it, the tokenizer is loaded from ``tokenizer.json`` as it is
    (``PreTrainedTokenizerFast``). A missing pad token becomes the EOS token.
    """
    from tokenizers import Tokenizer as RawTokenizer

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    serialised = path / "tokenizer.json"
    if serialised.is_file():
        truth = RawTokenizer.from_file(str(serialised)).encode(_TOKENIZER_PROBE, add_special_tokens=False).ids
        if list(tokenizer(_TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]) != truth:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_local(spec: str, device):
    path = resolve_model_path(spec)
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype).to(device)
    model.config.use_cache = False
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()  # gradient checkpointing (renamed activation checkpointing in transformers 5.x)
    info = {"name": spec, "path": str(path), "params": sum(p.numel() for p in model.parameters()),
            "layers": len(decoder_layers(model)), "dtype": str(dtype).replace("torch.", ""), "pretrain": {}}
    return model, tokenizer, info


def load_model(spec: str, *, cache_dir: Path, device: str | torch.device = "cpu", seed: int = 0,
               corpus: dict | None = None, variant: str = "original", progress: bool = True,
               tiny_options: dict | None = None):
    """(model, tokenizer, info) for "tiny", a preset, or a local HF directory; see the module docstring.

    For "tiny": ``corpus`` is the benchmark the embedded model is pretrained on (``benchmark.make_benchmark(seed)``
    when None), ``variant`` one of ``pretrain.VARIANTS`` and ``tiny_options`` overrides of ``pretrain.load_tiny``
    (architecture, recipe, vocab_size). info: {"name", "params", "layers", "dtype",
    "pretrain": what pretraining reached ({} for a local model), "path", "cached" (tiny only)}. The model
    is in eval mode.
    """
    with _hf_progress_bars(progress):
        if spec == "tiny":
            from .benchmark import make_benchmark
            from .pretrain import load_tiny

            corpus = make_benchmark(seed) if corpus is None else corpus
            model, tokenizer, info = load_tiny(Path(cache_dir), corpus, variant=variant, seed=seed, device=device,
                                               progress=progress, load_tokenizer=load_tokenizer, **(tiny_options or {}))
        else:
            model, tokenizer, info = _load_local(spec, device)
    return model.eval(), tokenizer, info


@contextlib.contextmanager
def _hf_progress_bars(enabled: bool):
    """transformers' own progress bars (weight loading) on or off inside the block, restored after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def _param_shapes(config) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """(shapes of every parameter, shapes of one decoder block's) of a Llama/Qwen2-style decoder from its
    config (biases on q/k/v for Qwen2)."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    qkv_bias = getattr(config, "attention_bias", config.model_type == "qwen2")
    per_layer = [(heads * head_dim, h), (kv * head_dim, h), (kv * head_dim, h), (h, heads * head_dim),
                 (inter, h), (inter, h), (h, inter), (h,), (h,)]
    if qkv_bias:
        per_layer += [(heads * head_dim,), (kv * head_dim,), (kv * head_dim,)]
    shapes = [(config.vocab_size, h)] + per_layer * layers + [(h,)]
    if not getattr(config, "tie_word_embeddings", False):
        shapes.append((config.vocab_size, h))
    return shapes, per_layer


def _plan_arguments(optimizer, sizes: dict) -> None:
    if optimizer not in ("adamw", "sgd", "adafactor"):
        raise ValueError(f"optimizer must be one of ('adamw', 'sgd', 'adafactor'), got {optimizer!r}")
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if sizes["gpus"] > 1 and optimizer == "adafactor":
        raise ValueError("optimizer 'adafactor' does not run on FSDP-sharded parameters (gpus > 1): use adamw or sgd")


def lora_parameters(config, rank: int) -> int:
    """Parameters of rank-``rank`` LoRA adapters on every linear matrix of the decoder blocks (peft's
    "all-linear"): rank x (rows + cols) per matrix."""
    _, block_shapes = _param_shapes(config)
    return config.num_hidden_layers * sum(rank * (s[0] + s[1]) for s in block_shapes if len(s) == 2)


def memory_plan(config, *, optimizer: str = "adamw", gradient_checkpointing: bool = True, batch_size: int = 1,
                seq_len: int = 512, gpus: int = 1, token_cka: bool = True, diag_batch_size: int = 2,
                lora_rank: int | None = None) -> dict:
    """Bytes per GPU to unlearn and diagnose a Llama/Qwen2-style model with the driver, and whether it fits 80 GB.

    One GPU (``gpus=1``): bf16 weights, gradients and optimizer states (no float32 master copy).
    Several (``gpus=N``, FSDP2 through ``distributed.shard_model``): float32 master weights, gradients
    and optimizer states sharded N ways, bf16 compute, the global batch split N ways.

    Training, "bytes" (summed into "training"): "weights" 2P | 4P/N + two gathered bf16 blocks
    (computing, prefetched) + the gathered bf16 root group (embeddings, final norm, head: FSDP2 does
    not reshard the root after forward); "gradients" 2P | 4P/N + the bf16 gradients of one block and
    of the root (FULL_SHARD, the default; SHARD_GRAD_OP is not modelled); "optimizer": "adamw"
    4P (two bf16 states) | 8P/N (two float32 states), "adafactor" 4 bytes x (rows + cols) per matrix
    (one GPU only), "sgd" 0; "activations": with checkpointing every layer's bf16 input b T h plus one
    layer recomputed, ~b T (34 h + 5 heads T) bytes per layer (Korthikanti et al. 2022), without it
    that for every layer, for the local batch b = ceil(batch_size / N); "logits": float32 logits and
    their gradient, 2 x 4 b T V; "npo_reference": 4 bytes per forget sequence (10k counted);
    "kl_reference": a frozen bf16 copy, 2P, for GA+KL / NPO+KL (caching the log-softmax would cost 4 V
    bytes per retain token); "reference": the original model kept on the GPU for token-level CKA, 2P
    (0 with ``token_cka=False``: the pipeline parks it in host memory).

    Diagnostics after each stage, "diagnostics_bytes" (optimizer states, gradients and the KL copy are
    freed): "weights" 2P | 4P/N + a gathered bf16 replica 2P; "reference" as above; the Fisher pass,
    "fisher" (float32 sums for every decoder-block parameter plus per-sample work of one float32
    weight matrix), "activations" (every layer's, eval mode does not checkpoint) and "logits" (bf16
    logits, float32 log-softmax and its gradient, 10 bytes per vocabulary entry) for one
    ``diag_batch_size`` x T batch; then the token-level CKA, "token_cka" (float64 StreamingCKA state,
    8 x 3 h^2 bytes per layer). "diagnostics" = weights + reference + the larger of the two passes.

    LoRA (``lora_rank``, one GPU only): the weights stay frozen (2P) and the adapters' A = lora_parameters
    parameters train: "weights" 2P + 2A, "gradients" 2A, "optimizer" 4A (adamw) | 0 (sgd) (adafactor as
    adamw: the adapters are thin matrices), activations and logits as above; diagnostics run on a merged copy,
    + 2P in "diagnostics_bytes"["merged"].

    Returns {"params", "gpus", "bytes", "diagnostics_bytes", "training", "diagnostics", "total" (the
    peak of the two phases, worst case a KL method), "total_without_kl", "budget" (90% of 80e9: CUDA
    context and fragmentation headroom), "fits_80gb", "kl_cache_bytes_per_token", "advice"}.
    """
    _plan_arguments(optimizer, {"batch_size": batch_size, "seq_len": seq_len, "gpus": gpus,
                                "diag_batch_size": diag_batch_size})
    if lora_rank is not None:
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1:
            raise ValueError(f"lora_rank must be None or a positive int, got {lora_rank!r}")
        if gpus > 1:
            raise ValueError("LoRA runs on one GPU here (gpus must be 1 with lora_rank)")
    shapes, block_shapes = _param_shapes(config)
    params = sum(torch.Size(s).numel() for s in shapes)
    h, layers, heads, vocab = config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.vocab_size
    block = sum(torch.Size(s).numel() for s in block_shapes)  # parameters per decoder block
    sharded = gpus > 1
    if optimizer == "adafactor":
        opt = 4 * sum(sum(s) if len(s) == 2 else s[0] for s in shapes)
    else:
        opt = {"adamw": 8 * params // gpus if sharded else 4 * params, "sgd": 0}[optimizer]

    def layer_activations(tokens: int) -> int:
        return tokens * (34 * h + 5 * heads * seq_len)

    tokens = -(-batch_size // gpus) * seq_len
    if gradient_checkpointing:
        activations = layers * tokens * h * 2 + layer_activations(tokens)
    else:
        activations = layers * layer_activations(tokens)
    reference = 2 * params if token_cka else 0
    root = params - layers * block  # embeddings, final norm, head: FSDP2 keeps the root group gathered
    train = {"weights": 4 * params // gpus + 2 * (2 * block + root) if sharded else 2 * params,
             "gradients": 4 * params // gpus + 2 * (block + root) if sharded else 2 * params,
             "optimizer": opt, "activations": activations, "logits": 2 * 4 * tokens * vocab,
             "npo_reference": 4 * 10_000, "kl_reference": 2 * params, "reference": reference}
    diag_tokens = diag_batch_size * seq_len
    diag = {"weights": 4 * params // gpus + 2 * params if sharded else 2 * params, "reference": reference,
            "fisher": 4 * block * layers + 4 * max(torch.Size(s).numel() for s in block_shapes),
            "activations": layers * layer_activations(diag_tokens), "logits": 10 * diag_tokens * vocab,
            "token_cka": 8 * 3 * h * h * layers if token_cka else 0}
    if lora_rank is not None:
        adapters = lora_parameters(config, lora_rank)
        train.update(weights=2 * params + 2 * adapters, gradients=2 * adapters,
                     optimizer=0 if optimizer == "sgd" else 4 * adapters)
        diag["weights"] = 2 * params + 2 * adapters + 2 * params  # the trainee and its merged copy
    training = sum(train.values())
    diagnostics = diag["weights"] + reference + max(diag["fisher"] + diag["activations"] + diag["logits"],
                                                    diag["token_cka"])
    budget = int(0.9 * 80e9)
    plan = {"params": params, "gpus": gpus, "bytes": train, "diagnostics_bytes": diag, "training": training,
            "diagnostics": diagnostics, "total": max(training, diagnostics),
            "total_without_kl": max(training - train["kl_reference"], diagnostics),
            "budget": budget, "kl_cache_bytes_per_token": 4 * vocab}
    plan["fits_80gb"] = plan["total"] <= budget
    plan["advice"] = _advice(plan, optimizer, gradient_checkpointing, token_cka)
    return plan


def _advice(plan: dict, optimizer: str, gradient_checkpointing: bool, token_cka: bool) -> str:
    gb = lambda b: f"{b / 1e9:.1f} GB"  # noqa: E731
    where = "one GPU" if plan["gpus"] == 1 else f"each of {plan['gpus']} GPUs (FSDP, float32 master weights)"
    head = (f"{plan['params'] / 1e9:.2f}B params on {where}, optimizer '{optimizer}' "
            f"{gb(plan['bytes']['optimizer'])}, gradient checkpointing {'on' if gradient_checkpointing else 'off'}, "
            f"token CKA {'on' if token_cka else 'off'}: training {gb(plan['training'])} with the KL copy, "
            f"{gb(plan['training'] - plan['bytes']['kl_reference'])} without; diagnostics {gb(plan['diagnostics'])} "
            f"(budget {gb(plan['budget'])}). ")
    if plan["gpus"] == 1:
        head += ("Weights, gradients and states are bf16 (no fp32 master copy): an update under half a bf16 ulp "
                 "(~0.2% of the weight) rounds away, and Adam steps are ~lr, so with weights ~0.01-0.05 an lr below "
                 "~1e-4 loses most updates; for smaller lr shard over several GPUs (float32 master weights). ")
    if plan["fits_80gb"]:
        return head + "Fits an 80 GB GPU for every method."
    if plan["total_without_kl"] <= plan["budget"]:
        return head + ("Fits for GA, GA+GD, NPO and RLabel (NPO reference log-probs are cached, no second model); "
                       "for GA+KL / NPO+KL " + ("use optimizer 'sgd' or 'adafactor', or " if plan["gpus"] == 1 else "")
                       + "shard over more GPUs or skip token-level CKA (--no-token-cka).")
    return head + ("Does not fit: " + ("use optimizer 'sgd' or 'adafactor', " if plan["gpus"] == 1 else "")
                   + "skip token-level CKA (--no-token-cka), use a smaller batch or sequence, or shard over "
                   "(more) GPUs with the shipped FSDP config.")
