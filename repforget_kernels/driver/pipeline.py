"""The driver's experiment: original -> unlearned (single) or unlearned_1..N (continual) -> relearned.

A *run* is one :class:`RunSpec` (method, learning rate, setting, relearn budget and data). Every
stage is evaluated (``evaluate.evaluate``: forget / retain accuracy, perplexity, MIA AUCs) and
diagnosed against the original model (``repforget_kernels.compare_models``: CKA, PCA similarity and
shift, Fisher), and each run ends with a verdict (``report.verdict``).

State and resume. ``OUT/state/`` (a :class:`state.StateDir`: every JSON self-checksummed, every
checkpoint verified against the digest in the record written after it) holds, each written atomically
as soon as it exists: ``config.json`` (the fingerprint the state belongs to: settings, a content
digest of every data split and the digests of the model's files), ``reference.pt`` + ``original.json``
(the original model's ``ReferenceStatistics`` and stage record), and per run ``<run_id>/spec.json``,
``<run_id>/<i>_<stage>.pt`` (the model checkpoint of the last finished stage; older ones are removed
once a newer stage's record is on disk; the final stage needs none) and ``<run_id>/<i>_<stage>.json``.
Rerunning the same command skips finished stages, restarts from the last checkpoint and produces the
same report (each stage seeds torch with (seed, stage index), so the numbers do not depend on where a
run was interrupted). A fingerprint that differs (edited data, other weights, other settings) is a
:class:`state.StateMismatch` naming what changed, a damaged file a :class:`state.StateCorrupt` naming the
file; ``restart=True`` discards the state instead. Ctrl-C or an error leaves finished stages intact and
the previous report untouched: report.md, the PNGs and then report.json are replaced only when every
run is finished, each atomically.

Memory: the original model stays on the device for token-level CKA; without it (``token_cka=False``)
it moves to host memory after the original stage, and each run copies it back to the device.

Several processes (``torchrun`` / ``accelerate launch``, process group joined by the CLI): every
rank holds the original model; each run's trainee is sharded with FSDP2 (``distributed.shard_model``,
``cfg.fsdp``) and trained data-parallel (``train``); each stage's evaluation and diagnostics run on a
plain replica gathered from the shards, with the batches split across ranks and the results merged,
so every rank computes the one-process record. Rank 0 pretrains the tiny model (the others wait and
load it from the cache), decides what is already finished, and writes every file; the checkpoints
hold the full float32 master weights, so a resumed run continues from exactly where it stopped.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from repforget_kernels import ReferenceStatistics, compare_models

from .data import encode, make_corpus
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
from .evaluate import evaluate
from .losses import METHODS
from .models import load_model
from .report import THRESHOLDS, verdict, versions, write_report
from .state import StateDir, StateMismatch, content_digest, model_identity
from .train import TrainConfig, relearn, unlearn

__all__ = ["SETTINGS", "RELEARN_DATA", "RunSpec", "PipelineConfig", "split_requests", "Pipeline"]

SETTINGS = ("single", "continual")
RELEARN_DATA = ("forget", "retain", "probe")


@dataclass(frozen=True)
class RunSpec:
    """One unlearning run: ``method`` at ``lr`` for ``epochs`` (per request), in the ``single`` setting
    (the whole forget set at once) or ``continual`` (``requests`` chunks one after another), then
    ``relearn_epochs`` of NLL fine-tuning at ``relearn_lr`` on ``relearn_data`` (forget; retain or
    probe as controls)."""

    method: str
    lr: float
    setting: str = "single"
    requests: int = 5
    epochs: int = 1
    batch_size: int = 8
    beta: float = 0.1
    relearn_epochs: int = 1
    relearn_lr: float = 1e-3
    relearn_data: str = "forget"
    optimizer: str = "adamw"  # "adamw" | "sgd" | "adafactor" (see models.memory_plan for 7B on one GPU)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.setting not in SETTINGS:
            raise ValueError(f"setting must be one of {SETTINGS}, got {self.setting!r}")
        if self.relearn_data not in RELEARN_DATA:
            raise ValueError(f"relearn_data must be one of {RELEARN_DATA}, got {self.relearn_data!r}")
        for name in ("lr", "relearn_lr", "beta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        for name in ("requests", "epochs", "batch_size", "relearn_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")

    @property
    def run_id(self) -> str:
        setting = "single" if self.setting == "single" else f"continual{self.requests}"
        tail = "" if self.relearn_data == "forget" else f"_relearn-{self.relearn_data}"
        return f"{self.method}_lr{self.lr:g}_{setting}{tail}"

    def stage_names(self) -> list:
        unl = ["unlearned"] if self.setting == "single" else [f"unlearned_{i}" for i in range(1, self.requests + 1)]
        return ["original"] + unl + ["relearned"]


@dataclass
class PipelineConfig:
    """Everything shared by the runs of one output directory.

    examples: {split: list of items} (``make_corpus(seed)`` when None); model: ``tiny`` | path | preset.
    fsdp: how the trainee is sharded under several processes (unused in one process).
    """

    out: Path
    model: str = "tiny"
    cache_dir: Path = Path("~/.cache/repforget").expanduser()
    device: str = "cpu"
    seed: int = 0
    max_length: int = 64
    eval_batch_size: int = 16
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    thresholds: dict = field(default_factory=lambda: dict(THRESHOLDS))
    examples: Optional[dict] = None
    data_sources: dict = field(default_factory=dict)
    progress: bool = True
    fsdp: FSDPSettings = field(default_factory=FSDPSettings)
    restart: bool = False

    def settings(self) -> dict:
        """The settings the stored state depends on besides the data and the model files (JSON-ready)."""
        return {"model": self.model, "seed": self.seed, "max_length": self.max_length,
                "eval_batch_size": self.eval_batch_size, "diagnostics": asdict(self.diagnostics)}


def split_requests(items: list, n: int) -> list:
    """Split ``items`` into ``n`` contiguous, non-empty chunks whose sizes differ by at most one."""
    if not 1 <= n <= len(items):
        raise ValueError(f"cannot split {len(items)} forget items into {n} requests (need 1 <= requests <= items)")
    q, r = divmod(len(items), n)
    bounds = [i * q + min(i, r) for i in range(n + 1)]
    return [items[bounds[i]:bounds[i + 1]] for i in range(n)]


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
        self.examples = cfg.examples if cfg.examples is not None else make_corpus(cfg.seed)

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
            if self.state.read_json(rel) != asdict(spec):
                raise StateMismatch(f"{self.state.path(spec.run_id)} holds run {spec.run_id} with different settings; "
                                    "use another --out, or --restart to discard it")
        elif is_main():
            self.state.write_json(rel, asdict(spec))

    # ----------------------------------------------------------------- main loop
    def run(self, specs: list) -> dict:
        """Run (or resume) every spec; returns the report dict after writing OUT/report.{json,md} and PNGs."""
        if len({s.run_id for s in specs}) != len(specs):
            raise ValueError("two runs share a run id (same method, lr, setting and relearn data)")
        self.out.mkdir(parents=True, exist_ok=True)
        if self.cfg.restart and is_main():
            self.state.clear()
        self._load()
        self._claim_state()
        for spec in specs:
            self._claim_run(spec)
        original = self._original_stage()
        if not self.cfg.diagnostics.token_cka:  # from here on the original only seeds each run's copy
            self.reference.to("cpu")
        runs = []
        for spec in tqdm(specs, desc="runs", disable=not self.cfg.progress):
            stages = [original] + self._run_stages(spec)
            runs.append({"run_id": spec.run_id, "method": spec.method, "lr": spec.lr, "setting": spec.setting,
                         "requests": spec.requests if spec.setting == "continual" else 1, "spec": asdict(spec),
                         "stages": stages, "verdict": verdict(stages, self.cfg.thresholds)})
        report = {"kind": "repforget-report", "config": self._config_json(), "versions": versions(),
                  "thresholds": dict(THRESHOLDS, **self.cfg.thresholds), "runs": runs}
        if is_main():
            write_report(self.out, report)
        return report

    def _config_json(self) -> dict:
        c = self.cfg
        return dict(c.settings(), data_digests=self.fingerprint()["data"],
                    data={k: str(v) for k, v in sorted(c.data_sources.items())}, sample=c.diagnostics.sample,
                    device=str(c.device), world_size=world()[1], model_info=self.info,
                    n_items={k: len(v) for k, v in self.examples.items()})

    def _load(self) -> None:
        c = self.cfg
        # the tiny model may need pretraining: rank 0 fills the cache, the others then read it
        with main_rank_first() if c.model == "tiny" else contextlib.nullcontext():
            self.reference, self.tokenizer, self.info = load_model(
                c.model, cache_dir=c.cache_dir, device=c.device, seed=c.seed, corpus=self.examples,
                progress=c.progress)
        self.encoded = {k: encode(self.tokenizer, v, max_length=c.max_length) for k, v in self.examples.items()}

    def _evaluate(self, model) -> dict:
        splits = {k: self.encoded[k] for k in ("forget", "retain", "holdout", "probe") if k in self.encoded}
        return evaluate(model, splits, batch_size=self.cfg.eval_batch_size, tokenizer=self.tokenizer)

    def _measure(self, model) -> dict:
        """Evaluation and diagnostics of a stage's model (a sharded trainee through a gathered plain replica)."""
        plain = plain_copy(model) if is_sharded(model) else model
        return dict(**self._evaluate(plain), **self._diagnose(plain))

    def _diagnose(self, model) -> dict:
        options = comparison_options(self.cfg.diagnostics, self.encoded["probe"], self.encoded["forget"])
        return compare_models(self.ref_stats, model, **options).to_dict()

    def _original_stage(self) -> dict:
        """The original model's stage record (and reference statistics), computed once per OUT."""
        dcfg = self.cfg.diagnostics
        token_model = self.reference if dcfg.token_cka else None  # run again per stage for token-level CKA
        if broadcast(self.state.exists("original.json")):
            saved = self.state.read_json("original.json")
            stats = self.state.load_torch("reference.pt", saved["reference_sha256"])
            self.ref_stats = ReferenceStatistics.from_state_dict(stats, model=token_model)
            return saved["record"]
        torch.manual_seed(self.cfg.seed)
        self.ref_stats = ReferenceStatistics.compute(
            self.reference, **statistics_options(dcfg, self.encoded["probe"], self.encoded["forget"]),
            tokens="model" if dcfg.token_cka else None)
        torch.manual_seed(self.cfg.seed)
        record = dict(name="original", train=None, **self._measure(self.reference))
        if is_main():
            digest = self.state.save_torch("reference.pt", self.ref_stats.state_dict())
            self.state.write_json("original.json", {"record": record, "reference_sha256": digest})
        return record

    def _run_stages(self, spec: RunSpec) -> list:
        """Finished and new stage records of one run (without the shared original stage)."""
        names = spec.stage_names()[1:]
        files = [f"{spec.run_id}/{i}_{name}.json" for i, name in enumerate(names, start=1)]
        done = 0
        while done < len(names) and self.state.exists(files[done]):
            done += 1
        done = broadcast(done)  # rank 0's view of the state decides
        saved = [self.state.read_json(f) for f in files[:done]]
        records = [entry["record"] for entry in saved]
        if done == len(names):
            return records
        model = self._model_at(spec.run_id, names, done, saved[-1]["checkpoint_sha256"] if saved else None)
        requests = self._requests(spec)
        bar = tqdm(total=len(names), initial=done, desc=spec.run_id, disable=not self.cfg.progress)
        for i in range(done, len(names)):
            torch.manual_seed(self.cfg.seed * 1000 + i + 1)
            train = self._train_stage(model, spec, names[i], requests)
            record = dict(name=names[i], train=train, **self._measure(model))
            checkpoint = full_state_dict(model) if i + 1 < len(names) else None  # every rank takes part
            if is_main():
                digest = None
                if checkpoint is not None:
                    digest = self.state.save_torch(f"{spec.run_id}/{i + 1}_{names[i]}.pt", checkpoint)
                self.state.write_json(files[i], {"record": record, "checkpoint_sha256": digest})
                if i > 0:
                    self.state.remove(f"{spec.run_id}/{i}_{names[i - 1]}.pt")
            records.append(record)
            bar.update(1)
            self.on_stage_done(spec.run_id, names[i])
        bar.close()
        return records

    def _model_at(self, run_id: str, names: list, done: int, digest: Optional[str]):
        """A trainable copy of the original (sharded under several processes), with the checkpoint of stage
        ``done`` (1-based, its bytes checked against ``digest``) loaded if any."""
        model = copy.deepcopy(self.reference).to(self.cfg.device)
        if world()[1] > 1:
            shard_model(model, self.cfg.fsdp)
        if done > 0:
            ckpt = f"{run_id}/{done}_{names[done - 1]}.pt"
            # read into host memory; a sharded model gets rank 0's copy scattered to every rank's shards
            state = {} if is_sharded(model) and not is_main() else self.state.load_torch(ckpt, digest,
                                                                                          map_location="cpu")
            load_full_state_dict(model, state)
        return model

    def _requests(self, spec: RunSpec) -> list:
        """Encoded forget data of each unlearning request (one request in the single setting)."""
        forget = self.examples["forget"]
        chunks = [forget] if spec.setting == "single" else split_requests(forget, spec.requests)
        return [encode(self.tokenizer, chunk, max_length=self.cfg.max_length) for chunk in chunks]

    def _train_stage(self, model, spec: RunSpec, name: str, requests: list) -> dict:
        c = self.cfg
        if name == "relearned":
            tc = TrainConfig(lr=spec.relearn_lr, epochs=spec.relearn_epochs, batch_size=spec.batch_size,
                             seed=c.seed, progress=c.progress, optimizer=spec.optimizer)
            return relearn(model, self.encoded[spec.relearn_data], tc)
        index = 0 if name == "unlearned" else int(name.rsplit("_", 1)[1]) - 1
        tc = TrainConfig(lr=spec.lr, epochs=spec.epochs, batch_size=spec.batch_size, beta=spec.beta,
                         seed=c.seed + index, progress=c.progress, optimizer=spec.optimizer)
        return unlearn(model, spec.method, requests[index], self.encoded["retain"], tc)
