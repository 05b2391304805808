"""``repforget``: unlearn, relearn and diagnose causal LMs (``demo``, ``run``, ``analyze``).

    repforget demo --out runs/demo
        the embedded benchmark and model (pretrained once with its nulls, cached): every method of the
        registry at three learning rates in the single setting and at the middle rate in continual
        settings of 5 and 10 requests, three relearning controls, every diagnostic on three probe sets,
        the four-regime verdicts with their intervals, OUT/report.{json,md} and PNGs.
    repforget run --model tiny|PATH|yi-6b|qwen2.5-7b --method npo ga_gd --lr 1e-4 3e-4 --setting continual ...
    repforget analyze --ref DIR --upd DIR --data probes.jsonl --out OUT
        CKA / PCA / Fisher per layer of two existing checkpoints: OUT/analysis.{json,md,png}.

Input errors (missing model directory, malformed or empty JSONL, unknown method, bad numbers, state of
another configuration in OUT) print one line on stderr and exit with status 2 before any work starts;
Ctrl-C exits 130 with the finished stages kept (rerun the same command to resume).
Several processes (``torchrun --nproc_per_node N -m repforget_kernels.driver run|demo|analyze ...``
or ``accelerate launch --config_file repforget_kernels/driver/configs/accelerate_fsdp.yaml -m
repforget_kernels.driver ...``): every command joins the process group from the launcher's
environment (one GPU per local rank, NCCL; gloo on CPU). ``run`` and ``demo`` shard each trainee with
FSDP2 and train it data-parallel (``distributed``, ``train``); evaluation and diagnostics split their
batches across ranks and merge the results; rank 0 writes the files, which hold the numbers one
process would produce (up to float rounding of the reductions).

Length: one module because it is the argument table of three subcommands and their mapping onto
the pipeline's config; it holds no logic of its own.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from repforget_kernels.pooling import SAMPLE_DEFINITIONS

from .methods import METHOD_NAMES as METHOD_CHOICES
from .methods import REFERENCES as REFERENCE_CHOICES

__all__ = ["DEMO_METHODS", "DEMO_LRS", "DEMO_REQUESTS", "build_parser", "demo_specs", "main"]

DEFAULT_CACHE = Path(os.environ.get("REPFORGET_CACHE", "~/.cache/repforget")).expanduser()
SPLIT_FLAGS = ("forget", "retain", "holdout", "unrelated")

# The demo grid: the paper's methods (not every registered one: SimNPO, IdkDPO and RMU run through
# `repforget run --method`) at three learning rates (mild, moderate, destructive) in the
# single setting, and at the moderate rate with 5 and 10 sequential requests. See the README.
DEMO_METHODS = ("ga", "ga_gd", "ga_kl", "npo", "npo_gd", "npo_kl", "rlabel")
DEMO_LRS = (1e-4, 7e-4, 2e-3)
DEMO_REQUESTS = (5, 10)
DEMO_EPOCHS = 8  # per request
# The retain term's weight in the demo: with weight 1 the tiny model cannot keep retain while forgetting (every
# method's retain EM falls with forget EM); with 5, GA+GD and NPO+GD forget selectively (README, bench/RESULTS.md).
DEMO_RETAIN_WEIGHT = 5.0


class UsageError(Exception):
    """A command-line or input problem: reported on one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse reads "-1e-3" as an option (its negative-number pattern has no exponent), so a negative
        # learning rate would be reported as a missing value; with this pattern it reaches the validator.
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.I)

    def error(self, message):
        raise UsageError(message)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (learning rates, beta)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def int_at_least(low: int):
    """argparse type: an int >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value
    parse.__name__ = f"int >= {low}"
    return parse


def _common(p: argparse.ArgumentParser, out_default: Optional[Path] = None) -> None:
    p.add_argument("--out", type=Path, required=out_default is None, default=out_default,
                   help="output directory" + (f" (default {out_default})" if out_default else ""))
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="tiny-model cache (default %(default)s)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample", choices=SAMPLE_DEFINITIONS, default="mean", help="rows for CKA / PCA")
    p.add_argument("--pca-k", type=int_at_least(1), default=4,
                   help="top-k principal-angle similarity beside PC1's (1: PC1 only)")
    p.add_argument("--diag-batch-size", type=int_at_least(1), default=16, help="batch size of the diagnostic passes")
    p.add_argument("--no-token-cka", action="store_true", help="skip token-level CKA (saves holding the original)")
    p.add_argument("--no-fisher", action="store_true", help="skip the Fisher diagnostics")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def _experiment(p: argparse.ArgumentParser) -> None:
    """Options of demo and run: resuming, seeds, the relearning budget, what is evaluated, the nulls."""
    p.add_argument("--restart", action="store_true",
                   help="discard OUT/state (finished stages) and start afresh instead of resuming")
    p.add_argument("--seeds", type=int_at_least(1), default=1,
                   help="repeat every run with seeds seed, seed+1, ... (unlearning and relearning randomness)")
    p.add_argument("--epochs", type=int_at_least(1), default=5, help="unlearning epochs per request")
    p.add_argument("--batch-size", type=int_at_least(1), default=16)
    p.add_argument("--beta", type=positive_float, default=0.1, help="NPO temperature")
    p.add_argument("--retain-weight", type=positive_float, default=1.0,
                   help="weight of the retain term of the GD / KL methods (the demo: %(default)s)")
    _training_knobs(p)
    p.add_argument("--reference", choices=REFERENCE_CHOICES, default="original",
                   help="NPO reference and KL anchor: the original model (default) or the model at each request's start")
    p.add_argument("--relearn-epochs", type=int_at_least(1), default=1,
                   help="epochs of every relearning control (over as many items as the forget set)")
    p.add_argument("--relearn-lr", type=positive_float, default=1e-3)
    p.add_argument("--relearn-batch-size", type=int_at_least(1), default=16)
    p.add_argument("--relearn-optimizer", choices=("adamw", "sgd", "adafactor"), default="adamw")
    p.add_argument("--relearn-controls", nargs="+", choices=("forget", "retain", "unrelated"),
                   default=["forget", "retain", "unrelated"], help="the relearning data of the controls")
    p.add_argument("--eval-items", type=int_at_least(1), default=96, help="items per evaluation split at most (the "
                   "forget set is always evaluated whole)")
    p.add_argument("--probe-items", type=int_at_least(4), default=64, help="items per probe set")
    p.add_argument("--mink-k", type=fraction, default=0.4,
                   help="fraction of the lowest answer-token scores Min-K%% and Min-K%%++ average (default %(default)s)")
    p.add_argument("--no-nulls", action="store_true", help="skip the null models (random init, other seed, oracle)")
    p.add_argument("--workers", type=int_at_least(1), default=None,
                   help="single-threaded worker processes, each running whole runs (default: one per core for "
                        "the embedded model on CPU, else 1)")


def fraction(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (weight decay, SimNPO's margin)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


# Unlearning settings passed to RunSpec.options only when given (None: the TrainConfig default).
_KNOBS = {
    "forget_weight": dict(type=positive_float, help="weight of the forget term (default 1)"),
    "weight_decay": dict(type=non_negative_float, help="optimizer weight decay of unlearning (default 0)"),
    "warmup": dict(type=int_at_least(0), help="updates of linear learning-rate warm-up (default 0)"),
    "scheduler": dict(choices=("constant", "linear", "cosine"), help="learning-rate schedule after warm-up "
                      "(default constant)"),
    "grad_accum": dict(type=int_at_least(1), help="batches accumulated per update (default 1)"),
    "max_steps": dict(type=int_at_least(1), help="cap on the updates of each unlearning request"),
    "gamma": dict(type=non_negative_float, help="SimNPO's reward margin gamma (default 0)"),
    "rmu_layer": dict(type=int_at_least(0), help="RMU: the decoder block steered (0-based; default L//4 - 1)"),
    "rmu_steer": dict(type=positive_float, help="RMU: the steering coefficient c (default 6.5)"),
}


def _training_knobs(p: argparse.ArgumentParser) -> None:
    for name, kwargs in _KNOBS.items():
        p.add_argument("--" + name.replace("_", "-"), default=None, **kwargs)


def _options(args) -> dict:
    """{TrainConfig field: value} of the knobs given on the command line."""
    return {name: getattr(args, name) for name in _KNOBS if getattr(args, name, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="repforget", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="the embedded benchmark's four-regime experiment (every method, three lrs, "
                                       "single and continual, three relearning controls, nulls)")
    _common(demo, out_default=Path("runs/demo"))
    _experiment(demo)
    demo.set_defaults(model="tiny", forget_size="forget10", optimizer="adamw", epochs=DEMO_EPOCHS,
                      retain_weight=DEMO_RETAIN_WEIGHT)

    run = sub.add_parser("run", help="one grid of unlearning runs")
    run.add_argument("--config", type=Path, default=None,
                     help="YAML or JSON file of options under their long names with underscores (retain_model, method, "
                          "lr, ...; lists for grids); options on the command line override it")
    run.add_argument("--run-seeds", type=int, nargs="+", default=None,
                     help="the seeds of the runs, explicitly (instead of --seed, --seed + 1, ... from --seeds)")
    _common(run)
    _experiment(run)
    run.add_argument("--model", default="tiny", help="tiny | local model directory | yi-6b | qwen2.5-7b")
    run.add_argument("--method", nargs="+", default=["npo"], help="one or more of " + " ".join(METHOD_CHOICES))
    run.add_argument("--lr", type=positive_float, nargs="+", default=[4e-4], help="one or more learning rates")
    run.add_argument("--optimizer", choices=("adamw", "sgd", "adafactor"), default="adamw",
                     help="adafactor or sgd fit a 7B run with a frozen original on one 80 GB GPU")
    run.add_argument("--setting", nargs="+", choices=("single", "continual"), default=["single"])
    run.add_argument("--requests", type=int_at_least(1), nargs="+", default=[5],
                     help="continual: numbers of sequential unlearning requests (one run per value)")
    run.add_argument("--forget-size", choices=("forget01", "forget05", "forget10"), default="forget10",
                     help="embedded benchmark: the forget set, 1%%, 5%% or 10%% of the entities")
    run.add_argument("--max-length", type=int_at_least(2), default=64,
                     help="tokens per example (longer {text} items become overlapping windows)")
    run.add_argument("--save-models", action="store_true",
                     help="write OUT/models/RUN/STAGE (Hugging Face directories: safetensors + tokenizer + config) after "
                          "each run's last unlearning stage and after each relearning control")
    run.add_argument("--lora-rank", type=int_at_least(1), default=None,
                     help="train LoRA adapters of this rank instead of the full weights (unlearning and relearning)")
    run.add_argument("--lora-alpha", type=positive_float, default=16.0, help="LoRA scale alpha (default %(default)s)")
    run.add_argument("--lora-targets", nargs="+", default=["all-linear"],
                     help="module names the adapters go on (peft target_modules; default: every linear layer)")
    run.add_argument("--no-tofu-metrics", dest="tofu_metrics", action="store_false",
                     help="skip TOFU / MUSE numbers (ROUGE-L, probability, truth ratio, forget quality, model "
                          "utility, privleak; docs/interop.md)")
    run.add_argument("--chat-template", action="store_true",
                     help="render every prompt with the tokenizer's chat template (instruct models)")
    for split in SPLIT_FLAGS:
        run.add_argument(f"--{split}", type=Path, default=None,
                         help=f"the {split} split: JSONL / JSON array, parquet or a datasets save_to_disk directory "
                              "({prompt, answer}, TOFU's {question, answer, ...} or {text} records)")
    run.add_argument("--fill-synthetic", action="store_true",
                     help="take the splits not given as files from the embedded benchmark")
    run.add_argument("--retain-model", default=None,
                     help="the retain oracle for a local model: the same architecture trained without the forget data")
    run.add_argument("--other-seed-model", default=None,
                     help="a null for a local model: the same architecture and data, another seed")

    parser.commands = sub.choices  # {command: its parser}
    an = sub.add_parser("analyze", help="diagnostics of two existing checkpoints")
    _common(an)
    an.add_argument("--ref", required=True, help="reference (original) model directory")
    an.add_argument("--upd", required=True, help="updated (unlearned) model directory")
    an.add_argument("--data", type=Path, required=True, help="probe JSONL")
    an.add_argument("--forget", type=Path, default=None, help="JSONL for the Fisher (default: the probe data)")
    an.add_argument("--max-length", type=int_at_least(2), default=64)
    return parser


# --------------------------------------------------------------------------- helpers


def _device(arg: Optional[str]) -> str:
    """The device to run on: ``--device`` checked against this machine, else cuda when there is one."""
    import torch

    if arg is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(arg)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {arg!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {arg!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {arg}: this machine has no CUDA GPU (torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {arg}: only {torch.cuda.device_count()} CUDA device(s) here")
    return arg


def _check_out(out: Path) -> None:
    """``--out`` must be a directory this process can create and write into (checked before any work)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".repforget-write-check-"):
            pass
    except OSError as exc:
        raise UsageError(f"--out {out} is not writable ({exc.strerror or exc})") from None


