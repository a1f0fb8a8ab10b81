"""Models larger than one device: PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) in groups.

Under torchrun, ``--shard-size K`` arranges the ranks on a 2D device mesh ("points", "shard"):
K ranks of one *point group* hold one sharded copy of the model (each rank 1/K of every parameter,
rows of dim 0 split as ``torch.chunk`` splits them), and the world / K groups replicate it and
split the work (samples, grid points) as single ranks do without sharding.  Ranks of one group
run the same forwards, because every forward of a sharded model is a collective over its group;
groups never wait for each other except where a stage reduces its results (``point_group``).

Everything else reads parameters through this module: ``local_tensor`` (the writable rows this
rank holds), ``local_rows`` (which rows those are), ``full_tensor`` (the whole tensor, gathered).
With K = 1 these are the plain tensors and nothing is sharded.
"""

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Tuple

import torch
from torch import nn

from .errors import UsageError
from .runtime import rank_and_world

MESH_DIMS = ("points", "shard")


@dataclass
class ShardLayout:
    """Where this rank sits on the 2D mesh: replicated over point groups x sharded within a group.

    shard_size: K ranks hold one sharded copy; n_groups: world // K point groups; group_index:
    this rank's point group; shard_rank: its index inside the group; mesh: the 2D DeviceMesh
    ("points", "shard"), None when nothing is sharded; shard_group: the ProcessGroup of this
    rank's group (None: not sharded); point_group: the ProcessGroup of the ranks with the same
    shard_rank in every group (None: the default group, i.e. every rank when not sharded).
    """

    shard_size: int
    n_groups: int
    group_index: int
    shard_rank: int
    mesh: object = None
    shard_group: object = None
    point_group: object = None

    @property
    def sharded(self) -> bool:
        """Whether parameters are sharded (groups of more than one rank)."""
        return self.shard_size > 1

    @property
    def shard_mesh(self):
        """The 1D sub-mesh of this rank's group (what ``fully_shard`` shards over), or None."""
        return None if self.mesh is None else self.mesh["shard"]


def shard_layout(shard_size: int = 1) -> ShardLayout:
    """This rank's place for groups of ``shard_size`` ranks; call after ``runtime.join_torchrun``.

    K = 1 needs no mesh: every rank is its own group (plain replicas).  Every rank must call this
    (building the mesh creates the groups collectively).  UsageError when K < 1 or when K does not
    divide the number of ranks.
    """
    rank, world = rank_and_world()
    if not isinstance(shard_size, int) or shard_size < 1:
        raise UsageError(f"the shard size must be a whole number of ranks >= 1, got {shard_size}")
    if shard_size == 1:
        return ShardLayout(1, world, rank, 0)
    if world == 1:
        raise UsageError(f"a shard size of {shard_size} needs {shard_size} or a multiple of {shard_size} ranks "
                         "under torchrun; this process runs alone")
    if world % shard_size:
        raise UsageError(f"a shard size of {shard_size} does not divide the {world} ranks; "
                         "give a shard size that divides the number of ranks")
    from torch.distributed.device_mesh import init_device_mesh

    groups = world // shard_size
    with _fsdp_errors():
        mesh = init_device_mesh(_mesh_device_type(), (groups, shard_size), mesh_dim_names=MESH_DIMS)
        shard_group, point_group = mesh.get_group("shard"), mesh.get_group("points")
    return ShardLayout(shard_size, groups, rank // shard_size, rank % shard_size, mesh, shard_group, point_group)


def _mesh_device_type() -> str:
    import torch.distributed as dist

    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def collective_device() -> torch.device:
    """Where the process group's collectives take tensors: the current CUDA device under NCCL, else the CPU."""
    return torch.device(_mesh_device_type())


# ----------------------------------------------------------------------------- sharding a model
def shard_model(model: nn.Module, layout: ShardLayout) -> nn.Module:
    """Shard ``model`` over ``layout``'s group with FSDP2; a no-op when nothing is sharded.

    Each repeated block (the classes in ``model._no_split_modules``, as transformers and accelerate
    use them) becomes one FSDP unit, then the root takes the rest.  A block holding a parameter
    that is also used outside it (a tied embedding) is left to the root, so the tie survives: one
    unit manages every use.  Parameters end up as DTensors of ``Shard(0)`` on the group's mesh, on
    the mesh's device (a CPU-loaded model moves there one block at a time), and every unit, the
    root included, reshards after its forward, so parameters are sharded between forwards.
    Buffers (rotary tables, position ids) are not sharded: every rank keeps them whole.
    Returns the model.
    """
    if not layout.sharded:
        return model
    from torch.distributed.fsdp import fully_shard

    if is_sharded_model(model):
        raise UsageError("the model is already distributed (DTensor parameters); load it unsharded")
    _check_one_dtype(model)
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    shared = _ids_used_outside(model)
    mesh = layout.shard_mesh
    with _fsdp_errors():
        for name, module in reversed(list(model.named_modules())):  # children before parents
            if name and type(module).__name__ in blocks and not (_param_ids(module) & shared.get(name, set())):
                fully_shard(module, mesh=mesh)
        # The root too reshards after forward (FSDP2 keeps a root unsharded by default): a stage
        # that runs forwards only would otherwise see whole, plain root parameters between them.
        fully_shard(model, mesh=mesh, reshard_after_forward=True)
    check_uniform(model)
    return model


def _check_one_dtype(model: nn.Module) -> None:
    """UsageError when the trainable parameters are held in several dtypes: FSDP2 gathers one per unit.

    A float16 T5 holds its ``wo`` in float32, as transformers loads it (``numerics.kept_in_float32``);
    FSDP2 would fail at the first forward ("expects uniform original parameter dtype").
    """
    held = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters() if p.requires_grad})
    if len(held) > 1:
        raise UsageError(f"the model holds its parameters in several dtypes ({', '.join(held)}: the modules its "
                         "class keeps in float32, as transformers loads it), and FSDP2 shards a model of one "
                         "dtype only; load it in another dtype (bfloat16 or float32) or leave it unsharded")


