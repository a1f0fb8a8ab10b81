"""Process-wide plumbing in one place.

torch.distributed, transformers' logging, matmul precision, CPU threads.

Stages call these instead of touching ``torch.distributed`` or ``transformers.logging`` directly,
so a rule (which backend, what gets quiet, when TF32 is allowed, how many threads) has one home.
Importing this module imports no torch: the command line parses ``--threads`` with it.
"""

import contextlib
import os
import sys
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

from .checks import THREADS_MAX
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


def leave_torchrun() -> bool:
    """Leave the process group, if this process is in one; True when it was."""
    import torch.distributed as dist

    if not _group_active():
        return False
    dist.destroy_process_group()
    return True


def end_torchrun_process(code: int) -> None:
    """End a torchrun worker now, with exit status ``code``, skipping the interpreter's shutdown.

    After the group is left and every output closed, the shutdown has nothing left to do, but
    under gloo it sometimes aborted a rank whose work was done ("terminate called without an
    active exception", SIGABRT, with no Python frame left: about one run in 30 on a busy 2-core
    machine), and torchrun then reports a run whose output is complete as failed.  ``os._exit``
    skips that shutdown.  Call it only once every file is closed: buffers not flushed are lost.

    Args:
        code: the process's exit status (0 done, 2 refused, 130 interrupted).
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    import torch.distributed as dist

    if _group_active():
        dist.barrier()


def all_reduce_sum(tensor, group: Any = None) -> Any:
    """Sum ``tensor`` over the ranks of ``group`` in place (no-op without a process group).

    Args:
        tensor: the tensor to sum, any shape.
        group: a torch.distributed process group (None: all ranks).

    Returns:
        ``tensor``, summed.
    """
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
def transformers_silenced(errors_only: bool = True, bars: bool = False) -> Iterator[None]:
    """No transformers progress bars and, with ``errors_only``, no warnings inside the block.

    For loads whose warnings are expected, e.g. the "newly initialized head" report of a
    classifier we are about to fine-tune.

    Args:
        errors_only: silence warnings too (only errors are logged).
        bars: keep progress bars, e.g. its "Loading weights" bar over a large checkpoint.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    was_on = hf_logging.is_progress_bar_enabled()
    if bars:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    if errors_only:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_on:
            hf_logging.enable_progress_bar()
        else:
            hf_logging.disable_progress_bar()


# ----------------------------------------------------------------------------- precision
PRECISIONS = ("float32", "tf32", "bfloat16", "float16")


def storage_dtype(precision: str) -> str:
    """The dtype to load weights in for a precision name ('tf32' computes in TF32 on float32)."""
    precision = str(precision).lower()
    return "float32" if precision == "tf32" else precision


def to_storage(model: Any, device: Any = None, dtype: Any = None) -> Any:
    """Move a loaded model to ``device`` and cast it to ``dtype`` as ``from_pretrained(dtype=...)`` would.

    ``Module.to(dtype)`` casts every floating tensor.  Transformers' own load in a half precision
    keeps some in float32, and so does this (``numerics.kept_in_float32``, the one home of the rule):
    a rotary embedding's frequencies (``inv_freq``: 1/θ^(2i/d), computed from the config; rounded to
    bfloat16, 2⁻⁹ relative, every position's angle would move with them), and in float16 the tensors
    of the modules the model class keeps in float32 (``_keep_in_fp32_modules``: T5's ``wo``, whose
    activations overflow float16; ``_keep_in_fp32_modules_strict`` in bfloat16 too).  Everything
    else is what ``Module.to`` makes of it.  Each rule is a change of numerics that resumable files
    record (``numerics.CHANGES``).

    Returns:
        The model (cast in place).
    """
    import torch

    from .numerics import kept_in_float32

    kept = [(module, kind, key, (module._parameters if kind == "parameter" else module._buffers)[key].data)
            for module, kind, key in kept_in_float32(model, dtype)]
    model.to(device=device, dtype=dtype)
    for module, kind, key, held in kept:
        if kind == "rotary":  # as loaded: transformers computes the frequencies in float32
            module._buffers[key] = held.to(device=device)
        elif kind == "buffer":
            module._buffers[key] = held.to(device=device, dtype=torch.float32)
        else:  # Module.to keeps the Parameter object and replaces its data: the same again, in float32
            module._parameters[key].data = held.to(device=device, dtype=torch.float32)
    return model


@contextlib.contextmanager
def precision_context(precision) -> Iterator[None]:
    """Compute in ``precision`` inside the block, and leave torch's switches as they were after it.

    'tf32' lets CUDA matmuls and cuDNN convolutions compute in TF32 on float32 weights
    (``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32``); any other
    precision leaves them as they are.  This is the one place that turns TF32 on: every stage that
    takes a dtype runs its work inside this block, so a stage never changes how later work in the
    same process computes.

    Args:
        precision: a name of ``PRECISIONS`` (or a torch.dtype, which needs nothing here).
    """
    if str(precision).lower() != "tf32":
        yield
        return
    import torch

    # The matmul switch is saved as torch's precision name, which also keeps "medium".
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn


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