def _fsdp_settings():
    """FSDP settings from the launcher's environment (accelerate's config), as a UsageError when unusable."""
    from .distributed import FSDPSettings

    try:
        return FSDPSettings.from_env()
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _diag_config(args):
    from .diagnostics import DiagnosticsConfig

    return DiagnosticsConfig(sample=args.sample, pca_k=args.pca_k, batch_size=args.diag_batch_size,
                             token_cka=not args.no_token_cka, fisher=not args.no_fisher)


def _check_model(spec: str) -> None:
    """Fail early (ModelNotFound) when a model directory or preset is not on disk."""
    from .models import resolve_model_path

    if spec != "tiny":
        resolve_model_path(spec)


def _check_same_shape(ref: str, upd: str) -> None:
    """``analyze`` compares two checkpoints of one architecture: same blocks, width and vocabulary
    (read from their config.json files, before any weight is loaded)."""
    from transformers import AutoConfig

    from .models import resolve_model_path

    configs = {flag: AutoConfig.from_pretrained(resolve_model_path(spec), local_files_only=True)
               for flag, spec in (("--ref", ref), ("--upd", upd))}
    for field in ("num_hidden_layers", "hidden_size", "vocab_size"):
        a, b = (getattr(c, field, None) for c in configs.values())
        if a != b:
            raise UsageError(f"--ref has {field}={a}, --upd has {field}={b}: not two checkpoints of one model")


