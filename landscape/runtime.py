"""Process-wide plumbing in one place: torch.distributed, transformers' logging, matmul precision.

Stages call these instead of touching ``torch.distributed`` or ``transformers.logging`` directly,
so a rule (which backend, what gets quiet, when TF32 is allowed) has one home.
"""

import contextlib
import os
from typing import Any, Iterator, List, Tuple

from .errors import UsageError


# ----------------------------------------------------------------------------- distribution
def _group_active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> Tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    import torch.distributed as dist

    if _group_active():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def join_torchrun(device: Any = "auto") -> Tuple[Any, int, int]:
    """Join the torch.distributed group when started by torchrun (NCCL on GPUs, gloo on CPU).

    Returns (device for this rank, rank, world size); (device, 0, 1) outside torchrun.  On GPUs each
    rank takes cuda:LOCAL_RANK.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return device, 0, 1
    import torch
    import torch.distributed as dist

    if resolve_device(device).type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if str(device).startswith("cuda") else "gloo")
    return device, dist.get_rank(), world


def leave_torchrun() -> None:
    """Leave the process group; a gloo/NCCL group left open until exit can abort the process."""
    import torch.distributed as dist

    if _group_active():
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if _group_active():
        dist.barrier()


def all_reduce_sum(tensor, group: Any = None) -> Any:
    """Sum ``tensor`` over the ranks of ``group`` (None: all ranks) in place (no-op without a
    process group); returns it."""
    import torch.distributed as dist

    if _group_active():
        dist.all_reduce(tensor, group=group)
    return tensor


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (picklable objects)."""
    import torch.distributed as dist

    rank, world = rank_and_world()
    if world == 1:
        return value
    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_all(value: Any) -> List[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    import torch.distributed as dist

    rank, world = rank_and_world()
    if world == 1:
        return [value]
    out = [None] * world
    dist.all_gather_object(out, value)
    return out


# ----------------------------------------------------------------------------- transformers' logging
def quiet_transformers() -> None:
    """Our stages show their own progress bars; transformers' per-load bars would bury them."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@contextlib.contextmanager
def transformers_silenced(errors_only: bool = True) -> Iterator[None]:
    """No transformers progress bars (and, with ``errors_only``, no warnings) inside the block.

    For loads whose warnings are expected, e.g. the "newly initialized head" report of a
    classifier we are about to fine-tune.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if errors_only:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# ----------------------------------------------------------------------------- precision
PRECISIONS = ("float32", "tf32", "bfloat16", "float16")


def storage_dtype(precision: str) -> str:
    """The dtype to load weights in for a precision name ('tf32' computes in TF32 on float32)."""
    precision = str(precision).lower()
    return "float32" if precision == "tf32" else precision


def apply_precision(precision: str) -> None:
    """Allow TF32 matmuls (CUDA) when ``precision`` is 'tf32'; leave torch's default otherwise."""
    if str(precision).lower() == "tf32":
        import torch

        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def resolve_device(name="auto"):
    """The torch device for a device name.

    Args:
        name: 'auto' (CUDA when available, else the CPU), 'cpu', 'cuda' or 'cuda:N'.

    Returns:
        torch.device.

    Raises:
        UsageError: an unknown name, or CUDA asked for where none is available.
    """
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device '{name}' was asked for but no CUDA GPU is available; use the CPU")
    return device
