"""torch.distributed sharding: each rank fits and scores its own slice of the training data.

Launched under `torchrun` (gloo on CPU, NCCL on GPU), with the process group initialised by the user or by
`init()`, an `Attributor` runs the same code on every rank:

- fit: rank r collects the gradient rows of a contiguous slice of the training data (whole batches, so the
  true Fisher's sampled labels are those of one process) into its own store; the curvature statistics
  (K-FAC/EK-FAC factors and eigenvalue corrections, the feature Gram of TRAK and LoGra) are sums over
  examples and are all-reduced, so every rank holds the preconditioner one process would have fitted;
- score: rank 0's preconditioned query rows are broadcast, each rank scores its slice with the one
  streaming loop, and the slices' top-k (or dense blocks) are gathered and merged into one `Scores`,
  returned on every rank.

Without an initialised process group every function here is the one-process identity.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any, cast

import torch

from .errors import InvalidOptionError

#: curvatures whose fitted state is a sum over training examples, all-reduced across ranks
CURVATURES = ("identity", "gauss-newton", "covariance", "kfac", "ekfac", "diagonal")


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def init(backend: str | None = None) -> tuple[int, int]:
    """Initialise the process group from torchrun's environment (gloo on CPU, NCCL with CUDA) when it is
    not yet; returns (rank, world size). Outside torchrun (no WORLD_SIZE) nothing is initialised."""
    import torch.distributed as dist

    if _dist() is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return world()


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) without a process group."""
    dist = _dist()
    return (0, 1) if dist is None else (dist.get_rank(), dist.get_world_size())


def is_main() -> bool:
    """Whether this process is rank 0 (the one that reports progress and writes shared files)."""
    return world()[0] == 0


def shard_bounds(n: int, batch_size: int = 1) -> tuple[int, int]:
    """This rank's slice [lo, hi) of n examples: whole batches of `batch_size`, split as evenly as can be."""
    rank, size = world()
    if size == 1:
        return 0, n
    batches = -(-n // batch_size)
    if batches < size:
        raise InvalidOptionError(f"{n} training examples make {batches} batches of {batch_size}, fewer than "
                                 f"the {size} processes; use fewer processes or a smaller batch_size")
    first, last = rank * batches // size, (rank + 1) * batches // size
    return first * batch_size, min(last * batch_size, n)


def _device() -> torch.device:
    dist = _dist()
    if dist is not None and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(value: Any) -> Any:
    """The sum over ranks of a tensor (reduced in place and returned) or of a number."""
    dist = _dist()
    if dist is None:
        return value
    if isinstance(value, torch.Tensor):
        moved = value.to(_device())
        dist.all_reduce(moved)
        if moved is not value:
            value.copy_(moved)
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return type(value)(t.item()) if isinstance(value, (int, float)) else t.item()


def all_agree(flag: bool) -> bool:
    """True only when `flag` is true on every rank (e.g. every rank has its cached statistics)."""
    dist = _dist()
    if dist is None:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank `src`'s tensor on every rank (same shape and dtype on all ranks)."""
    dist = _dist()
    if dist is None:
        return tensor
    moved = tensor.contiguous().to(_device())
    dist.broadcast(moved, src)
    return moved.to(tensor.device)


def barrier() -> None:
    """Wait for every rank (e.g. until all have checked the shared workdir's manifest)."""
    dist = _dist()
    if dist is not None:
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (pickled; for small results such as top-k lists)."""
    dist = _dist()
    if dist is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def merge_parts(parts: Sequence[tuple[int, dict[str, torch.Tensor | None]]], n_train: int,
                top_k: int | None) -> dict[str, torch.Tensor | None]:
    """Merge each rank's (offset, scored slice) into the whole: dense columns side by side, or the best k
    of the ranks' top-k (and bottom-k), indices shifted to the whole training set."""
    if top_k is None:
        return {"matrix": torch.cat([p["matrix"] for _, p in parts], 1)}  # type: ignore[misc]
    k = min(top_k, n_train)
    out: dict[str, torch.Tensor | None] = {"matrix": None}
    for side, largest in (("top", True), ("bottom", False)):
        values = torch.cat([p[f"{side}_values"] for _, p in parts], 1)  # type: ignore[misc]
        index = torch.cat([p[f"{side}_indices"] + lo for lo, p in parts], 1)  # type: ignore[operator,misc]
        v, j = values.topk(k, dim=1, largest=largest)
        out[f"{side}_values"], out[f"{side}_indices"] = v, index.gather(1, j)
    return out


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside a DistributedDataParallel or FSDP (`FullyShardedDataParallel`) wrapper; any
    other model as it is.

    DDP: its `.module`, whose parameters are the wrapper's. FSDP: every rank gathers the full parameters
    (a collective: call it on every rank, as an `Attributor` is built on every rank) into a plain copy of
    the module, nested FSDP units unwrapped; training the wrapped model afterwards does not reach the copy.
    A model sharded by `fully_shard` (FSDP2) is refused.
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return unwrap(model.module)
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # a torch built without distributed
        return model
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise InvalidOptionError("the model is sharded by fully_shard (FSDP2), whose parameters are DTensor "
                                 "shards; build the Attributor from an unsharded copy (a plain model with "
                                 "the full state dict loaded), or wrap with FullyShardedDataParallel")
    if not any(isinstance(m, FSDP) for m in model.modules()):
        return model
    with FSDP.summon_full_params(model, writeback=False):
        return _plain_copy(model, FSDP, {})


def _plain_copy(module: torch.nn.Module, fsdp: type, memo: dict[int, Any]) -> torch.nn.Module:
    """A copy of `module` without its FSDP wrappers, each parameter and buffer cloned once (tied weights
    stay tied). FSDP units hold process groups, which a deepcopy cannot copy."""
    if isinstance(module, fsdp):
        return _plain_copy(cast(Any, module).module, fsdp, memo)

    def clone(t: Any, param: bool) -> Any:
        if t is None:
            return None
        if id(t) not in memo:
            data = t.detach().clone()
            memo[id(t)] = torch.nn.Parameter(data, requires_grad=t.requires_grad) if param else data
        return memo[id(t)]

    new = copy.copy(module)
    for key, value in vars(module).items():  # hooks and other registries: the copy's own
        if isinstance(value, dict):
            setattr(new, key, copy.copy(value))
    new._parameters = {k: clone(p, True) for k, p in module._parameters.items()}
    new._buffers = {k: clone(b, False) for k, b in module._buffers.items()}
    new._modules = {k: None if c is None else _plain_copy(c, fsdp, memo) for k, c in module._modules.items()}
    return new


def check_supported(curvature: str, *, dda: bool, relatif: bool, combination: Any) -> None:
    """Refuse, before any pass over data, what a sharded fit cannot compute exactly."""
    if world()[1] == 1:
        return
    if curvature not in CURVATURES:
        raise InvalidOptionError(f"curvature {curvature!r} is not fitted across processes (its fitted state "
                                 "is not a sum over training examples that ranks can all-reduce); under "
                                 f"torchrun use one of {', '.join(CURVATURES)}, or run it in one process")
    if dda or relatif or getattr(combination, "standardize", False):
        raise InvalidOptionError("dda=True and relatif=True normalise by statistics over the whole training "
                                 "set, which a sharded fit does not gather; run them in one process")


__all__ = ["CURVATURES", "all_agree", "all_gather_objects", "all_reduce_sum", "barrier", "broadcast",
           "check_supported", "init", "is_main", "merge_parts", "shard_bounds", "unwrap", "world"]