def _benchmark_config(args):
    from .benchmark import BenchmarkConfig

    return BenchmarkConfig(forget=getattr(args, "forget_size", "forget10"))


def _examples(args) -> tuple:
    """(splits, {split: path}): the embedded benchmark without data files; with them, exactly the user's splits
    (forget and retain required), or the benchmark with the user's splits swapped in under --fill-synthetic."""
    from .benchmark import make_benchmark
    from .data import load_split

    sources = {split: getattr(args, split) for split in SPLIT_FLAGS if getattr(args, split, None) is not None}
    if not sources:
        return make_benchmark(args.seed, _benchmark_config(args)), {}
    missing = [f"--{s}" for s in ("forget", "retain") if s not in sources]
    if missing and not args.fill_synthetic:
        raise UsageError(f"data files given but {' and '.join(missing)} missing: give them, or --fill-synthetic to take "
                         "the missing splits from the embedded benchmark (its facts are unrelated to yours)")
    corpus = make_benchmark(args.seed, _benchmark_config(args)) if args.fill_synthetic else {}
    for split, path in sources.items():
        corpus[split] = load_split(path, split)
    wanted = [c for c in args.relearn_controls if c != "forget" and not corpus.get(c)]
    if wanted:
        raise UsageError(f"relearning control(s) {', '.join(wanted)} need --{wanted[0]} data (or leave them out of "
                         "--relearn-controls)")
    return corpus, sources


