"""The driver's experiment: original -> unlearned (single, or unlearned_1..N continual) -> three relearning controls.

A *run* is one :class:`RunSpec` (method, learning rate, setting, seed). After the last unlearning
request the unlearned model is relearned three ways, each from the same unlearned weights and with a
budget matched to the forget set (``relearn_epochs`` epochs over as many items as the forget set has):
on the forget set (``relearned_forget``: the paper's reversibility test), on retain items only
(``relearned_retain``) and on unrelated items only (``relearned_unrelated``); forget exact match is
recorded after every relearning step (the recovery curve). Every stage is evaluated (``evaluate``:
exact match of generated answers and token accuracy per split, perplexity, MIA AUCs) and compared with
the original model on three probe sets, forget, retain and unrelated (``repforget_kernels.compare_models``:
CKA pooled / debiased / token-level, PCA similarity k = 1 and top-k, normalised PCA shift, Fisher mass,
ratio, rank correlation and histogram; ``verdict.structure_summary`` condenses each into drift metrics,
with bootstrap draws of the pooled-CKA drift over the probe rows). The nulls (a randomly initialised
model, a model pretrained with another seed, the retain oracle pretrained without the forget entities,
relearned like the runs) are measured the same way once per output directory, and every run gets its
verdict (``verdict.verdict``) against them.

State and resume. ``OUT/state/`` (a :class:`state.StateDir`: every JSON self-checksummed, every
checkpoint verified against the digest in the record written after it) holds, each written atomically
as soon as it exists: ``config.json`` (the fingerprint the state belongs to: settings, a content
digest of every data split and the digests of the model's files), ``reference.pt`` + ``original.json``
(the original model's ``ReferenceStatistics`` per probe set and its stage record), ``nulls/<name>.json``,
and per run ``<run_id>/spec.json``, ``<run_id>/<i>_<stage>.json`` and ``<run_id>/<i>_<stage>.pt`` (the
model after the last finished unlearning stage; kept until the relearning controls are done).
Rerunning the same command skips finished stages, restarts from the last checkpoint and produces the
same report (each stage seeds torch with (seed, stage index), so the numbers do not depend on where a
run was interrupted). A fingerprint that differs (edited data, other weights, other settings) is a
:class:`state.StateMismatch` naming what changed, a damaged file a :class:`state.StateCorrupt` naming the
file; ``restart=True`` discards the state instead. Ctrl-C or an error leaves finished stages intact and
the previous report untouched: report.md, the PNGs and then report.json are replaced only when every
run is finished, each atomically.

Memory: the original model stays on the device (NPO reference, KL anchor, token-level CKA).

Several processes (``torchrun`` / ``accelerate launch``, process group joined by the CLI): every
rank holds the original model; each run's trainee is sharded with FSDP2 (``distributed.shard_model``,
``cfg.fsdp``) and trained data-parallel (``train``); each stage's evaluation and diagnostics run on a
plain replica gathered from the shards, with the batches split across ranks and the results merged,
so every rank computes the one-process record. Rank 0 pretrains the embedded models (the others wait
and load them from the cache), decides what is already finished, and writes every file; the
checkpoints hold the full float32 master weights, so a resumed run continues from exactly where it
stopped.

Length: one module because the stages of a run (unlearn, relearn, evaluate, compare) share the
run's state and checkpoints; the workers, evaluation and training live in their own modules.
"""
from __future__ import annotations

import contextlib
import copy
import math
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from repforget_kernels import ReferenceStatistics, compare_models, linear_cka

from .benchmark import EVAL_SPLITS, BenchmarkConfig, make_benchmark
from .data import encode
from .diagnostics import DiagnosticsConfig, comparison_options, statistics_options
from .distributed import (
    FSDPSettings,
    broadcast,
    full_state_dict,
    is_main,
    is_sharded,
    load_full_state_dict,
    main_rank_first,
    plain_copy,
    shard_model,
    world,
)
from .evaluate import MIN_K, evaluate, exact_match
from .methods import REFERENCES, get_method
from .metrics import against_retain, truth_ratio_data
from .models import LoraSettings, check_lora_targets, export_model, is_lora, load_model, merged_copy, with_lora
from .report import versions, write_report
from .state import StateDir, StateMismatch, content_digest, model_identity
from .train import TrainConfig, relearn, unlearn
from .verdict import THRESHOLDS, structure_summary, structure_vs_recovery, verdict
from .workers import pretrain_in_parallel, run_in_parallel