def _param_ids(module):
    return {id(p) for p in module.parameters()}


def _ids_used_outside(model):
    """{module name: ids of its parameters that some module outside it also holds}."""
    holders = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None:
                holders.setdefault(id(p), set()).add(mname)
    out = {}
    for name, _ in model.named_modules():
        prefix = name + "."
        out[name] = {pid for pid, names in holders.items()
                     if any(n == name or n.startswith(prefix) for n in names)
                     and any(not (n == name or n.startswith(prefix)) for n in names)}
    return out


def check_uniform(model: nn.Module) -> None:
    """UsageError unless the parameters are all unsharded, or all ``Shard(0)`` on one 1D mesh."""
    meshes, kinds = set(), set()
    for name, p in model.named_parameters():
        kinds.add(is_sharded(p))
        if is_sharded(p):
            from torch.distributed.tensor import Shard

            if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                raise UsageError(f"parameter '{name}' is distributed as {tuple(p.placements)} over a "
                                 f"{p.device_mesh.ndim}D mesh; only rows (Shard(0)) over one group are supported")
            # By equality (the same ranks and dimensions), not identity: a model sharded after another
            # in the same process can hold its parameters on equal mesh objects that are not the same one.
            meshes.add(p.device_mesh)
    if len(kinds) > 1 or len(meshes) > 1:
        raise UsageError("the model's parameters are not all sharded the same way (some are whole, or over "
                         "other groups); shard the whole model with one shard size")


@contextlib.contextmanager
def _fsdp_errors() -> Iterator[None]:
    """A failure of the distributed backend itself is a one-line UsageError that keeps its cause.

    Only what torch.distributed raises is translated (FSDP2, the device mesh, a collective the
    backend lacks, such as a dtype gloo cannot send): an error whose innermost frame is in
    ``torch.distributed``, or one of its ``DistError`` types.  Anything else (a model's own error,
    a bad shape in its forward) propagates as what it is, and an out-of-memory error stays a
    ``torch.OutOfMemoryError`` wherever it was raised: neither is the backend's fault.
    """
    try:
        yield
    except (RuntimeError, NotImplementedError, ValueError, AssertionError) as err:
        if isinstance(err, torch.OutOfMemoryError) or not _raised_by_distributed(err):
            raise
        text = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UsageError(f"FSDP2 sharding failed on this backend: {text}") from err


def _raised_by_distributed(err: BaseException) -> bool:
    """Whether ``err`` comes from torch.distributed: a DistError, or raised in its code.

    The innermost frame of the traceback that is either torch.distributed's or outside torch
    decides: torch's own plumbing (operator dispatch, autograd functions, ``nn`` layers) is passed
    over, so a collective raised through ``torch.ops`` counts as torch.distributed's, and an error
    of a layer called by the model's code counts as the model's.
    """
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    frames, tb = [], err.__traceback__
    while tb is not None:
        frames.append(os.path.abspath(tb.tb_frame.f_code.co_filename))
        tb = tb.tb_next
    for name in reversed(frames):
        if name.startswith(_DISTRIBUTED):
            return True
        if not name.startswith(_TORCH):
            return False
    return False