def _pipeline(args, examples=None, sources=None):
    """The Pipeline of ``demo`` / ``run``, after joining the process group under a launcher."""
    from .distributed import join_process_group
    from .pipeline import NULLS, Pipeline, PipelineConfig

    fsdp = _fsdp_settings()
    device = _device(args.device)
    _check_out(args.out)
    device, is_main = join_process_group(device)
    cfg = PipelineConfig(out=args.out, model=args.model, cache_dir=args.cache_dir, device=device,
                         seed=args.seed, benchmark=_benchmark_config(args), max_length=getattr(args, "max_length", 64),
                         eval_items=args.eval_items, probe_items=args.probe_items, relearn_lr=args.relearn_lr,
                         relearn_epochs=args.relearn_epochs, relearn_batch_size=args.relearn_batch_size,
                         relearn_optimizer=args.relearn_optimizer,
                         relearn_controls=tuple(dict.fromkeys(args.relearn_controls)), diagnostics=_diag_config(args),
                         examples=examples, data_sources=sources or {}, nulls=() if args.no_nulls else NULLS,
                         null_models=_null_models(args),
                         workers=_workers(args, device), progress=is_main and not args.no_progress, fsdp=fsdp,
                         restart=args.restart, mink_k=args.mink_k,
                         chat_template=getattr(args, "chat_template", False),
                         tofu_metrics=getattr(args, "tofu_metrics", False),
                         save_models=getattr(args, "save_models", False), lora=_lora(args),
                         invocation=_resolved(args))
    return Pipeline(cfg)


