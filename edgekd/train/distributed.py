"""Multi-process training under torchrun: the process group from the launcher's environment, rank-0 helpers.

`torchrun --nproc_per_node N -m edgekd train recipe.yaml` starts N copies of the command; each finds WORLD_SIZE,
RANK and LOCAL_RANK in its environment. The command opens a `distributed_session` (gloo on CPU, nccl on CUDA) and
the one Trainer wraps its model in DistributedDataParallel; checkpoints and reports come from rank 0 only.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from edgekd.errors import EdgeKDError

DEBUG_DIR_ENV = "EDGEKD_DDP_DEBUG_DIR"
"""When set, every rank writes rank<r>.json (digest of its final weights, what it trained and wrote) there."""


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int


def launch_env() -> LaunchEnv | None:
    """The torchrun variables, or None for a plain single-process run (WORLD_SIZE unset or 1)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        return LaunchEnv(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    except (KeyError, ValueError):
        raise EdgeKDError("WORLD_SIZE is set but RANK/LOCAL_RANK are missing or not integers: "
                          "launch multi-process training with torchrun") from None


def is_active() -> bool:
    """True inside an initialized process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    env = launch_env()
    return env.rank if env else 0


def world_size() -> int:
    """The processes training together (1 outside torchrun)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that logs and writes files."""
    return rank() == 0


@contextmanager
def distributed_session(device: str = "auto") -> Iterator[LaunchEnv | None]:
    """Open the process group when launched by torchrun and close it on the way out (also after an error)."""
    env = launch_env()
    if env is None or (dist.is_available() and dist.is_initialized()):
        yield env
        return
    if not dist.is_available():
        raise EdgeKDError("this PyTorch build has no torch.distributed: run a single process")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(env.local_rank)
    # A generous timeout: rank 0 may spend minutes writing plots/reports while the others wait at a barrier.
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
    try:
        yield env
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if is_active():
        dist.barrier()


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """True only if every rank says True (e.g. 'my loss is finite'), so all ranks take the same branch."""
    if not is_active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def sum_across_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks, e.g. [loss sum, sample count] of an epoch (`device`: cuda under nccl)."""
    if not is_active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def union_across_ranks(names: Iterable[str]) -> list[str]:
    """The sorted union of every rank's names (e.g. the loss parts an epoch logged: a plugin may add one on some
    ranks only, and an all-reduce of lists of other lengths would hang)."""
    mine = sorted(set(names))
    if not is_active():
        return mine
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return sorted({n for ranks in gathered for n in ranks or []})


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average the gradients of parameters DDP does not manage (an objective's own, e.g. KD adapters)."""
    if not is_active():
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world)


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) everywhere: DDP syncs them at each forward, so after the
    last training step of an epoch the ranks hold their own; this makes every rank's model identical."""
    if not is_active():
        return
    for b in model.buffers():
        dist.broadcast(b, src=0)


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around the model when a process group is active, else the model itself."""
    if not is_active():
        return model
    if not any(p.requires_grad for p in model.parameters()):
        raise EdgeKDError("distributed training needs at least one trainable parameter (everything is frozen)")
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (its state_dict keys carry no 'module.' prefix)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def weights_digest(model: nn.Module | dict[str, torch.Tensor]) -> str:
    """sha256 over every parameter and buffer (names, dtypes, shapes, bytes): equal digests = identical models."""
    digest = hashlib.sha256()
    state = model if isinstance(model, dict) else unwrap(model).state_dict()
    for name, t in sorted(state.items()):
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return digest.hexdigest()


def write_debug_record(model: nn.Module, info: dict[str, Any]) -> Path | None:
    """With EDGEKD_DDP_DEBUG_DIR set: this rank's weights digest and counters, for tests and debugging."""
    folder = os.environ.get(DEBUG_DIR_ENV)
    if not folder:
        return None
    path = Path(folder) / f"rank{rank()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    world = dist.get_world_size() if is_active() else 1
    path.write_text(json.dumps({"rank": rank(), "world_size": world, "weights_sha256": weights_digest(model),
                                **info}, indent=2))
    return path
