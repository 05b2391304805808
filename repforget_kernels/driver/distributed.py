"""The driver on several processes: process group, each rank's share of the work, FSDP2 sharding.

Launch with ``torchrun --nproc_per_node N -m repforget_kernels.driver ...`` or ``accelerate launch``
(both set WORLD_SIZE, RANK, LOCAL_RANK); :func:`join_process_group` joins with NCCL on CUDA (one GPU
per local rank) or gloo on CPU. Work is shared in two ways:

- forward-only passes over a dataset (evaluation, diagnostics) on plain, unsharded models: batch i
  runs on rank i mod world (:func:`rank_batches`) and the per-batch results are gathered back in
  batch order (:func:`gather_in_order`, :func:`gather_batch_rows`) or all-reduced;
- training on a model sharded with FSDP2 (:func:`shard_model`: one ``fully_shard`` group per decoder
  block plus the root, float32 master weights, compute in the loaded dtype): every rank walks the
  same global batches and takes a contiguous share of each batch's rows (:func:`rank_share`), and
  each rank's loss is divided by the global batch's token (or sequence) count, so the per-rank
  gradients add up to the one-process gradient (see ``train``).

:func:`plain_copy` and :func:`full_state_dict` gather a sharded model back into one plain model or
one checkpoint (collectives: every rank calls them). Inside :func:`local_only` a rank acts as a
single process (rank 0 pretrains the tiny model that way while the others wait).
"""
from __future__ import annotations

import contextlib
import copy
import os
import weakref
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional

import torch

from .data import iterate_batches

__all__ = [
    "FSDPSettings",
    "launched_world_size",
    "join_process_group",
    "leave_process_group",
    "world",
    "is_main",
    "local_only",
    "main_rank_first",
    "broadcast",
    "all_sum",
    "rank_batches",
    "gather_in_order",
    "gather_batch_rows",
    "rank_share",
    "shard_model",
    "is_sharded",
    "plain_copy",
    "full_state_dict",
    "load_full_state_dict",
]

_local_depth = 0  # > 0 inside local_only()
_SKELETONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # sharded model -> plain skeleton


# --------------------------------------------------------------------------- process group


def launched_world_size() -> int:
    """WORLD_SIZE set by the launcher (1 without one); readable before the process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join_process_group(device: str) -> tuple[str, bool]:
    """Under a launcher (WORLD_SIZE > 1): join the process group (NCCL on CUDA, gloo on CPU), one GPU per
    local rank. Returns (device, whether this is rank 0). A single process returns (device, True)."""
    import torch.distributed as dist

    if launched_world_size() <= 1:
        return device, True
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device, dist.get_rank() == 0


def leave_process_group() -> None:
    """Destroy the process group :func:`join_process_group` created (a no-op in one process)."""
    import torch.distributed as dist

    if launched_world_size() > 1 and dist.is_initialized():
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group; (0, 1) without one or inside :func:`local_only`."""
    import torch.distributed as dist

    if _local_depth == 0 and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes the files (rank 0, or the only process)."""
    return world()[0] == 0


@contextlib.contextmanager
def local_only():
    """Inside the block this rank works alone: :func:`world` is (0, 1), so nothing is split or gathered."""
    global _local_depth
    _local_depth += 1
    try:
        yield
    finally:
        _local_depth -= 1


@contextlib.contextmanager
def main_rank_first():
    """Rank 0 runs the block (alone, :func:`local_only`) before the other ranks run it: for work that fills a
    cache the others then read (pretraining the tiny model). If rank 0 fails in the block, the other ranks
    raise RuntimeError instead of running it. A no-op wrapper in one process."""
    rank, size = world()
    if size == 1:
        yield
        return
    if rank == 0:
        try:
            with local_only():
                yield
        except BaseException:
            broadcast(False)
            raise
        broadcast(True)
    else:
        if not broadcast(None):
            raise RuntimeError("rank 0 failed in the work it does before the other ranks (see its error)")
        with local_only():
            yield


def _collective_device() -> torch.device:
    """Where tensors for collectives live: the current GPU under NCCL, else the CPU."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast(obj):
    """Rank 0's ``obj`` on every rank (any picklable value); ``obj`` itself in one process."""
    import torch.distributed as dist

    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of ``value`` over ranks, as float64 on the value's device (``value`` itself in one process)."""
    import torch.distributed as dist

    if world()[1] == 1:
        return value
    t = value.detach().to(device=_collective_device(), dtype=torch.float64)
    dist.all_reduce(t)
    return t.to(value.device)


# --------------------------------------------------------------------------- forward-only passes


def rank_batches(data: dict, batch_size: int) -> Iterator[tuple[int, dict]]:
    """(i, batch) for this rank's batches of ``iterate_batches(data, batch_size)``: batch i goes to rank
    i mod world (every batch in one process)."""
    rank, size = world()
    for i, batch in enumerate(iterate_batches(data, batch_size)):
        if i % size == rank:
            yield i, batch