def _null_models(args) -> dict:
    """{null: directory} from --retain-model / --other-seed-model (checked to exist)."""
    out = {}
    for name, flag in (("retain_oracle", "retain_model"), ("other_seed", "other_seed_model")):
        spec = getattr(args, flag, None)
        if spec is not None:
            _check_model(spec)
            out[name] = spec
    return out


def _lora(args):
    """LoraSettings from --lora-rank / --lora-alpha / --lora-targets, None without --lora-rank."""
    from .distributed import launched_world_size
    from .models import LoraSettings

    if getattr(args, "lora_rank", None) is None:
        return None
    if launched_world_size() > 1:
        raise UsageError("--lora-rank runs in one process (LoRA adapters are not sharded with FSDP here)")
    try:
        import peft  # noqa: F401
    except ImportError:
        raise UsageError("--lora-rank needs the 'peft' package: pip install 'repforget-kernels[driver]'") from None
    return LoraSettings(rank=args.lora_rank, alpha=args.lora_alpha, targets=tuple(args.lora_targets))


def _workers(args, device: str) -> int:
    """--workers, else (the embedded model on CPU, one process) one single-threaded worker per core, at most 8."""
    from .distributed import launched_world_size

    if args.workers is not None:
        return args.workers
    if args.model != "tiny" or device != "cpu" or launched_world_size() > 1:
        return 1
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _grid(args, methods: list, settings: list) -> list:
    """RunSpecs of every method x setting x learning rate, for each seed; ``settings`` holds
    (setting, requests, learning rates) triples."""
    from .pipeline import RunSpec

    seeds = getattr(args, "run_seeds", None) or [args.seed + k for k in range(args.seeds)]
    try:
        return [RunSpec(method=m, lr=lr, setting=setting, requests=requests, epochs=args.epochs,
                        batch_size=args.batch_size, beta=args.beta, retain_weight=args.retain_weight,
                        seed=seed, reference=args.reference, optimizer=args.optimizer,
                        options=_options(args))
                for seed in dict.fromkeys(seeds) for m in methods for setting, requests, rates in settings for lr in rates]
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _specs(args) -> list:
    for m in args.method:
        if m not in METHOD_CHOICES:
            raise UsageError(f"unknown method {m!r}; choose from {', '.join(METHOD_CHOICES)}")
    settings = [(s, r, args.lr) for s in dict.fromkeys(args.setting)
                for r in (dict.fromkeys(args.requests) if s == "continual" else (1,))]
    return _grid(args, list(dict.fromkeys(args.method)), settings)


def demo_specs(args) -> list:
    """The demo grid: DEMO_METHODS at DEMO_LRS in the single setting, and at the middle rate with each of
    DEMO_REQUESTS sequential requests; for each of ``args.seeds`` seeds."""
    settings = [("single", 1, DEMO_LRS)] + [("continual", n, (DEMO_LRS[1],)) for n in DEMO_REQUESTS]
    return _grid(args, list(DEMO_METHODS), settings)


def _read_config(path: Path) -> dict:
    """The options of an experiment file: a YAML (.yaml / .yml) or JSON mapping; UsageError naming the file."""
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise UsageError("--config with a YAML file needs the 'pyyaml' package "
                             "(pip install 'repforget-kernels[driver]'), or give a JSON file") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UsageError(f"--config {path}: not valid YAML ({_one_line(exc)})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--config {path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of option names to values, got {type(data).__name__}")
    return data


