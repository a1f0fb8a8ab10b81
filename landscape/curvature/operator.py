"""The exact Hessian-vector product of the surfaces' loss, and the model state it needs.

``HessianOperator`` acts on the flat coordinates of a ``_Space`` (the kept elements of the
trainable parameters); ``_ModelState`` puts the model in eval mode and float32 and restores it;
the attention helpers switch fused kernels without a double backward to 'eager' (the fallback).

Size: about 790 lines, 180 of them docstrings.  The coordinate space, the model state and the
operator are used together only (an operator owns one space and one state), so they stay in one
module a reader finds by the name of what it computes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch

from .. import numerics
from ..data.objectives import sequence_losses
from ..errors import UsageError
from ..identity import MODEL_KEY, SAMPLE_KEY, module_fingerprint, sample_fingerprint
from ..models import check_kind
from ..settings import HVP_METHODS
from .cotangents import Cotangents
from .difference import difference_product, kinked_activations
from .quadratic import Quadratic, block_dot
from .routes import Routes, undifferentiable
from .shards import check_shardable, local_part, point_split, rows_of
from .upcast import Upcast

# The cached first-order graphs of all batches together may hold this many bytes (see
# HessianOperator): enough for the embedded model at 16 x 128 tokens (~0.25 GiB) with room.
DEFAULT_CACHE_BYTES = 2**30

# ----------------------------------------------------------------------------- parameter space
@dataclass
class _Block:
    """One parameter's share of the flat coordinate vector."""

    name: str
    param: torch.nn.Parameter
    offset: int
    count: int
    index: Optional[torch.Tensor]  # flat indices of the kept elements, None = all of them
    shape: tuple = ()  # of the elements this rank holds: the parameter's, or its rows on a sharded model
    start: int = 0  # where this block's elements start in the whole flat vector (shards.VectorShards)