__all__ = ["SETTINGS", "TRAIN_OPTIONS", "RELEARN_CONTROLS", "PROBES", "NULLS", "RunSpec", "PipelineConfig",
           "split_requests", "Pipeline", "selective_runs", "summarize"]

SETTINGS = ("single", "continual")
RELEARN_CONTROLS = ("forget", "retain", "unrelated")
PROBES = ("forget", "retain", "unrelated")
NULLS = ("random_init", "other_seed", "retain_oracle")
TRAIN_OPTIONS = ("forget_weight", "weight_decay", "warmup", "scheduler", "grad_accum", "max_steps", "gamma",
                 "rmu_layer", "rmu_steer")
STRUCTURE_DRAWS = 200  # bootstrap draws of the pooled-CKA drift per probe set and stage
_TOKEN_STORE_BYTES = 256 << 20  # the original's token rows of one probe set are stored up to this size
_SELECTIVE = {"forget_drop": 0.5, "retain_drop": 0.1}


@dataclass(frozen=True)
class RunSpec:
    """One unlearning run: ``method`` at ``lr`` for ``epochs`` per request, in the ``single`` setting (the whole
    forget set at once) or ``continual`` (``requests`` chunks of whole forget entities, one after another,
    each with the full budget); ``retain_weight`` scales the retain term of the methods that have one;
    ``seed`` seeds the data order, RLabel's answers and the relearning subsets;
    ``reference``: NPO's reference and the KL anchor are the ``original`` model or the ``current`` one at
    the start of each request; ``options``: further TrainConfig fields of the unlearning stages (TRAIN_OPTIONS:
    knobs and method hyperparameters), named in the run id when given."""

    method: str
    lr: float
    setting: str = "single"
    requests: int = 1
    epochs: int = 5
    batch_size: int = 16
    beta: float = 0.1
    retain_weight: float = 1.0
    seed: int = 0
    reference: str = "original"
    optimizer: str = "adamw"  # "adamw" | "sgd" | "adafactor" (see models.memory_plan for 7B on one GPU)
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        get_method(self.method)
        unknown = sorted(set(self.options) - set(TRAIN_OPTIONS))
        if unknown:
            raise ValueError(f"options {unknown} are not unlearning settings; choose from {', '.join(TRAIN_OPTIONS)}")
        TrainConfig(**self.options)  # checks the values
        object.__setattr__(self, "options", dict(sorted(self.options.items())))
        if self.setting not in SETTINGS:
            raise ValueError(f"setting must be one of {SETTINGS}, got {self.setting!r}")
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {self.reference!r}")
        for name in ("lr", "beta", "retain_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        for name in ("requests", "epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.setting == "single" and self.requests != 1:
            object.__setattr__(self, "requests", 1)

    @property
    def run_id(self) -> str:
        setting = "single" if self.setting == "single" else f"continual{self.requests}"
        tail = "" if self.reference == "original" else "_ref-current"
        tail += "".join(f"_{key}-{value:g}" if isinstance(value, float) else f"_{key}-{value}"
                        for key, value in self.options.items())
        return f"{self.method}_lr{self.lr:g}_{setting}_seed{self.seed}{tail}"

    def record(self) -> dict:
        """The spec as JSON (``options`` only when given, so runs without them keep their stored form)."""
        out = asdict(self)
        if not out["options"]:
            del out["options"]
        return out

    def unlearning_stages(self) -> list:
        return ["unlearned"] if self.setting == "single" else [f"unlearned_{i}" for i in range(1, self.requests + 1)]


@dataclass
class PipelineConfig:
    """Everything shared by the runs of one output directory.

    examples: {split: items} (``benchmark.make_benchmark(seed, benchmark)`` when None); model: ``tiny`` | path
    | preset; seed: the benchmark's and the embedded models' seed. relearn_*: the relearning budget of every
    control (matched to the forget set: as many items, ``relearn_epochs`` epochs). eval_items: items per
    evaluation split at most (a fixed subset; the forget split is always whole); probe_items: items per probe
    set. nulls: the null models to measure, among NULLS (pretrained variants of the embedded model, or
    ``null_models`` {name: directory} for a local model; random_init is built from the config).
    tiny_options: overrides of the embedded model's architecture / recipe / vocabulary (``pretrain.load_tiny``).
    workers: run-level parallelism in one process's stead (``workers``: single-threaded processes; ignored
    under a torch.distributed launcher).
    fsdp: how the trainee is sharded under several processes (unused in one process).
    mink_k: the fraction of lowest answer-token scores Min-K% and Min-K%++ average; chat_template: prompts are
    rendered by the tokenizer's chat template (``data.encode``); tofu_metrics: every evaluation also computes
    TOFU's and MUSE's numbers (``metrics``: ROUGE-L, probability, truth ratio, model utility; forget quality and
    privleak against the retain oracle); save_models: the model after each run's last unlearning stage and after
    each relearning control is written to OUT/models/RUN/STAGE (``models.export_model``; the stage record's
    ``model_dir``); lora: LoRA adapters are trained instead of the full weights, in unlearning and relearning
    alike, and every stage is evaluated and diagnosed on the merged model; invocation: the resolved command-line
    options (and experiment file) that made this configuration, written into the report as config["resolved"].
    """

    out: Path
    model: str = "tiny"
    cache_dir: Path = Path("~/.cache/repforget").expanduser()
    device: str = "cpu"
    seed: int = 0
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    max_length: int = 64
    eval_batch_size: int = 64
    eval_items: int = 96
    probe_items: int = 64
    relearn_lr: float = 1e-3
    relearn_epochs: int = 1
    relearn_batch_size: int = 16
    relearn_optimizer: str = "adamw"
    relearn_controls: tuple = RELEARN_CONTROLS
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    thresholds: dict = field(default_factory=dict)
    examples: Optional[dict] = None
    data_sources: dict = field(default_factory=dict)
    nulls: tuple = NULLS
    null_models: dict = field(default_factory=dict)
    tiny_options: dict = field(default_factory=dict)
    workers: int = 1
    progress: bool = True
    fsdp: FSDPSettings = field(default_factory=FSDPSettings)
    restart: bool = False
    mink_k: float = MIN_K
    chat_template: bool = False
    tofu_metrics: bool = False
    save_models: bool = False
    lora: Optional[LoraSettings] = None
    invocation: dict = field(default_factory=dict)

    def settings(self) -> dict:
        """The settings the stored state depends on besides the data and the model files (JSON-ready)."""
        return {"model": self.model, "seed": self.seed, "max_length": self.max_length,
                "eval_batch_size": self.eval_batch_size, "eval_items": self.eval_items,
                "probe_items": self.probe_items, "relearn": [self.relearn_lr, self.relearn_epochs,
                                                             self.relearn_batch_size, self.relearn_optimizer],
                "diagnostics": asdict(self.diagnostics), "nulls": list(self.nulls), "mink_k": self.mink_k,
                "chat_template": self.chat_template, "tofu_metrics": self.tofu_metrics,
                "lora": None if self.lora is None else {"rank": self.lora.rank, "alpha": self.lora.alpha,
                                                        "targets": list(self.lora.targets)},
                "null_models": {k: str(v) for k, v in sorted(self.null_models.items())}}


def split_requests(items: list, n: int) -> list:
    """Split ``items`` into ``n`` requests of whole entities (items sharing ``entity`` stay together; items
    without one are their own unit), contiguous in first-appearance order, sizes differing by at most one unit."""
    units: dict = {}
    for i, item in enumerate(items):
        entity = item.get("entity") if isinstance(item, dict) else None
        units.setdefault(f"#{i}" if entity is None else entity, []).append(item)
    groups = list(units.values())
    if not 1 <= n <= len(groups):
        raise ValueError(f"cannot split {len(groups)} forget entities into {n} requests (need 1 <= requests <= entities)")
    q, r = divmod(len(groups), n)
    bounds = [i * q + min(i, r) for i in range(n + 1)]
    return [[item for g in groups[bounds[i]:bounds[i + 1]] for item in g] for i in range(n)]


def selective_runs(runs: list) -> list:
    """Run ids whose forget exact match fell by >= 0.5 while retain (and utility, where measured) fell by <= 0.1."""
    out = []
    for run in runs:
        b = run["verdict"]["behaviour"]
        drops = [b.get("retain_drop"), b.get("utility_drop")]
        if b["forget_drop"] >= _SELECTIVE["forget_drop"] and all(d is None or d <= _SELECTIVE["retain_drop"] for d in drops) \
                and drops[0] is not None:
            out.append(run["run_id"])
    return out


def summarize(runs: list, nulls: dict) -> dict:
    """report.json's ``summary``: regime counts, the headline correlation, the nulls' drift, the selective runs,
    and with several seeds each grid cell's label agreement."""
    cells: dict = {}
    for run in runs:
        cells.setdefault((run["method"], run["lr"], run["setting"], run["requests"]), []).append(
            run["verdict"]["behaviour"]["label"])
    agreement = {}
    for (method, lr, setting, requests), labels in cells.items():
        label, count = Counter(labels).most_common(1)[0]
        agreement[f"{method}_lr{lr:g}_{setting}{requests if setting == 'continual' else ''}"] = {
            "label": label, "agree": count, "seeds": len(labels)}
    return {"regimes": dict(Counter(r["verdict"]["behaviour"]["label"] for r in runs)),
            "structure_vs_recovery": structure_vs_recovery(runs),
            "nulls": {name: {probe: (null.get("record") or {}).get("structure", {}).get(probe, {}).get("summary")
                             for probe in PROBES} for name, null in nulls.items()},
            "selective_runs": selective_runs(runs), "seed_agreement": agreement}


class Pipeline:
    """Runs a list of :class:`RunSpec` against one original model with resumable state under ``cfg.out``.

    ``on_stage_done(run_id, stage_name)`` is called after each stage's files are on disk (progress
    reporting; the tests raise from it to simulate an interruption).
    """

    def __init__(self, cfg: PipelineConfig, on_stage_done: Optional[Callable[[str, str], None]] = None):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.state = StateDir(self.out / "state")
        self.on_stage_done = on_stage_done or (lambda run_id, stage: None)
        self.examples = cfg.examples if cfg.examples is not None else make_benchmark(cfg.seed, cfg.benchmark)
        missing = [s for s in ("forget", "retain") if not self.examples.get(s)]
        if missing:
            raise ValueError(f"examples need non-empty splits {missing}")

    # ----------------------------------------------------------------- state checks
    def fingerprint(self) -> dict:
        """What the stored state is computed from: the settings, a content digest of each data split and
        the digest of each model file (so edited data or other weights never reuse old numbers)."""
        return {"settings": self.cfg.settings(),
                "data": {split: content_digest(items) for split, items in sorted(self.examples.items())},
                "model_files": model_identity(self.info["path"])}

    def _claim_state(self) -> None:
        """Create OUT/state/config.json, or check that the one there matches this config."""
        mine = self.fingerprint()
        if broadcast(self.state.exists("config.json")):
            theirs = self.state.read_json("config.json", remedy="rerun with --restart (the state cannot be trusted "
                                                                 "without it), or use another --out")
            if theirs != mine:
                raise StateMismatch(f"{self.state.root} holds results computed from something else: "
                                    + "; ".join(_fingerprint_changes(theirs, mine))
                                    + ". Use another --out, or --restart to discard them")
        elif is_main():
            self.state.write_json("config.json", mine)

    def _claim_run(self, spec: RunSpec) -> None:
        rel = f"{spec.run_id}/spec.json"
        if broadcast(self.state.exists(rel)):
            if self.state.read_json(rel) != spec.record():
                raise StateMismatch(f"{self.state.path(spec.run_id)} holds run {spec.run_id} with different settings; "
                                    "use another --out, or --restart to discard it")
        elif is_main():
            self.state.write_json(rel, spec.record())

    # ----------------------------------------------------------------- main loop
    def run(self, specs: list) -> dict:
        """Run (or resume) every spec; returns the report dict after writing OUT/report.{json,md} and PNGs."""
        if len({s.run_id for s in specs}) != len(specs):
            raise ValueError("two runs share a run id (same method, lr, setting, requests, seed and reference)")
        for spec in specs:
            if spec.setting == "continual":
                split_requests(self.examples["forget"], spec.requests)  # fails early when there are too few entities
        self.out.mkdir(parents=True, exist_ok=True)
        if self.cfg.restart and is_main():
            self.state.clear()
        parallel = self.cfg.workers > 1 and world()[1] == 1
        if parallel and self.cfg.model == "tiny":
            pretrain_in_parallel(self.cfg, self._uncached_variants())
        original, nulls = self.prepare(specs)
        if parallel:
            total = sum(len(self._stage_names(s)) for s in specs)
            done = sum(self._finished(s) for s in specs)
            todo = [s for s in specs if self._finished(s) < len(self._stage_names(s))]
            if todo:
                run_in_parallel(self.cfg, todo, done, total)
        runs = []
        retain_record = (nulls.get("retain_oracle") or {}).get("record") if self.cfg.tofu_metrics else None
        for spec in tqdm(specs, desc="runs", disable=not self.cfg.progress or parallel):
            stages = [original] + self.run_stages(spec)
            if self.cfg.tofu_metrics:
                stages = [dict(stage, **against_retain(stage, retain_record)) for stage in stages]
            runs.append({"run_id": spec.run_id, "method": spec.method, "lr": spec.lr, "setting": spec.setting,
                         "requests": spec.requests, "seed": spec.seed, "reference": spec.reference,
                         "spec": spec.record(), "stages": stages,
                         "verdict": verdict(stages, nulls, self.cfg.thresholds)})
        for run in runs:
            b = run["verdict"]["behaviour"]
            run["label"] = b["label"]
            run["recoveries"] = {c: b.get("recovery" if c == "forget" else f"recovery_{c}")
                                 for c in self.cfg.relearn_controls}
        report = {"kind": "repforget-report", "config": self._config_json(), "versions": versions(),
                  "thresholds": dict(THRESHOLDS, **self.cfg.thresholds), "nulls": nulls, "runs": runs,
                  "summary": summarize(runs, nulls)}
        if is_main():
            write_report(self.out, report)
        return report

    def prepare(self, specs: list) -> tuple:
        """Everything the runs share, computed or read back: the model, the state's claim, the original stage
        and the nulls. Returns (original stage record, nulls)."""
        self._load()
        self._claim_state()
        for spec in specs:
            self._claim_run(spec)
        return self._original_stage(), self._null_stages()

    def _uncached_variants(self) -> list:
        """The embedded-model variants this output directory needs that are not pretrained yet."""
        from .pretrain import cache_path

        wanted = ["original"] + [n for n in self.cfg.nulls if n != "random_init"]
        return [v for v in wanted if not (cache_path(self.cfg.cache_dir, self.examples, variant=v, seed=self.cfg.seed,
                                                     **self.cfg.tiny_options) / "info.json").is_file()]

    def _config_json(self) -> dict:
        c = self.cfg
        return dict(c.settings(), data_digests=self.fingerprint()["data"], benchmark=asdict(c.benchmark),
                    data={k: str(v) for k, v in sorted(c.data_sources.items())}, sample=c.diagnostics.sample,
                    device=str(c.device), world_size=world()[1], model_info=self.info,
                    relearn_controls=list(c.relearn_controls),
                    n_items={k: len(v) for k, v in self.examples.items()},
                    eval_splits=list(self.eval_splits), probe_sets=list(self.probes), resolved=c.invocation)

    # ----------------------------------------------------------------- data and models
    def _subset(self, split: str, limit: int) -> list:
        return self.examples[split][:limit]

    def _load(self) -> None:
        c = self.cfg
        # the tiny model may need pretraining: rank 0 fills the cache, the others then read it
        with main_rank_first() if c.model == "tiny" else contextlib.nullcontext():
            self.reference, self.tokenizer, self.info = load_model(
                c.model, cache_dir=c.cache_dir, device=c.device, seed=c.seed, corpus=self.examples,
                progress=c.progress, tiny_options=c.tiny_options)
        self.reference.requires_grad_(False)
        if c.lora is not None:
            check_lora_targets(self.reference, c.lora)
        enc = self._encode
        limit = {s: len(self.examples[s]) if s == "forget" else c.eval_items for s in EVAL_SPLITS}  # forget: all of it
        self.eval_splits = {s: enc(self._subset(s, limit[s])) for s in EVAL_SPLITS if self.examples.get(s)}
        self.eval_alternatives = {s: truth_ratio_data(self.tokenizer, self._subset(s, limit[s]), c.max_length,
                                                      c.chat_template) for s in self.eval_splits} if c.tofu_metrics else None
        self.probes = {s: self._subset(s, c.probe_items) for s in PROBES if self.examples.get(s)}
        self.encoded_probes = {s: enc(items) for s, items in self.probes.items()}
        self.fisher_probes = {s: enc(items[:c.diagnostics.fisher_items]) for s, items in self.probes.items()}
        self.forget_all = enc(self.examples["forget"])

    def _encode(self, items: list) -> dict:
        return encode(self.tokenizer, items, max_length=self.cfg.max_length, chat_template=self.cfg.chat_template)

    def _token_source(self) -> Optional[str]:
        """Where token-level CKA gets the original's token rows: stored once ("store", when every probe set's
        rows fit in ``_TOKEN_STORE_BYTES``), else by running the original again at every stage ("model")."""
        if not self.cfg.diagnostics.token_cka:
            return None
        if world()[1] > 1:  # each rank would store only its own batches' rows; reference.pt holds rank 0's
            return "model"
        config = self.reference.config
        tokens = max(int(enc["attention_mask"].sum()) for enc in self.encoded_probes.values())
        return "store" if tokens * config.num_hidden_layers * config.hidden_size * 4 <= _TOKEN_STORE_BYTES else "model"

    def _evaluate(self, model) -> dict:
        return evaluate(model, self.eval_splits, batch_size=self.cfg.eval_batch_size, tokenizer=self.tokenizer,
                        generate_batch_size=self.cfg.eval_batch_size, mink_k=self.cfg.mink_k,
                        tofu=self.cfg.tofu_metrics, alternatives=self.eval_alternatives)

    def _forget_em(self, model) -> float:
        """Forget exact match as the stage evaluation computes it (same items, same batches: batch composition
        changes float rounding, which can flip a near-tie of greedy decoding)."""
        return float(exact_match(model, self.eval_splits["forget"], tokenizer=self.tokenizer,
                                 batch_size=self.cfg.eval_batch_size).float().mean())

    def _structure(self, model, draws: bool = False) -> dict:
        """{probe: {"layers", "fisher", "summary"[, "draws"]}} of ``model`` against the original on every probe set;
        ``draws``: also the bootstrap draws of the pooled-CKA drift (the verdict's stage and the nulls only)."""
        out = {}
        dcfg = self.cfg.diagnostics
        for probe, enc in self.encoded_probes.items():
            options = comparison_options(dcfg, enc, self.fisher_probes[probe])
            comparison = compare_models(self.ref_stats[probe], model, **options)
            record = comparison.to_dict()
            record["summary"] = structure_summary(record["layers"], record.get("fisher"))
            if draws:
                record["draws"] = {"cka_pooled": _cka_drift_draws(comparison.rows_reference, comparison.rows_updated)}
            out[probe] = record
        return out

    @staticmethod
    def _plain(model):
        """The plain model a stage is evaluated and diagnosed on: a gathered replica of a sharded trainee, the
        merged copy of a LoRA one, else the model itself."""
        if is_sharded(model):
            return plain_copy(model)
        return merged_copy(model) if is_lora(model) else model

    def _export(self, run_id: str, stage: str, model) -> str:
        """``save_models``: the stage's model as a Hugging Face directory OUT/models/RUN/STAGE (models.export_model);
        returns its path relative to OUT. Every rank takes part, rank 0 writes."""
        plain = plain_copy(model) if is_sharded(model) else model
        rel = Path("models") / run_id / stage
        if is_main():
            export_model(plain, self.tokenizer, self.out / rel)
        return str(rel)

    def _measure(self, model, draws: bool = False) -> dict:
        """Evaluation and diagnostics of a stage's model (a sharded trainee through a gathered plain replica)."""
        plain = self._plain(model)
        return dict(**self._evaluate(plain), structure=self._structure(plain, draws))

    def _original_stage(self) -> dict:
        """The original model's stage record (and reference statistics per probe set), computed once per OUT."""
        dcfg = self.cfg.diagnostics
        tokens = self._token_source()
        token_model = self.reference if tokens == "model" else None  # run again per stage for token-level CKA
        if broadcast(self.state.exists("original.json")):
            saved = self.state.read_json("original.json")
            stats = self.state.load_torch("reference.pt", saved["reference_sha256"])
            self.ref_stats = {p: ReferenceStatistics.from_state_dict(s, model=token_model) for p, s in stats.items()}
            return saved["record"]
        torch.manual_seed(self.cfg.seed)
        self.ref_stats = {}
        for probe, enc in self.encoded_probes.items():
            self.ref_stats[probe] = ReferenceStatistics.compute(
                self.reference, **statistics_options(dcfg, enc, self.fisher_probes[probe]), tokens=tokens,
                max_token_bytes=_TOKEN_STORE_BYTES)
        torch.manual_seed(self.cfg.seed)
        record = dict(name="original", train=None, **self._measure(self.reference))
        if is_main():
            digest = self.state.save_torch("reference.pt", {p: s.state_dict() for p, s in self.ref_stats.items()})
            self.state.write_json("original.json", {"record": record, "reference_sha256": digest})
        return record

    # ----------------------------------------------------------------- nulls
    def _null_model(self, name: str):
        """(model, info) of a null, or None when it cannot be had for this model."""
        c = self.cfg
        if c.model == "tiny":
            with main_rank_first():
                model, _, info = load_model("tiny", cache_dir=c.cache_dir, device=c.device, seed=c.seed,
                                            corpus=self.examples, variant=name, progress=c.progress,
                                            tiny_options=c.tiny_options)
            return model, info
        if name in c.null_models:
            model, _, info = load_model(str(c.null_models[name]), cache_dir=c.cache_dir, device=c.device)
            return model, info
        if name == "random_init":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(c.seed)
                model = type(self.reference)(copy.deepcopy(self.reference.config)).to(c.device)
            return model.eval(), {"name": "random_init", "variant": "random_init"}
        return None

    def _null_stages(self) -> dict:
        """{null: {"record": stage-like record vs the original, "relearned": (retain oracle) after the runs'
        relearning on the forget set, "info"}}, computed once per OUT."""
        nulls = {}
        for name in self.cfg.nulls:
            rel = f"nulls/{name}.json"
            if broadcast(self.state.exists(rel)):
                nulls[name] = self.state.read_json(rel)
                continue
            got = self._null_model(name)
            if got is None:
                continue
            model, info = got
            torch.manual_seed(self.cfg.seed)
            entry = {"info": info, "record": dict(name=name, train=None, **self._measure(model, draws=True))}
            if name == "retain_oracle":
                entry["relearned"] = self._relearn_control(model, "forget", self.cfg.seed)
            if is_main():
                self.state.write_json(rel, entry)
            nulls[name] = entry
            del model
        return nulls

    # ----------------------------------------------------------------- runs
    def _stage_names(self, spec: RunSpec) -> list:
        return spec.unlearning_stages() + [f"relearned_{c}" for c in self.cfg.relearn_controls]

    def _finished(self, spec: RunSpec) -> int:
        """How many of the run's stages are on disk (consecutive from the first)."""
        names = self._stage_names(spec)
        done = 0
        while done < len(names) and self.state.exists(f"{spec.run_id}/{done + 1}_{names[done]}.json"):
            done += 1
        return done

    def run_stages(self, spec: RunSpec) -> list:
        """Finished and new stage records of one run (without the shared original stage); call after
        :meth:`prepare`."""
        unl = spec.unlearning_stages()
        names = self._stage_names(spec)
        files = [f"{spec.run_id}/{i}_{name}.json" for i, name in enumerate(names, start=1)]
        done = broadcast(self._finished(spec))  # rank 0's view of the state decides
        saved = [self.state.read_json(f) for f in files[:done]]
        records = [entry["record"] for entry in saved]
        if done == len(names):
            return records
        last_unl = min(done, len(unl))  # unlearning stages finished (their last checkpoint is kept)
        unlearned_digest = saved[last_unl - 1]["checkpoint_sha256"] if last_unl else None
        model = self._model_at(spec.run_id, last_unl, unl[last_unl - 1] if last_unl else None, unlearned_digest)
        holds_unlearned = last_unl == len(unl)  # the model is the final unlearned one (each control starts there)
        requests = self._requests(spec)
        bar = tqdm(total=len(names), initial=done, desc=spec.run_id, disable=not self.cfg.progress, leave=False)
        for i in range(done, len(names)):
            torch.manual_seed(spec.seed * 1000 + i + 1)
            if i < len(unl):
                tc = TrainConfig(lr=spec.lr, epochs=spec.epochs, batch_size=spec.batch_size, beta=spec.beta,
                                 retain_weight=spec.retain_weight, seed=spec.seed * 1000 + i,
                                 progress=self.cfg.progress, optimizer=spec.optimizer, **spec.options)
                train = unlearn(model, spec.method, requests[i], self.encoded_retain_train(), tc,
                                reference=self.reference if spec.reference == "original" else None,
                                tokenizer=self.tokenizer)
                record = dict(name=names[i], train=train, **self._measure(model, draws=i == len(unl) - 1))
                holds_unlearned = i == len(unl) - 1
                if holds_unlearned and self.cfg.save_models:
                    record["model_dir"] = self._export(spec.run_id, names[i], model)
            else:
                if not holds_unlearned:  # an earlier control relearned it: back to the unlearned checkpoint
                    del model
                    model = self._model_at(spec.run_id, len(unl), unl[-1], unlearned_digest)
                control = names[i].split("_", 1)[1]
                record = dict(name=names[i], **self._relearn_control(model, control, spec.seed, measure=True))
                holds_unlearned = False
                if self.cfg.save_models:
                    record["model_dir"] = self._export(spec.run_id, names[i], model)
            checkpoint = full_state_dict(model) if i < len(unl) else None  # every rank takes part
            if is_main():
                digest = None
                if checkpoint is not None:
                    digest = unlearned_digest = self.state.save_torch(f"{spec.run_id}/{i + 1}_{names[i]}.pt",
                                                                      checkpoint)
                self.state.write_json(files[i], {"record": record, "checkpoint_sha256": digest})
                if 0 < i < len(unl):
                    self.state.remove(f"{spec.run_id}/{i}_{names[i - 1]}.pt")
                if i == len(names) - 1:
                    self.state.remove(f"{spec.run_id}/{len(unl)}_{unl[-1]}.pt")
            records.append(record)
            bar.update(1)
            self.on_stage_done(spec.run_id, names[i])
        bar.close()
        return records

    def encoded_retain_train(self) -> dict:
        """The retain data the methods with a retain term train on (the whole retain split), encoded once."""
        if not hasattr(self, "_retain_train"):
            self._retain_train = self._encode(self.examples["retain"])
        return self._retain_train

    def _relearn_data(self, control: str, seed: int) -> dict:
        """The relearning data of a control: the forget set, or as many retain / unrelated items (a seeded sample)."""
        forget = self.examples["forget"]
        if control == "forget":
            return self.forget_all
        pool = self.examples.get(control) or []
        if not pool:
            raise ValueError(f"relearning control {control!r} needs a non-empty {control!r} split")
        rng = random.Random(seed * 7919 + len(control))
        items = [pool[i % len(pool)] for i in rng.sample(range(max(len(pool), len(forget))), len(forget))]
        return self._encode(items)

    def _relearn_control(self, model, control: str, seed: int, measure: bool = False) -> dict:
        """Relearn ``model`` in place on one control's data with the matched budget; forget exact match after every
        step. Returns {"train", "control", "curve", and the evaluation (+ structure when ``measure``)}."""
        c = self.cfg
        curve = [self._forget_em(self._plain(model))]

        def after_step(step: int) -> None:
            curve.append(self._forget_em(self._plain(model)))

        tc = TrainConfig(lr=c.relearn_lr, epochs=c.relearn_epochs, batch_size=c.relearn_batch_size, seed=seed,
                         progress=c.progress, optimizer=c.relearn_optimizer)
        train = relearn(model, self._relearn_data(control, seed), tc, on_step=after_step)
        plain = self._plain(model)
        record = {"train": train, "control": control, "curve": curve, **self._evaluate(plain)}
        if measure:
            record["structure"] = self._structure(plain)
        return record

    def _model_at(self, run_id: str, done: int, name: Optional[str], digest: Optional[str]):
        """A trainable copy of the original (sharded under several processes), with the checkpoint of unlearning
        stage ``done`` (1-based, named ``name``, its bytes checked against ``digest``) loaded if any."""
        model = copy.deepcopy(self.reference).to(self.cfg.device).requires_grad_(True)
        if self.cfg.lora is not None:
            model = with_lora(model, self.cfg.lora)
        if world()[1] > 1:
            shard_model(model, self.cfg.fsdp)
        if done > 0:
            ckpt = f"{run_id}/{done}_{name}.pt"
            # read into host memory; a sharded model gets rank 0's copy scattered to every rank's shards
            state = {} if is_sharded(model) and not is_main() else self.state.load_torch(ckpt, digest,
                                                                                          map_location="cpu")
            load_full_state_dict(model, state)
        return model

    def _requests(self, spec: RunSpec) -> list:
        """Encoded forget data of each unlearning request (one request in the single setting)."""
        chunks = split_requests(self.examples["forget"], spec.requests)
        return [self._encode(chunk) for chunk in chunks]


def _cka_drift_draws(x: torch.Tensor, y: torch.Tensor, draws: int = STRUCTURE_DRAWS) -> Optional[list]:
    """Bootstrap draws of mean_l (1 - CKA(x_l, y_l)) over resampled rows (the same rows for every model:
    the indices are a pure function of n): x, y (L, n, d) -> ``draws`` floats, or None where undefined."""
    from .verdict import bootstrap_indices

    n = x.shape[1]
    idx = torch.from_numpy(bootstrap_indices(n, draws))  # (draws, n)
    xs = x[:, idx].flatten(0, 1)  # (L * draws, n, d)
    ys = y[:, idx].flatten(0, 1)
    try:
        cka = linear_cka(xs, ys).view(x.shape[0], draws)  # (L, draws)
    except ValueError:  # a resample without variance in some layer
        return None
    return (1.0 - cka.double()).mean(0).tolist()


def _fingerprint_changes(theirs: dict, mine: dict) -> list:
    """What differs between two fingerprints, in words (data splits and model files named)."""
    changes = []
    for key in sorted(set(theirs) | set(mine)):
        a, b = theirs.get(key), mine.get(key)
        if a == b:
            continue
        if key in ("data", "model_files") and isinstance(a, dict) and isinstance(b, dict):
            names = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            what = "data split" if key == "data" else "model file"
            changes.append(f"{what}{'s' if len(names) > 1 else ''} {', '.join(names)} changed")
        else:
            changes.append(f"{key} changed ({a!r} -> {b!r})" if key != "settings" else
                           "settings changed (" + ", ".join(k for k in sorted(set(a or {}) | set(b or {}))
                                                           if (a or {}).get(k) != (b or {}).get(k)) + ")")
    return changes