def _config_tokens(data: dict, parser: argparse.ArgumentParser, path: Path) -> list:
    """Command-line tokens for an experiment file's options: ``key: value`` -> ``--key value`` (underscores
    become dashes; lists give several values; true gives a flag, false nothing; ``seeds`` given as a list are
    the runs' seeds, ``--run-seeds``). UsageError naming unknown options."""
    known = {opt for action in parser._actions for opt in action.option_strings}
    tokens = []
    for key, value in data.items():
        if key == "seeds" and isinstance(value, list):
            key = "run_seeds"
        flag = "--" + str(key).replace("_", "-")
        if flag not in known or flag == "--config":
            raise UsageError(f"--config {path}: unknown option {key!r} (options are the long command-line names "
                             "with underscores, e.g. retain_model, method, lr)")
        if isinstance(value, bool):
            tokens += [flag] if value else []
        elif isinstance(value, list):
            if not value:
                raise UsageError(f"--config {path}: {key!r} is an empty list")
            tokens += [flag] + [str(v) for v in value]
        elif value is None:
            continue
        else:
            tokens += [flag, str(value)]
    return tokens


def _expand_config(argv: list) -> tuple:
    """(argv with the ``run --config FILE`` options spliced in before the command line's own, so those override
    them; the file's options as read, or None)."""
    if not argv or argv[0] != "run":
        return argv, None
    rest, path = [], None
    i = 1
    while i < len(argv):
        if argv[i] == "--config" and i + 1 < len(argv):
            path, i = Path(argv[i + 1]), i + 2
        elif argv[i].startswith("--config="):
            path, i = Path(argv[i].split("=", 1)[1]), i + 1
        else:
            rest.append(argv[i])
            i += 1
    if path is None:
        return argv, None
    data = _read_config(path)
    run_parser = build_parser().commands["run"]
    return ["run"] + _config_tokens(data, run_parser, path) + rest, {"file": str(path), "options": data}


def _resolved(args) -> dict:
    """The resolved options of a command (JSON-ready: paths as strings), as written into the report; ``config``
    holds the experiment file and its options as read (None without --config)."""
    out = {}
    for key, value in sorted(vars(args).items()):
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, (list, tuple)):
            value = [str(v) if isinstance(v, Path) else v for v in value]
        out[key] = value
    return out


# --------------------------------------------------------------------------- commands


def _print_summary(report: dict, out: Path) -> None:
    from .distributed import is_main

    if not is_main():
        return
    print(f"report: {out / 'report.json'} and {out / 'report.md'}")
    print("thresholds: " + ", ".join(f"{k}={v}" for k, v in report["thresholds"].items()))
    for run in report["runs"]:
        b, s = run["verdict"]["behaviour"], run["verdict"]["structure"]
        print(f"  {run['run_id']:<34} {b['label'] + ('?' if b['uncertain'] else ''):<27} "
              f"structure={str(s['label']) + ('?' if s['uncertain'] else ''):<9} forget_drop={_r(b['forget_drop'])} "
              f"collateral={_r(b['collateral'])} recovery={_r(b['recovery'])} position={_r(s['position'])}")
    h = report["summary"]["structure_vs_recovery"]
    print(f"structure vs non-recovery: Spearman {_r(h['spearman'])} 95% CI {[_r(v) for v in h['ci95']]} "
          f"over {h['runs']} runs (without catastrophe: {_r(h['non_catastrophic']['spearman'])} "
          f"{[_r(v) for v in h['non_catastrophic']['ci95']]} over {h['non_catastrophic']['runs']}); "
          f"regimes {report['summary']['regimes']}; "
          f"selective {report['summary']['selective_runs']}")


def _r(v):
    return None if v is None else round(v, 3)


def _threads(model: str) -> None:
    """The tiny model's matrices are too small to gain from intra-op threads (and lose badly to thread
    contention on a busy machine): one thread unless OMP_NUM_THREADS says otherwise."""
    import torch

    if model == "tiny" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def cmd_demo(args) -> int:
    args.model = "tiny"
    _threads(args.model)
    specs = demo_specs(args)
    pipe = _pipeline(args)
    report = pipe.run(specs)
    _print_summary(report, args.out)
    return 0