class _Space:
    """The coordinates the operator acts on.

    The kept elements of the trainable parameters, flattened in ``named_parameters()`` order (tied
    weights once).  On a model sharded with FSDP2 the blocks hold this rank's rows of each
    parameter (``sharding.local_rows``): ``dim`` counts the whole vector's coordinates,
    ``local_dim`` this rank's, and ``shards`` says where they lie (``shards.VectorShards``).
    """

    def __init__(self, model: torch.nn.Module, mask: Optional[dict] = None):
        self.all_params = list(model.named_parameters())
        self.blocks: list[_Block] = []
        offset, whole, group = 0, 0, None
        for name, param in self.all_params:
            if not param.requires_grad:
                continue
            rows, local = local_part(param)
            index, kept = None, param.numel()
            before = 0 if rows is None else rows[0] * (param.numel() // max(1, param.shape[0]))
            if mask is not None:
                keep = _mask_tensor(mask, name, param).to(local.device)
                kept = int(keep.sum())
                if rows is not None:
                    before, keep = int(keep[: rows[0]].sum()), keep[rows[0]: rows[1]]
                keep = keep.reshape(-1)
                if not kept:
                    continue
                if not bool(keep.all()):
                    index = keep.nonzero()[:, 0]
            count = local.numel() if index is None else int(index.numel())
            self.blocks.append(_Block(name, param, offset, count, index, tuple(local.shape), whole + before))
            offset += count
            whole += kept
            group = group if rows is None else param.device_mesh.get_group()
        self.dim, self.local_dim = whole, offset
        if self.dim == 0:
            raise UsageError("the Hessian has no coordinates: no parameter requires grad"
                             + ("" if mask is None else " inside the mask"))
        self.device = local_part(self.blocks[0].param)[1].device
        self.shards = None
        if group is not None:
            from .shards import VectorShards

            self.shards = VectorShards([(b.start, b.count) for b in self.blocks], self.dim, group)

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [b.param for b in self.blocks]

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """(dim,) float32 -> one float32 tensor per block, shaped like its parameter (zeros off-mask)."""
        return [_shaped(b, flat[b.offset: b.offset + b.count]) for b in self.blocks]

    def parts(self, row) -> list:
        """One callable per block reading its part of ``row`` (``row.read(start, count)``), shaped as unflatten's."""
        return [functools.partial(lambda b: _shaped(b, row.read(b.offset, b.count)), b) for b in self.blocks]

    def flatten(self, tensors: Iterable[Optional[torch.Tensor]]) -> torch.Tensor:
        """Per-block tensors (None = zero) -> (dim,) float32: the kept elements only."""
        parts = []
        for b, t in zip(self.blocks, tensors):
            if t is None:
                parts.append(torch.zeros(b.count, dtype=torch.float32, device=self.device))
            else:
                t = t.reshape(-1).float()
                parts.append(t if b.index is None else t[b.index])
        return torch.cat(parts)

    def to_dict(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """(dim,) -> {name: CPU float32 tensor} for every model parameter (zeros where not a coordinate).

        On a sharded model each tensor is gathered over the group (a collective: every rank calls it).
        """
        from ..sharding import full_tensor, sharded_like

        full = dict(zip(self.names, (full_tensor(sharded_like(t.detach(), b.param)).cpu().float()
                                     for t, b in zip(self.unflatten(flat), self.blocks))))
        return {name: full.get(name, torch.zeros(p.shape, dtype=torch.float32)) for name, p in self.all_params}

    def from_dict(self, direction: dict) -> torch.Tensor:
        """{name: tensor} -> (dim,) float32 on the model's device (elements off the mask dropped)."""
        return self.flatten(rows_of(direction[b.name], b.param).to(self.device) for b in self.blocks)

    def fingerprint(self) -> str:
        """Short hash of the coordinate set (names, shapes, kept indices)."""
        digest = hashlib.sha1()
        for b in self.blocks:
            digest.update(f"{b.name}{tuple(b.param.shape)}{b.count}".encode())
            if b.index is not None:
                digest.update(b.index.cpu().numpy().tobytes())
        return digest.hexdigest()[:16]


def _shaped(b: _Block, part: torch.Tensor) -> torch.Tensor:
    """A block's kept elements -> a tensor shaped like its parameter (zeros off-mask)."""
    if b.index is not None:
        part = torch.zeros(math.prod(b.shape), dtype=part.dtype, device=part.device).index_copy_(0, b.index, part)
    return part.view(b.shape)


def _mask_tensor(mask: dict, name: str, param: torch.Tensor) -> torch.Tensor:
    if name not in mask:
        raise UsageError(f"the mask has no tensor '{name}'; was it made for this model?")
    keep = torch.as_tensor(mask[name])
    if tuple(keep.shape) != tuple(param.shape):
        raise UsageError(f"mask tensor '{name}' has shape {tuple(keep.shape)} but the parameter has "
                         f"{tuple(param.shape)}; was the mask made for this model?")
    return keep.bool()


# ----------------------------------------------------------------------------- model state
def _attention_configs(model: torch.nn.Module) -> list:
    """Every distinct transformers config reachable from the model (sub-models and sub-configs)."""
    stack = [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")]
    seen = {}
    while stack:
        config = stack.pop()
        if id(config) in seen:
            continue
        seen[id(config)] = config
        for key in getattr(config, "sub_configs", None) or {}:
            sub = getattr(config, key, None)
            if hasattr(sub, "_attn_implementation"):
                stack.append(sub)
    return list(seen.values())


def _use_eager_attention(model: torch.nn.Module) -> Optional[str]:
    """Switch every attention of the model to 'eager'.

    Returns:
        The implementation it had, or None when there was nothing to switch (already eager
        everywhere, or not a transformers model).
    """
    configs = _attention_configs(model)
    current = [c._attn_implementation for c in configs]
    if all(impl in (None, "eager") for impl in current):
        return None
    if hasattr(model, "set_attn_implementation"):  # recent transformers: checks and sets sub-models
        try:
            model.set_attn_implementation("eager")
        except (ValueError, TypeError, AttributeError):
            pass  # set directly below
    for config in configs:  # older versions, and configs the call above skips
        if config._attn_implementation not in (None, "eager"):
            config._attn_implementation_internal = "eager"
    return next(impl for impl in current if impl not in (None, "eager"))


def _attention_implementations(model: torch.nn.Module) -> set:
    return {c._attn_implementation for c in _attention_configs(model)} - {None}


def _no_double_backward(err: BaseException) -> bool:
    """Whether an autograd error says an op has no second derivative (or no forward-mode AD)."""
    text = str(err).lower()
    return "derivative for" in text or "not implemented" in text or "does not support" in text


class _ModelState:
    """Puts a model in eval mode and float32 for the Hessian, and restores it exactly afterwards.

    Restored: each module's train flag, each cast tensor's original storage, each config's attention
    implementation, each embedding's ``padding_idx``.

    An embedding's ``padding_idx`` is cleared for the products: it changes no forward, but its
    backward leaves the padding row out of the gradient wherever that token is an input (a Llama
    whose pad token is its EOS, a chat text holding it), and the Jacobian of that gradient is no
    symmetric matrix: no Hessian of the loss (on the tiny Llama with one pad token per sample, its
    product's largest element was as far off a float64 central difference of the loss as it is
    large).  Without it the products are the loss's own Hessian (tests/test_hessian_routes.py).
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.modes = [(m, m.training) for m in model.modules()]
        self.padding = [(m, m.padding_idx) for m in model.modules()
                        if isinstance(m, torch.nn.Embedding) and m.padding_idx is not None]
        for module, _ in self.padding:
            module.padding_idx = None
        self.attention = [(c, c._attn_implementation_internal) for c in _attention_configs(model)
                          if hasattr(c, "_attn_implementation_internal")]
        self.params, self.buffers = [], []
        model.eval()
        seen = set()
        for module in model.modules():
            for param in module._parameters.values():
                if param is not None and id(param) not in seen and _needs_cast(param):
                    seen.add(id(param))
                    self.params.append((param, param.data))
                    param.data = param.data.float()
            for key, buf in module._buffers.items():
                if buf is not None and _needs_cast(buf):
                    self.buffers.append((module, key, buf))
                    module._buffers[key] = buf.float()

    @property
    def cast(self) -> bool:
        return bool(self.params or self.buffers)

    def restore(self):
        for param, data in self.params:
            param.data = data  # the original storage: bit-identical, no rounding back
        for module, key, buf in self.buffers:
            module._buffers[key] = buf
        for config, impl in self.attention:
            config._attn_implementation_internal = impl
        for module, training in self.modes:
            module.training = training
        for module, padding_idx in self.padding:
            module.padding_idx = padding_idx


def _needs_cast(t: torch.Tensor) -> bool:
    # Half precisions only: a float64 model keeps its precision (products come back as float32).
    return t.dtype in (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- the operator
class HessianOperator:
    """Exact Hessian-vector products of the token-weighted mean cross-entropy over ``batches``.

    A linear operator (``linear``'s convention: ``H @ v``, ``shape``, ``dtype`` float32,
    ``device``) that every estimator takes.  ``H @ v`` = ``matvec(v)`` returns H·v for a flat
    float32 vector over the operator's coordinates: the
    elements of the parameters with ``requires_grad`` (in ``named_parameters()`` order) that the
    mask keeps (all when ``mask`` is None), so H here is P·H·P restricted to those coordinates.
    Units: nats per target token per (unit of parameter)^2.

    Each product costs, per batch, one second-order backward through the graph of the batch's
    gradient (built once with ``create_graph=True``, i.e. double backward).  Those first-order
    graphs are kept between products while their saved tensors fit in ``cache_bytes`` (the
    forward and first backward are the same for every v), so from the second product on a product
    costs about two plain backwards; batches beyond the budget are recomputed each time.  The
    cache is checked against the parameters' version counters and rebuilt if weights changed.

    Choice of method (measured on the embedded 4-layer BERT, 16 x 128 tokens, 2 CPU threads,
    eager attention, torch 2.13; seconds per product, a plain loss.backward 0.14 s): double
    backward (``torch.autograd.grad(create_graph=True)``) 0.47-0.50 s; forward-over-reverse with
    ``torch.func.jvp(torch.func.grad(f))`` 0.55-0.65 s and with dual tensors
    (``torch.autograd.forward_ad``) 0.60 s (the same matmul count, 3x a gradient's, plus
    functorch/dual-tensor overhead per op); double backward reusing the cached first-order graph
    0.30 s.  Only double backward lets the v-independent half (forward and first backward) be
    recorded once and reused, so it is the method: a cached product does the 6 matmuls per
    linear layer of the second backward against the plain backward's 3, ~2.1-2.4x its time
    (``benchmarks/hessian.py``).

    Model state: inside a product (or a ``with`` block) the model is in eval mode and float32;
    bfloat16/float16 models are cast up to float32 for the products (the Hessian of a low-precision
    model is too noisy for Lanczos) and get their original tensors back, bit for bit, afterwards,
    as do every module's train/eval flag.  Weights are never modified.  While a product's second
    backward runs, those float32 copies are released and the graph reads the weights from the
    originals, one op at a time (``upcast.Upcast``: the same values, so the same products); inside
    ``released_between_products`` (the estimators' block) they stay released between products too.
    Each weight's shares of H·v are taken as they are made (``routes.Routes``), not summed by autograd.

    ``quadratic(v)`` gives vᵀ·H·v without H·v as a vector (``quadratic.Quadratic``): what
    Hutchinson's trace needs, 4 bytes per coordinate less.

    Attention: some fused kernels have no double backward (PyTorch's SDPA on CPU and its
    flash/memory-efficient CUDA backends).  When the first recorded graph holds such a backward
    (``routes.undifferentiable``: before any second backward; ``record`` does it before an
    estimator's first vector) or the first product fails for that reason, the model's attention
    is switched to transformers' 'eager' implementation (``set_attn_implementation`` and each
    config's ``_attn_implementation``), a warning is issued once, the graph or the product is
    made again, and the original implementation is restored when the operator's block ends.

    Args:
        model: a transformers LM (masked, causal, seq2seq or classifier), any device.
        batches: iterable of batch dicts (B, T) on the model's device, with ``labels``; kept as a list.
        mask: {param name: bool tensor shaped like the param}; None keeps every element.
        kind: the objective (``models.LoadedModel.kind``) for ``objectives.sequence_losses``.
        cache_bytes: budget for the cached first-order graphs; 0 recomputes them every product.
        hvp: "exact" (the double backward above) or "difference": central differences of four
            gradients (``difference.difference_product``), no double backward, so no attention
            fallback either; four gradients per product, relative error <= 2e-4 in float32 on the
            test models and 5e-4 on SmolLM2-135M along the gradient, random and Lanczos vectors
            (docs/curvature.md).  The model's parameters are bit-identical after each product.
    """

    dtype = torch.float32  # of the products, whatever the model's (see "Model state")
    progress_label = "Hessian-vector products"  # the estimators' progress bars
    reads_rows = True  # matvec takes a file basis's row and reads it by parts (``linear._Products.matvec_row``)

    def __init__(self, model: torch.nn.Module, batches: Iterable[dict], mask: Optional[dict] = None,
                 kind: Optional[str] = None, cache_bytes: int = DEFAULT_CACHE_BYTES, hvp: str = "exact"):
        if hvp not in HVP_METHODS:
            raise UsageError(f"the Hessian-vector product must be one of {', '.join(HVP_METHODS)}, got {hvp!r}")
        self.hvp = hvp
        self.model = model
        self.kind = check_kind(kind)
        self.batches = [_usable_batch(b) for b in batches]
        if not self.batches:
            raise UsageError("the Hessian needs at least one batch of samples")
        self.space = _Space(model, mask)
        self.shards = self.space.shards  # this rank's pieces of each vector on a sharded model, else None
        if self.shards is not None:
            check_shardable(model, hvp)
        self.split = point_split(model)  # under torchrun: the point groups split probes and runs
        self.cache_bytes = int(cache_bytes)
        self.products = 0
        self.step_scale = 1.0  # hvp "difference": the step is the rule's times this (``scaled_step``)
        self._state: Optional[_ModelState] = None
        self._upcast: Optional[Upcast] = None  # a cast model's float32 copies, released for second backwards
        self._depth = 0
        self._lean = 0  # inside released_between_products: the float32 copies stay released between products
        self._eager = False  # the model's attention had to be switched to eager (known after one product)
        self._warned = False
        self._reset_cache()

    # -- public surface
    @property
    def dim(self) -> int:
        """Number of coordinates (kept trainable elements)."""
        return self.space.dim

    @property
    def writes(self) -> bool:
        """Whether this process writes what the operator's estimates give: rank 0 under torchrun."""
        from ..runtime import rank_and_world

        return rank_and_world()[0] == 0

    @property
    def local_dim(self) -> int:
        """Elements of a vector this rank holds: ``dim``, or its pieces on a sharded model."""
        return self.space.local_dim

    @property
    def names(self) -> list[str]:
        """Names of the parameters with at least one coordinate, in coordinate order."""
        return self.space.names

    @property
    def shape(self) -> tuple:
        """(dim, dim): the operator's size (``linear``'s convention)."""
        return (self.space.dim, self.space.dim)

    @property
    def device(self) -> torch.device:
        """The device of the coordinates (the model's)."""
        return self.space.device

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        """``H @ v`` = ``H.matvec(v)``: the operator interface the estimators take (``linear``)."""
        return self.matvec(v)

    def identity(self) -> dict:
        """What fixes the operator's entries, for checkpoints.

        The model by content, as every stage identifies it (``identity.module_fingerprint``: its
        checkpoint's weights and configuration when it was loaded from one), the sample's tokens,
        the coordinates, the objective.
        """
        if self._upcast is not None:  # a parameters' fingerprint reads the weights: not released ones
            self._upcast.restore()
        return {"model": type(self.model).__name__, MODEL_KEY: module_fingerprint(self.model),
                SAMPLE_KEY: sample_fingerprint(self.batches), "coordinates": self.space.fingerprint(),
                "dim": self.dim, "objective": self.kind, **numerics.recorded(self.model),
                # Only when not exact: checkpoints written before the option keep resuming.
                **({} if self.hvp == "exact" else {"hvp": self.hvp})}

    def to_dict(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flat (dim,) vector -> {name: CPU float32 tensor} over every model parameter (zeros elsewhere)."""
        return self.space.to_dict(flat)

    def from_dict(self, direction: dict) -> torch.Tensor:
        """{name: tensor} -> flat (dim,) float32 vector on the model's device (off-mask elements dropped)."""
        return self.space.from_dict(direction)

    def from_local_rows(self, direction: dict) -> torch.Tensor:
        """{name: this rank's rows} -> the (local_dim,) vector ``matvec`` takes.

        Sharded, a direction held as each rank's rows of every tensor (as a sharded gradient is)
        is the operator's local pieces already, where ``from_dict`` takes whole tensors and cuts
        them; unsharded, the rows are the whole tensors and this is ``from_dict``.
        """
        if self.shards is None:
            return self.from_dict(direction)
        return self.space.flatten(direction[name].to(self.device) for name in self.names)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """The Hessian-vector product H·v.

        Args:
            v: (local_dim,) float vector over the operator's coordinates (this rank's pieces of it
                on a sharded model, every rank of the group calling), on any device; or a row of
                a Krylov basis in a file (``krylov.FileRow``), which the exact product reads one
                parameter's part at a time as its second backward needs it (``cotangents``), so
                that v is not held whole beside the product.

        Returns:
            (local_dim,) float32 on the model's device, in nats/token per unit² times v's units.
        """
        return self._run(v, quadratic=False)

    def quadratic(self, v: torch.Tensor) -> float:
        """vᵀ·H·v, without H·v as a vector (``quadratic``): what a Hutchinson probe needs.

        Args:
            v: (local_dim,) float vector over the operator's coordinates (this rank's pieces of it
                on a sharded model), on any device.

        Returns:
            A float in nats/token per unit² times v's units squared (on a sharded model, this
            rank's pieces' share: the caller adds the group's, ``_Products.summed``); the exact product's share of
            each parameter is dotted with v (float64) as it is made, so the product vector (4
            bytes per coordinate) is never held; the difference product forms H·v and dots it.
        """
        if self.hvp == "difference":
            v = self._vector(v)
            return block_dot(v, self._run(v, quadratic=False))
        return self._run(v, quadratic=True)

    def _vector(self, v, lazy: bool = False):
        if not torch.is_tensor(v):  # a basis row in a file (``krylov.FileRow``): read by parts when it may be
            if lazy and self.hvp == "exact" and self.shards is None and v.numel() == self.local_dim:
                return v
            v = v.tensor()
        v = v.detach().to(device=self.device, dtype=torch.float32).reshape(-1)
        if v.numel() != self.local_dim:
            raise UsageError(f"the vector has {v.numel()} elements but the Hessian acts on {self.local_dim}")
        return v

    def _run(self, v: torch.Tensor, quadratic: bool):
        """H·v (``quadratic``: vᵀ·H·v as a float), with the attention fallback on the first product."""
        v = self._vector(v, lazy=not quadratic)
        if self.hvp == "difference":
            self._warn_kinks()
            with self, torch.enable_grad():
                out, tokens = difference_product(self.model, self.space, self.batches, self.kind, v,
                                                 self.step_scale)
            if tokens == 0:
                raise UsageError("the Hessian's sample has no target tokens")
            self.products += 1
            return out.div_(tokens)
        with self, torch.enable_grad():
            out = self._falling_back(lambda: self._product(v, quadratic))
        self.products += 1
        return out

    def clear(self):
        """Drop the cached first-order graphs (frees their memory)."""
        self._reset_cache()

    def _falling_back(self, attempt):
        """``attempt()``, redone once with eager attention when the model's first graph has no second derivative.

        The failure is found in the recorded graph (``routes.undifferentiable``), before any
        vector of the product is made, or else by the second backward itself.
        """
        try:
            return attempt()
        except (RuntimeError, NotImplementedError) as err:
            self._reset_cache()  # a half-built cache would miscount the tokens
            if self.products or not _no_double_backward(err) or not self._fall_back_to_eager():
                raise
        except BaseException:
            self._reset_cache()
            raise
        # Outside the except block: the failed attempt's frames (its graph, its sum) are freed.
        try:
            return attempt()
        except BaseException:
            self._reset_cache()
            raise

    @contextlib.contextmanager
    def scaled_step(self, factor: float) -> Iterator["HessianOperator"]:
        """A block in which the difference product's step is ``factor`` times its rule's (no effect on "exact").

        For a check of the step (``lanczos``): the same product at two steps differs by its error.
        """
        before, self.step_scale = self.step_scale, float(factor)
        try:
            yield self
        finally:
            self.step_scale = before

    @contextlib.contextmanager
    def released_between_products(self) -> Iterator["HessianOperator"]:
        """The operator's block, in which a cast model's float32 copies stay released from one product to the next.

        For an estimator that touches the model only through products (``linear._Products``
        enters it): after a product its caller's vector and the product are alive, and making the
        copies again there (4 bytes per parameter) would set the run's peak.  They are made again
        when a first-order graph is recorded, when ``identity()`` reads the weights, and when the
        block ends inside an outer one (whose code may run the model); outside every block the
        model gets its own tensors back, as always.
        """
        with self:
            self._lean += 1
            try:
                yield self
            finally:
                self._lean -= 1
                if not self._lean and self._depth > 1 and self._upcast is not None:
                    self._upcast.restore()

    def __enter__(self) -> "HessianOperator":
        if self._depth == 0:
            self._state = _ModelState(self.model)
            if self.hvp == "exact" and self._state.params:
                self._upcast = Upcast(self._state.params)
            if self._eager:
                _use_eager_attention(self.model)
            elif self.hvp == "exact" and _attention_implementations(self.model) - {"eager", "sdpa"}:
                # flash-attn, flex and hub kernels: a backward that autograd cannot see through
                # would not fail but silently drop second-order terms; switch before trying.
                self._fall_back_to_eager("may have no second derivative")
        self._depth += 1
        return self

    def __exit__(self, *exc) -> bool:
        self._depth -= 1
        if self._depth == 0:
            if self._state.cast:  # the graphs hold the float32 copies, which are gone now
                self._reset_cache()
            self._upcast = None
            self._state.restore()
            self._state = None
        return False

    # -- internals
    def _warn_kinks(self):
        kinked = [] if self.products else kinked_activations(self.model)
        if kinked:
            # Measured on the tiny ReLU T5: a relative error of 0.63-9.8 for c from 1e-4 to 0.1 (6.5 at 2e-4).
            warnings.warn(f"{type(self.model).__name__} has {', '.join(kinked)} activations: the difference "
                          "product also counts the gradient's jumps at their kinks, which the exact product "
                          "(second derivative zero) leaves out, so the two can differ far beyond 1e-3; "
                          "use the exact product for such models", stacklevel=3)

    def _reset_cache(self):
        self._grad_sum = None  # Σ over cached batches of the first-order gradient, with its graph
        self._routes: Optional[Routes] = None  # where its second backward's shares reach the parameters
        self._cached = set()  # indices of batches inside _grad_sum
        self._cached_tokens = 0.0  # Σ n_tokens of those batches
        self._tokens: Optional[float] = None  # Σ_b n_tokens_b
        self._signature = None
        self._used_bytes = 0

    def _weights_signature(self):
        # A cast parameter's float32 copy is made again after each release: its original identifies it.
        originals = {id(p): data for p, data in (self._state.params if self._state else ())}
        return [(originals.get(id(p), p).data_ptr(), p._version) for p in self.space.params]

    def _fall_back_to_eager(self, reason: str = "has no second derivative") -> bool:
        """Switch the model's attention to 'eager' (warning once); False if there was nothing to switch."""
        before = _use_eager_attention(self.model)
        if before is None:
            return False
        self._eager = True
        self._reset_cache()
        if not self._warned:
            self._warned = True
            warnings.warn(f"{type(self.model).__name__}: the '{before}' attention {reason}; Hessian-vector "
                          "products use the 'eager' implementation (the model's is restored afterwards)",
                          stacklevel=3)
        return True

    def _product(self, v: torch.Tensor, quadratic: bool = False):
        try:
            return self._products(v, quadratic)
        finally:
            if self._upcast is not None and not self._lean:  # the model holds its float32 weights again
                self._upcast.restore()

    def _products(self, v: torch.Tensor, quadratic: bool):
        if self._signature is not None and self._signature != self._weights_signature():
            self._reset_cache()  # weights changed since the graphs were recorded
        first = self._tokens is None
        tokens = 0.0  # of the batches not cached
        vs = self.space.unflatten(v) if torch.is_tensor(v) else self.space.parts(v)
        with Quadratic(self.space.params, vs) if quadratic else _Accumulator(self.space) as hv:
            for index, batch in enumerate(self.batches):
                if index in self._cached:
                    continue
                grads, n_tokens, nbytes = self._gradient(batch)
                if first and self._used_bytes + nbytes <= self.cache_bytes:
                    self._cache(index, grads, n_tokens, nbytes)
                else:
                    tokens += n_tokens
                    self._second(grads, vs, hv, Routes(grads, self.space.params), retain=False)
            if first:
                self._tokens = self._cached_tokens + tokens
                self._signature = self._weights_signature()
            if self._grad_sum is not None:
                if self._routes is None:  # the cached graph's: found once, hooked for each backward
                    self._routes = Routes(self._grad_sum, self.space.params)
                self._second(self._grad_sum, vs, hv, self._routes, retain=True)
        if self._tokens == 0:
            raise UsageError("the Hessian's sample has no target tokens")
        return hv.result() / self._tokens if quadratic else hv.result().div_(self._tokens)

    def _cache(self, index: int, grads: list, n_tokens: float, nbytes: int) -> None:
        self._used_bytes += nbytes
        self._cached.add(index)
        self._cached_tokens += n_tokens
        self._grad_sum = grads if self._grad_sum is None else [
            g if s is None else (s if g is None else _hollow(s + g)) for s, g in zip(self._grad_sum, grads)]

    def record(self) -> None:
        """Record the cached first-order graphs now, as the first product would, before the caller's first vector.

        For an estimator whose first vector can wait (the trace draws its first probe after this):
        the graph is built while the float32 copies exist, and its vector would have been alive
        beside them.  Batches beyond the cache budget are left to the products, as before.  Does
        nothing for the difference product, without a cache budget, or once a product or a record
        has run.  An attention without a second derivative is found in this graph
        (``routes.undifferentiable``) and switched to eager here, before the first vector, rather
        than by a first product that fails and records again beside its vector.
        """
        if self.hvp != "exact" or self.cache_bytes <= 0 or self._tokens is not None or self._cached:
            return
        with self, torch.enable_grad():
            self._falling_back(self._record)
            if self._lean and self._upcast is not None:  # the products need only the graph until the next one
                self._upcast.release()

    def _record(self) -> None:
        for index, batch in enumerate(self.batches):
            grads, n_tokens, nbytes = self._gradient(batch)
            if self._used_bytes + nbytes > self.cache_bytes:
                break  # this batch and those after it: the first product computes them
            self._cache(index, grads, n_tokens, nbytes)
            del grads
        if self._cached:
            self._signature = self._weights_signature()

    def _gradient(self, batch: dict):
        """First-order gradient of the batch's summed loss with its graph: (grads, n_tokens, bytes held)."""
        # Weights and buffers are in memory anyway: only what the graph adds is counted.
        seen = {t.data_ptr() for t in list(self.model.parameters()) + list(self.model.buffers())}
        held = [0]
        upcast = self._upcast
        if upcast is not None:
            upcast.restore()

        def pack(t):
            try:
                key = t.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    held[0] += t.untyped_storage().nbytes()
            except (RuntimeError, NotImplementedError):  # tensors without a plain storage
                pass
            return t if upcast is None else upcast.pack(t)

        with torch.autograd.graph.saved_tensors_hooks(pack, (lambda t: t) if upcast is None else upcast.unpack):
            losses = sequence_losses(self.model, batch, self.kind)
            loss = losses.loss_sum.sum()
            # Each gradient is emptied as soon as it is complete (a hook on its parameter), so the
            # whole first-order gradient never exists at once.
            hooks = [p.register_hook(_hollow) for p in self.space.params]
            try:
                grads = torch.autograd.grad(loss, self.space.params, create_graph=True, allow_unused=True)
            finally:
                for hook in hooks:
                    hook.remove()
        missing = undifferentiable(grads, self.space.params)
        if missing:  # failing here, not in the second backward: no vector of the product exists yet
            raise RuntimeError(f"the gradient's graph has no second derivative: derivative for the backward of "
                               f"{missing} is not implemented")
        held[0] += 4 * sum(p.numel() for p in self.space.params)  # the gradient tensors themselves (a bound)
        return [_hollow(g) for g in grads], float(losses.n_tokens.sum()), held[0]

    def _second(self, grads: list, vs: list, hv, routes: Routes, retain: bool) -> None:
        """Add the gradient of <grads, v> with respect to the coordinates' parameters (the unnormalized H·v) to hv.

        The backward starts at the (hollow) gradients with v as their cotangents: what the
        gradient of Σ vdot(g, v) sends them, without keeping the gradients' values.  Each share
        of a parameter goes to ``hv.take`` as it is made (``routes``), none waits in autograd's buffers.
        """
        pairs = [(g, v) for g, v in zip(grads, vs) if g is not None and g.requires_grad]
        if not pairs:  # the gradient does not depend on the weights: H = 0
            return
        if self._upcast is not None:  # before hv's vector: the graph reads the weights from the originals
            self._upcast.release()
        # Into the parameters' .grad, which hv points at its own storage: no per-parameter copy and
        # no concatenation of them, two vectors fewer than autograd.grad's tensors and a flatten.
        hv.prepare()
        cotangents = Cotangents(pairs)  # v's parts, or read as their nodes run (a basis row in a file)
        handles = routes.attach(hv.take) + cotangents.attach()
        try:
            torch.autograd.backward(cotangents.roots, grad_tensors=cotangents.grads,
                                    inputs=self.space.params, retain_graph=retain)
        finally:
            for handle in handles:
                handle.remove()
        hv.fold()


def _hollow(g: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Keep g's graph and shape but not its values (one zero, expanded): a second backward needs only those.

    A product's backward starts at the gradients with v as cotangents and never reads their values,
    so the cache keeps no copy of the gradient (4 bytes per parameter).  A gradient that is a view
    (a linear layer's is the transpose of a product) keeps its base alive: the base, an
    intermediate of the first backward that only this view reads, is emptied too.
    """
    if g is None:
        return g
    base = g._base
    for t in (g, base) if base is not None and base.grad_fn is not None else (g,):
        t.data = torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape)
    return g


class _Accumulator:
    """H·v summed over backwards straight into one flat float32 vector (``result()``).

    From ``prepare`` (called before the first backward, once the first-order gradients are made:
    the vector is not allocated while they are whole) to the block's end, each coordinate
    parameter's ``.grad`` is a view of the vector (float32 parameters without a mask) or a zeroed
    parameter-sized tensor that ``fold`` adds into it after each backward (masked or non-float32
    ones: as the gathered, float32 per-backward sums were added before); the parameters' own
    ``.grad`` are put back on leaving.
    """

    def __init__(self, space: _Space):
        self.space = space
        self.out: Optional[torch.Tensor] = None
        self.saved: Optional[list] = None
        self.folded = []  # (block, its parameter-sized .grad) of the blocks fold adds in
        self.targets: list = []  # each block's .grad, where take adds its shares

    def result(self) -> torch.Tensor:
        """The sum (zeros when there was no backward)."""
        if self.out is None:
            return torch.zeros(self.space.dim, dtype=torch.float32, device=self.space.device)
        return self.out

    def prepare(self) -> None:
        if self.out is not None:
            return
        space = self.space
        self.out = torch.zeros(space.dim, dtype=torch.float32, device=space.device)
        self.saved = [b.param.grad for b in space.blocks]
        for b in space.blocks:
            if b.index is None and b.param.dtype == torch.float32:
                b.param.grad = self.out[b.offset: b.offset + b.count].view(b.param.shape)
            else:
                b.param.grad = torch.zeros_like(b.param)
                self.folded.append((b, b.param.grad))
            self.targets.append(b.param.grad)

    def take(self, block: int, share: torch.Tensor) -> None:
        """Add one share of a block's H·v (shaped as its parameter) where autograd would have put it."""
        self.targets[block].add_(share)

    def fold(self) -> None:
        for b, grad in self.folded:
            flat = grad.reshape(-1)
            self.out[b.offset: b.offset + b.count] += (flat if b.index is None else flat[b.index]).float()
            grad.zero_()

    def __enter__(self) -> "_Accumulator":
        return self

    def __exit__(self, *exc) -> bool:
        for b, grad in zip(self.space.blocks, self.saved or ()):
            b.param.grad = grad
        return False


def _usable_batch(batch: dict) -> dict:
    # Tensors made under inference_mode cannot be saved for backward (an embedding saves its ids).
    return {k: (v.clone() if torch.is_tensor(v) and v.is_inference() else v) for k, v in batch.items()}