_TORCH = os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "")
_DISTRIBUTED = os.path.join(_TORCH, "distributed", "")


def collective_errors():
    """Context manager for passes over a sharded model.

    A collective the backend does not support (raised inside torch.distributed, e.g. a dtype gloo
    cannot send) becomes a one-line UsageError naming its cause; the model's own errors and
    out-of-memory errors propagate unchanged (``_fsdp_errors``).
    """
    return _fsdp_errors()


# ----------------------------------------------------------------------------- reading parameters
def is_sharded(param: torch.Tensor) -> bool:
    """True when ``param`` is a DTensor (its rows are spread over a shard group)."""
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def is_sharded_model(model: nn.Module) -> bool:
    """Whether any of ``model``'s parameters is sharded (``shard_model``)."""
    return any(is_sharded(p) for p in model.parameters())


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """The rows of ``param`` this rank holds, as a plain tensor sharing their storage.

    Writes are seen by the next forward.

    Args:
        param: a parameter, sharded (a DTensor) or not.

    Returns:
        A (stop - start, *rest) tensor; ``param.data`` when unsharded.
    """
    if is_sharded(param):
        return param.to_local().detach()  # detached: in-place writes need no autograd view
    return param.data


def full_shape(param: torch.Tensor) -> torch.Size:
    """The shape of the whole tensor (a DTensor's global shape)."""
    return param.shape


def local_rows(param: torch.Tensor) -> Tuple[int, int]:
    """[start, stop) of dim 0 of the whole tensor that this rank holds.

    Unsharded: (0, shape[0]); 0-dim: (0, 1).  Sharded rows follow ``torch.chunk``: ceil(n / K)
    rows per rank, the last ranks fewer or none (7 rows on 2 ranks: 4 + 3).
    """
    shape = full_shape(param)
    if len(shape) == 0:
        return 0, 1
    if not is_sharded(param):
        return 0, shape[0]
    mesh = param.device_mesh
    rows, size, rank = shape[0], mesh.size(), mesh.get_local_rank()
    per_rank = -(-rows // size)
    start = min(rank * per_rank, rows)
    stop = min(start + per_rank, rows)
    if param.to_local().shape[:1] != (stop - start,):
        raise UsageError("a parameter is not row-sharded as torch.chunk splits it; shard the model with shard_model")
    return start, stop


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor, for per-tensor work.

    Gathered over the shard group when sharded: a collective, which every rank of the group calls,
    in the same order.

    Args:
        param: a parameter, sharded (a DTensor) or not.

    Returns:
        The whole tensor, detached; ``param.data`` when unsharded.
    """
    if is_sharded(param):
        with _fsdp_errors():
            return param.full_tensor().detach()
    return param.data


def sharded_like(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a tensor as a tensor sharded like ``param``.

    Args:
        local: this rank's rows of a tensor shaped like ``param``.
        param: a parameter, sharded (a DTensor) or not.

    Returns:
        A DTensor when ``param`` is one, so ``full_tensor`` gathers it; ``local`` otherwise.
    """
    if not is_sharded(param):
        return local
    from torch.distributed.tensor import DTensor

    shape = full_shape(param)
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                              shape=shape, stride=torch.empty(shape, device="meta").stride())


def writer_of(tensor: torch.Tensor) -> bool:
    """Whether this rank holds ``full_tensor(tensor)`` for writing: the first rank of its group."""
    return not is_sharded(tensor) or tensor.device_mesh.get_local_rank() == 0


def point_groups(model: nn.Module) -> Tuple[int, int, bool]:
    """(this rank's point group, number of groups, whether it reports the group's results).

    Unsharded, every rank is a group of its own.  A model sharded over groups of K ranks
    (``sharding.shard_model``) is evaluated by each group together: its K ranks run the same
    points (each forward is a collective over the group), and the first of them reports.
    """
    rank, world = rank_and_world()
    sharded = next((p for p in model.parameters() if is_sharded(p)), None)
    if sharded is None:
        return rank, world, True
    size = sharded.device_mesh.size()
    return rank // size, world // size, sharded.device_mesh.get_local_rank() == 0