def gather_in_order(parts: list[tuple[int, object]]) -> list:
    """Every rank's (batch index, value) pairs, merged and sorted by batch index: the values in the order
    one process would produce them. Objects travel pickled (small per-example results only)."""
    import torch.distributed as dist

    if world()[1] == 1:
        return [value for _, value in sorted(parts, key=lambda p: p[0])]
    every = [None] * world()[1]
    dist.all_gather_object(every, parts)
    return [value for _, value in sorted((p for rank_parts in every for p in rank_parts), key=lambda p: p[0])]


def gather_batch_rows(local: torch.Tensor, rows_per_batch: list[int]) -> torch.Tensor:
    """Every rank's rows of a :func:`rank_batches` pass, in batch order: -> (L, sum(rows_per_batch), d) on CPU.

    local (L, n_r, d): this rank's rows, its batches in order, batch i contributing rows_per_batch[i]
    rows (every rank knows the whole list). Gathered with two all_gathers (sizes, then rows padded to
    the largest rank), then put back in batch order. In one process: ``local``.
    """
    import torch.distributed as dist

    size = world()[1]
    if size == 1:
        return local
    dev = _collective_device()
    n = torch.tensor([local.shape[1]], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(sizes, n)
    n_max = int(max(s.item() for s in sizes))
    padded = torch.zeros(local.shape[0], n_max, local.shape[2], dtype=local.dtype, device=dev)  # (L, n_max, d)
    padded[:, : local.shape[1]] = local.to(dev)
    blocks = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(blocks, padded)
    rank_major = torch.cat([b[:, : int(s.item())] for b, s in zip(blocks, sizes)], dim=1).cpu()  # (L, n, d)
    starts = [0]
    for count in rows_per_batch:
        starts.append(starts[-1] + count)
    order = torch.cat([torch.arange(starts[i], starts[i + 1]) for r in range(size)
                       for i in range(r, len(rows_per_batch), size)] + [torch.zeros(0, dtype=torch.long)])
    out = torch.empty_like(rank_major)
    out[:, order] = rank_major
    return out


# --------------------------------------------------------------------------- sharded training


def rank_share(batch: Mapping) -> tuple[dict, bool]:
    """This rank's contiguous share of a global batch's rows, and whether it holds any.

    Rows are split as ``torch.arange(B).tensor_split(world)``; every tensor whose first dimension is B
    is sliced, everything else passes through. A rank left without rows (B < world) gets row 0 and
    ``False``: it must still run the forward and backward (FSDP's collectives), with its loss scaled
    by 0. In one process: (the batch, True).
    """
    rank, size = world()
    if size == 1:
        return dict(batch), True
    b = batch["input_ids"].shape[0]
    rows = torch.arange(b).tensor_split(size)[rank]
    real = rows.numel() > 0
    if not real:
        rows = torch.zeros(1, dtype=torch.long)
    return {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == b else v
            for k, v in batch.items()}, real


@dataclass(frozen=True)
class FSDPSettings:
    """How :func:`shard_model` shards a model.

    master_dtype: dtype of the sharded parameters the optimizer updates (float32: master weights;
        forward and backward run in the dtype the model was loaded in, bf16 on GPU, with gradients
        reduced in float32). None: keep the loaded dtype (bf16 weights and optimizer states, as a
        one-GPU run).
    reshard_after_forward: free each block's gathered parameters after its forward (FULL_SHARD);
        False keeps them until the backward (SHARD_GRAD_OP: faster, one model's worth more memory).
    """

    master_dtype: Optional[torch.dtype] = torch.float32
    reshard_after_forward: bool = True

    @classmethod
    def from_env(cls, env: Optional[Mapping] = None) -> "FSDPSettings":
        """Settings from the variables ``accelerate launch`` sets from its config (the defaults under torchrun).

        ACCELERATE_MIXED_PRECISION: ``bf16`` (default) -> float32 masters; ``no`` -> the loaded dtype.
        FSDP_RESHARD_AFTER_FORWARD (or FSDP_SHARDING_STRATEGY): ``true`` / FULL_SHARD (default) or
        ``false`` / SHARD_GRAD_OP. FSDP_OFFLOAD_PARAMS and FSDP_CPU_RAM_EFFICIENT_LOADING (which makes
        transformers load real weights on rank 0 only) must be false. Raises ValueError naming the
        variable for any value the driver cannot honour.
        """
        env = os.environ if env is None else env
        precision = env.get("ACCELERATE_MIXED_PRECISION", "bf16").lower()
        if precision not in ("bf16", "no"):
            raise ValueError(f"ACCELERATE_MIXED_PRECISION={precision!r} is not supported by the driver: use bf16 "
                             "(float32 master weights, bf16 compute) or no")
        reshard = True
        for var in ("FSDP_SHARDING_STRATEGY", "FSDP_RESHARD_AFTER_FORWARD"):  # the latter wins
            value = env.get(var)
            if value is None:
                continue
            key = value.strip().upper()
            if key in ("TRUE", "FULL_SHARD", "1"):
                reshard = True
            elif key in ("FALSE", "SHARD_GRAD_OP", "2"):
                reshard = False
            else:
                raise ValueError(f"{var}={value!r} is not supported by the driver: use true / FULL_SHARD or "
                                 "false / SHARD_GRAD_OP")
        for var, key in (("FSDP_OFFLOAD_PARAMS", "fsdp_offload_params"),
                         ("FSDP_CPU_RAM_EFFICIENT_LOADING", "fsdp_cpu_ram_efficient_loading")):
            if env.get(var, "false").lower() not in ("false", "0", ""):
                raise ValueError(f"{var}={env[var]} is not supported by the driver (every rank loads the weights "
                                 f"itself and keeps its shards on the GPU): set {key}: false")
        return cls(master_dtype=torch.float32 if precision == "bf16" else None, reshard_after_forward=reshard)


def _float_dtype(model) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def _skeleton(model):
    """A deep copy of ``model`` whose parameters are meta tensors (buffers and attributes copied as they are)."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def _upcast(params, dtype: torch.dtype) -> None:
    """Cast plain floating parameters to ``dtype`` in place (same Parameter objects, so ties survive)."""
    for p in params:
        if p.is_floating_point() and p.dtype != dtype and type(p.data) is torch.Tensor:
            p.data = p.data.to(dtype)


def _mesh(device_type: str):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world()[1],))


def shard_model(model, settings: FSDPSettings = FSDPSettings()):
    """Shard ``model`` in place over every rank with FSDP2 and return it (needs the process group).

    One ``fully_shard`` group per decoder block (``repforget_kernels.decoder_layers``), one for the rest (embeddings,
    final norm, head: the root). With ``settings.master_dtype`` above the loaded dtype, each block is
    upcast just before it is sharded (one block of transient memory) and FSDP casts the gathered
    parameters back to the loaded dtype for compute, reducing gradients in float32. Per rank, the
    model then holds 1/world of the parameters; names in ``named_parameters`` stay the same.
    """
    from repforget_kernels.activations import decoder_layers

    if world()[1] == 1:
        raise ValueError("shard_model needs a process group of more than one rank")
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        raise RuntimeError(f"sharded training needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); this is "
                           f"torch {torch.__version__}") from None
    compute = _float_dtype(model)
    master = settings.master_dtype or compute
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32) if master != compute \
        else MixedPrecisionPolicy()
    skeleton = _skeleton(model)
    mesh = _mesh(next(model.parameters()).device.type)
    opts = dict(mesh=mesh, mp_policy=policy, reshard_after_forward=settings.reshard_after_forward)
    for block in decoder_layers(model):
        _upcast(block.parameters(), master)
        fully_shard(block, **opts)
    _upcast(model.parameters(), master)
    fully_shard(model, **opts)
    _SKELETONS[model] = skeleton
    return model


def is_sharded(model) -> bool:
    """Whether ``model`` was sharded by :func:`shard_model`."""
    return model in _SKELETONS


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def plain_copy(model):
    """A plain (unsharded) copy of ``model`` on its device, in the dtype it was loaded in, same mode and flags.

    A plain model is deep-copied. A sharded one is gathered parameter by parameter into a copy of the
    skeleton kept at sharding time (a collective: every rank calls it; peak extra memory one parameter).
    """
    if not is_sharded(model):
        return copy.deepcopy(model)
    replica = copy.deepcopy(_SKELETONS[model])
    targets = dict(replica.named_parameters())
    filled = {}  # id(meta parameter) -> gathered parameter
    for name, p in model.named_parameters():
        meta = targets[name]
        filled[id(meta)] = torch.nn.Parameter(_full(p.detach()).to(meta.dtype), requires_grad=meta.requires_grad)
    for module in replica.modules():  # every use of a meta parameter (tied weights included) gets its data
        for attr, meta in module._parameters.items():
            if meta is not None:
                module._parameters[attr] = filled[id(meta)]
    return replica.train(model.training)


def full_state_dict(model) -> dict:
    """A plain model's ``state_dict()`` as it is; for a sharded one (a collective: every rank calls it) the
    same keys with full tensors on CPU on rank 0, {} on the others, in the trained dtype (float32 masters)."""
    state = model.state_dict()
    if not is_sharded(model):
        return state
    out = {}
    for key, value in state.items():
        full = _full(value)
        if is_main():
            out[key] = full.cpu()
    return out


def load_full_state_dict(model, state: dict) -> None:
    """Load a :func:`full_state_dict` into a plain model, or into a sharded one (a collective): there rank 0
    passes the full state dict (on CPU is fine) and the other ranks pass {}; each rank receives its shards."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
