"""Run-level parallelism on one machine: a pool of single-threaded worker processes.

The embedded model's matrices are far too small for intra-op threads to help (two threads on two
cores are slower than one, and collapse under load), but independent runs parallelise perfectly. With
``PipelineConfig.workers > 1`` (one process, no torch.distributed launcher) the pipeline therefore

1. pretrains the embedded models it needs (original and nulls) concurrently, one process each, each
   writing its cache directory atomically (``pretrain.load_tiny``);
2. computes the original stage and the nulls in the main process (they are shared by every run);
3. hands the runs to ``workers`` spawned processes, costliest first, each resuming or computing its
   runs' stages into ``OUT/state`` exactly as one process would (every stage is seeded by its run and
   index, so the numbers do not depend on which process computed them), while the main process shows
   one progress bar over all stages;
4. reads every finished stage back and writes the report as usual.

A failure in a worker stops the pool and is raised in the main process with the worker's message;
finished stages stay in ``OUT/state``, so rerunning the command resumes.
"""
from __future__ import annotations

import multiprocessing as mp
import queue as queue_module
import traceback
from dataclasses import replace

from tqdm.auto import tqdm

__all__ = ["run_in_parallel", "pretrain_in_parallel", "cost"]


def cost(spec, relearn_controls: int) -> int:
    """Relative cost of a run, for ordering the work: one unit per measured stage."""
    return spec.requests + relearn_controls


def _single_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _pretrain_worker(cfg, variant: str, results) -> None:
    """Load (pretraining it on first use) one embedded-model variant into the cache."""
    try:
        _single_thread()
        from .models import load_model
        from .pipeline import Pipeline

        pipe = Pipeline(replace(cfg, progress=False, workers=1))
        load_model("tiny", cache_dir=cfg.cache_dir, device=cfg.device, seed=cfg.seed, corpus=pipe.examples,
                   variant=variant, progress=False, tiny_options=cfg.tiny_options)
        results.put(("done", variant))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        results.put(("error", f"pretraining {variant}: {traceback.format_exc()}"))


def _run_worker(cfg, specs: list, messages) -> None:
    """Compute (or resume) the stages of ``specs``, reporting each finished stage."""
    try:
        _single_thread()
        from .pipeline import Pipeline

        pipe = Pipeline(replace(cfg, progress=False, workers=1, restart=False),
                        on_stage_done=lambda run_id, stage: messages.put(("stage", run_id, stage)))
        pipe.prepare(specs)
        for spec in specs:
            pipe.run_stages(spec)
        messages.put(("done",))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        messages.put(("error", traceback.format_exc()))


def _wait(processes: list, messages, expected: int, bar=None) -> None:
    """Collect ``expected`` "done" messages (advancing ``bar`` on stages); raise on a worker's error."""
    done = 0
    try:
        while done < expected:
            try:
                message = messages.get(timeout=1.0)
            except queue_module.Empty:
                dead = [p for p in processes if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a worker process exited with status {dead[0].exitcode} without a report")
                continue
            if message[0] == "error":
                raise RuntimeError("a worker failed:\n" + message[-1])
            if message[0] == "stage" and bar is not None:
                bar.update(1)
                bar.set_postfix_str(message[1], refresh=False)
            elif message[0] == "done":
                done += 1
                if bar is not None and len(message) > 1:  # a pretraining worker: one unit each
                    bar.update(1)
    finally:
        for p in processes:
            if p.is_alive() and done < expected:
                p.terminate()
            p.join()


def pretrain_in_parallel(cfg, variants: list) -> None:
    """Pretrain the embedded-model ``variants`` concurrently, one single-threaded process each (three
    processes on two cores finish in 1.5x the time of one, where two-then-one would take 2x)."""
    if not variants:
        return
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_pretrain_worker, args=(cfg, v, results), daemon=True) for v in variants]
    with tqdm(total=len(variants), desc=f"pretrain {', '.join(variants)}", disable=not cfg.progress) as bar:
        for p in processes:
            p.start()
        _wait(processes, results, len(processes), bar)


def run_in_parallel(cfg, specs: list, done_stages: int, total_stages: int) -> None:
    """Compute every spec's missing stages in ``cfg.workers`` spawned processes (costliest runs first,
    dealt round robin)."""
    order = sorted(specs, key=lambda s: -cost(s, len(cfg.relearn_controls)))
    shares = [order[i::cfg.workers] for i in range(cfg.workers)]
    shares = [s for s in shares if s]
    context = mp.get_context("spawn")
    messages = context.Queue()
    processes = [context.Process(target=_run_worker, args=(cfg, share, messages), daemon=True) for share in shares]
    with tqdm(total=total_stages, initial=done_stages, desc=f"stages ({len(shares)} workers)",
              disable=not cfg.progress) as bar:
        for p in processes:
            p.start()
        _wait(processes, messages, len(processes), bar)