# ----------------------------------------------------------------------------- CPU threads
THREADS_HELP = ("torch CPU threads: auto = the cores this process may use, minus those other processes keep "
                "busy right now (at least 1, at most OMP_NUM_THREADS when set); N = exactly N (at most "
                f"{THREADS_MAX}); 0 = torch's own default (every core, however busy)")


def parse_threads(text: str) -> str:
    """'auto', or a count >= 0 as text; UsageError otherwise (the command line's ``--threads``)."""
    value = str(text).strip().lower()
    # A bound: a billion threads made libgomp fail to allocate its stacks, in an abort, not one line.
    if value == "auto" or (value.isascii() and value.isdigit() and int(value) <= THREADS_MAX):
        return value
    raise UsageError(f"threads: must be auto or a number of threads in [0, {THREADS_MAX}] (0 = torch's default), "
                     f"got '{text}'")


def usable_cores() -> List[int]:
    """The CPU ids this process may run on (its affinity), or range(cpu_count) where that is unknown."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def _cpu_times(cores: List[int]) -> Optional[Dict[int, Tuple[int, int]]]:
    """{cpu id: (idle jiffies, total jiffies)} from /proc/stat, None where there is none."""
    try:
        with open("/proc/stat") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    times = {}
    for line in lines:
        head, *fields = line.split()
        if head.startswith("cpu") and head[3:].isdigit() and int(head[3:]) in cores:
            values = [int(v) for v in fields[:8]]
            times[int(head[3:])] = (values[3] + values[4], sum(values))  # idle + iowait, all
    return times if len(times) == len(cores) else None


def busy_cores(cores: List[int], sample_seconds: float = 0.1) -> float:
    """How many of ``cores`` other processes keep busy now, in cores.

    Measured over ``sample_seconds`` from /proc/stat while this process sleeps (so it counts
    others only, and a command that just finished does not count, as it would in the load
    average); elsewhere the 1-minute load average, capped at the core count.

    Args:
        cores: CPU ids (``usable_cores()``).
        sample_seconds: how long to watch /proc/stat.

    Returns:
        Busy cores in [0, len(cores)] (a fraction: 0.5 = one core half busy).
    """
    before = _cpu_times(cores)
    if before is not None:
        time.sleep(sample_seconds)
        after = _cpu_times(cores)
        if after is not None:
            busy = 0.0
            for cpu in cores:
                idle = after[cpu][0] - before[cpu][0]
                total = after[cpu][1] - before[cpu][1]
                busy += 1.0 - idle / total if total > 0 else 0.0
            return busy
    try:
        return min(float(len(cores)), os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def auto_threads(cores: Optional[List[int]] = None, busy: Optional[float] = None) -> int:
    """The thread count of ``--threads auto``.

    The usable cores left free by other processes, shared among the ranks torchrun started on this
    machine (LOCAL_WORLD_SIZE), at least 1.

    Why: torch's threads wait for each other at every operation, so a thread that another process
    keeps off its core stalls all of them (benchmarks/busy.py measures it).

    Args:
        cores: CPU ids this process may use (default: ``usable_cores()``).
        busy: busy cores (default: measured by ``busy_cores``).

    Returns:
        A thread count in [1, len(cores)].
    """
    cores = usable_cores() if cores is None else cores
    busy = busy_cores(cores) if busy is None else busy
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    free = (len(cores) - busy) / local_ranks
    return max(1, min(len(cores), int(free + 0.5)))


def apply_threads(spec: Any = "auto") -> int:
    """Set torch's intra-op threads (and inter-op threads, where torch still allows it).

    Args:
        spec: a ``--threads`` value: 'auto' (``auto_threads``, at most OMP_NUM_THREADS when that is
            set), a count, or 0 for torch's default (left as it is).

    Returns:
        The intra-op thread count in use.

    Raises:
        UsageError: a value that is none of these.
    """
    import torch

    value = parse_threads(spec)
    if value == "0":
        return torch.get_num_threads()
    cap = os.environ.get("OMP_NUM_THREADS", "")
    cap = int(cap) if cap.isdigit() and int(cap) > 0 else None  # the user's own cap stays
    if value != "auto":
        count = int(value)
    else:
        count = 1 if cap == 1 else min(auto_threads(), cap or len(usable_cores()))
    torch.set_num_threads(count)
    with contextlib.suppress(RuntimeError):  # torch refuses once inter-op work has started
        torch.set_num_interop_threads(count)
    return count