def cmd_run(args) -> int:
    from .distributed import launched_world_size

    specs = _specs(args)
    if args.optimizer == "adafactor" and launched_world_size() > 1:
        raise UsageError("--optimizer adafactor does not run on FSDP-sharded parameters (several processes): "
                         "use adamw (its states are sharded too) or sgd")
    _check_model(args.model)
    _null_models(args)
    examples, sources = _examples(args)
    entities = len({item.get("entity", i) for i, item in enumerate(examples["forget"])})
    for n in (args.requests if "continual" in args.setting else ()):
        if n > entities:
            raise UsageError(f"--requests {n}: the forget set has only {entities} entities to split into requests")
    _threads(args.model)
    pipe = _pipeline(args, examples, sources)
    report = pipe.run(specs)
    _print_summary(report, args.out)
    return 0


def cmd_analyze(args) -> int:
    import torch

    from repforget_kernels import compare_models

    from .data import encode, load_split
    from .diagnostics import comparison_options
    from .distributed import join_process_group, launched_world_size
    from .models import load_model
    from .plots import plot_layers
    from .files import atomic_write_json, atomic_write_text
    from .report import render_analysis_markdown, versions

    cfg = _diag_config(args)
    for spec in (args.ref, args.upd):
        if spec == "tiny":
            raise UsageError("analyze needs two model directories (--ref DIR --upd DIR), got 'tiny'")
        _check_model(spec)
    _check_same_shape(args.ref, args.upd)
    probe_items = load_split(args.data, "probe")
    forget_items = load_split(args.forget, "forget") if args.forget is not None else probe_items
    out = Path(args.out)
    device = _device(args.device)
    _check_out(out)
    device, is_main = join_process_group(device)
    opts = dict(cache_dir=args.cache_dir, device=device, seed=args.seed, progress=not args.no_progress)
    ref, tokenizer, ref_info = load_model(args.ref, **opts)
    upd, _, upd_info = load_model(args.upd, **opts)
    probe = encode(tokenizer, probe_items, max_length=args.max_length)
    forget = encode(tokenizer, forget_items, max_length=args.max_length)
    torch.manual_seed(args.seed)
    result = compare_models(ref, upd, **comparison_options(cfg, probe, forget)).to_dict()
    analysis = dict(result, ref=str(args.ref), upd=str(args.upd), n_probe=len(probe_items),
                    config=asdict(cfg), models={"ref": ref_info, "upd": upd_info}, versions=versions(),
                    world_size=launched_world_size())
    if not is_main:  # every rank holds the merged numbers; rank 0 writes them
        return 0
    atomic_write_text(out / "analysis.md", render_analysis_markdown(analysis))
    plot_layers(analysis, out)
    atomic_write_json(out / "analysis.json", dict(analysis, complete=True))
    print(f"analysis: {out / 'analysis.json'} and {out / 'analysis.md'}")
    for row in analysis["layers"]:
        print(f"  layer {row['layer']:>3}: cka={row['cka']} pca_sim={row['pca_similarity']} "
              f"fisher_ratio={row['fisher_mass_ratio']}")
    return 0


COMMANDS = {"demo": cmd_demo, "run": cmd_run, "analyze": cmd_analyze}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, KeyError):
        text = text.strip("'\"")
    return " ".join(text.split())


def main(argv: Optional[list] = None) -> int:
    """Entry point of ``repforget`` and ``python -m repforget_kernels.driver``; returns the exit status."""
    from .data import DataError
    from .models import ModelNotFound
    from .state import StateError

    out = None
    try:
        argv, experiment = _expand_config(list(sys.argv[1:] if argv is None else argv))
        args = build_parser().parse_args(argv)
        args.config = experiment
        out = args.out
        return COMMANDS[args.command](args)
    except (UsageError, DataError, ModelNotFound, StateError) as exc:
        print(f"repforget: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"repforget: interrupted; finished stages are kept in {out}/state: rerun the same command to resume",
              file=sys.stderr)
        return 130
    finally:
        from .distributed import leave_process_group

        leave_process_group()


if __name__ == "__main__":
    sys.exit(main())
