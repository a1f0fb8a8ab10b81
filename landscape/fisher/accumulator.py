"""The Fisher accumulator: running sums of squared exact per-sample gradients, batch by batch.

Hooks on every module that has a registered rule (``fisher.rules``: ``nn.Linear``, GPT-2
``Conv1D``, ``nn.Embedding``, ``nn.LayerNorm``, RMS norms) capture each module's input and the
gradient of the loss sum with respect to its output; the rule turns them into per-sample
parameter gradients (for a linear layer ``g_nᵀ x_n``, a batched matmul with the FLOPs of an
ordinary weight gradient), which are squared and summed.  A weight used by several modules (an
embedding tied to the output decoder) gets the sum of all its uses per sample before squaring.
Parameters of any other module (T5's relative attention bias, unknown layers) get exact
per-sample gradients from a vmapped backward.

Memory is bounded by chunking over samples and, for a tensor whose per-sample gradient alone
exceeds the budget (a tied 49152 x 576 output embedding), over row blocks of it: at most
``max_chunk_mb`` of per-sample gradients exist at once.  The default budget is a fraction of the
model's size (``budget.default_chunk_mb``), so the sums (4 bytes per parameter) dominate the memory.

Under a sharded model (``landscape.sharding``: FSDP2, parameters as row-sharded DTensors) every
rank of a shard group runs the same batch and keeps sums only for its own rows of each parameter
(``local_rows``): the activations and output gradients the hooks see are whole on every rank.

Size: about 500 lines, over 100 of them docstrings.  The hooks, the chunking and the sharded rows
share one accumulator's state (its sums, budget and capture buffers); split across modules, each
part would reach into another's private state.
"""

import contextlib
from dataclasses import dataclass

import torch

from .. import checks
from ..data.objectives import IGNORE_INDEX, sequence_losses
from ..errors import UsageError
from ..models import check_kind
from ..runtime import all_reduce_sum
from ..sharding import is_sharded, local_rows
from .budget import (
    CACHE_BLOCK_ELEMENTS,
    activation_bytes,
    chunk_and_block,
    default_chunk_mb,
    default_pass_mb,
    row_numel,
    samples_per_pass,
)
from .rules import kept_tokens, rule_for

# --------------------------------------------------------------------------------------------
# Which modules get exact per-sample gradients from hooks, and for which of their parameters.

class _Unsupported(Exception):
    """A hooked module was called with inputs whose rows are not samples; use the fallback."""

    def __init__(self, module_name):
        super().__init__(module_name)
        self.module_name = module_name


@dataclass
class _Call:
    """One call of a hooked module in the current batch.

    Holds its input and, after backward, the gradient of the loss sum with respect to its output.
    """

    module_name: str
    x: torch.Tensor  # input (embedding: indices); rows are samples, or target rows (row_sample)
    row_sample: torch.Tensor = None  # (M,) sample index of each row, for LM decoder inputs
    g: torch.Tensor = None
    remaining: int = 0  # parameters of this call still to process

    def samples(self, tensor, batch_size, start, stop):
        """Per-sample layout (stop - start, L, d) of ``tensor`` for samples [start, stop).

        Rows are zero where a sample has fewer rows than the longest of the batch (so every chunk
        has the same L).
        """
        if self.row_sample is None:
            return tensor.reshape(batch_size, -1, tensor.shape[-1])[start:stop]
        lo, hi = torch.searchsorted(self.row_sample, torch.tensor([start, stop], device=self.row_sample.device))
        counts = torch.bincount(self.row_sample, minlength=batch_size)
        length = int(counts.max()) if len(self.row_sample) else 0
        if length and bool((counts[start:stop] == length).all()):
            # Every sample has the same rows (a causal LM's unpadded samples): the layout is a
            # view of the rows themselves, not a logits-sized padded copy.
            return tensor[lo:hi].reshape(stop - start, length, tensor.shape[-1])
        return _pad_rows(tensor[lo:hi], self.row_sample[lo:hi] - start, stop - start, length)


def _pad_rows(rows, row_sample, count, length):
    """Scatter ``rows`` into a (count, length, d) per-sample layout.

    Row i of ``rows`` goes to sample row_sample[i] (sorted), after that sample's earlier rows; the
    rest is zero.
    """
    counts = torch.bincount(row_sample, minlength=count)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(len(row_sample), device=rows.device) - starts[row_sample]
    out = rows.new_zeros((count, length, rows.shape[-1]))
    out[row_sample, position] = rows
    return out


# --------------------------------------------------------------------------------------------
# The accumulator: running sums of squared per-sample gradients, for S groups of samples.

class FisherAccumulator:
    """Running sums S_s,j = Σ_n w_{n,s} (∂ℓ_n/∂θ_j)² and sample counts, for S sample groups.

    One group (all weights 1) is the ordinary Fisher; several groups with 0/1 weights estimate the
    Fisher of nested sub-samples in one pass (``nested_fisher``).  ``add_batch`` does one batched
    forward and backward.  Sums are float32, on the parameters' device; for a sharded model, of
    this rank's rows only: ``sums[name]`` is (S, stop - start, *shape[1:]) for ``rows[name]``.
    A batch whose activations would exceed ``default_pass_mb`` runs in slices of samples.

    Args:
        model: the model; every parameter with requires_grad is accumulated.
        n_groups: the number S of sample groups.
        kind: the objective (``models.LoadedModel.kind``); required.
        max_chunk_mb: budget for per-sample gradients at a time, in MB (None: ``default_chunk_mb``).
    """

    def __init__(self, model, n_groups=1, kind=None, max_chunk_mb=None):
        self.model = model
        self.kind = check_kind(kind)
        self.n_groups = n_groups
        if max_chunk_mb is None:
            max_chunk_mb = default_chunk_mb(model)
        checks.CHUNK_MB.check(max_chunk_mb, "max_chunk_mb")
        self.chunk_elements = max(1, int(max_chunk_mb * 2**20 // 4))
        self.pass_bytes = int(default_pass_mb(model) * 2**20)
        self._costs = None
        self._unit = False  # this batch: one group, every weight 1 (set by add_batch)
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.sharded = any(is_sharded(p) for p in self.params.values())
        self.rows = {n: local_rows(p) for n, p in self.params.items()}
        self.sums = {n: torch.zeros((n_groups, *_local_shape(p, self.rows[n])), dtype=torch.float32,
                                    device=p.device) for n, p in self.params.items()}
        self.counts = torch.zeros(n_groups, dtype=torch.float64)
        self.device = next(iter(self.params.values())).device if self.params else torch.device("cpu")
        self.cache_elements = CACHE_BLOCK_ELEMENTS if self.device.type == "cpu" else None
        self._divided = set()
        self._plan_hooks()

    # -- planning --------------------------------------------------------------------------
    def _plan_hooks(self, unsupported=()):
        """Decide which modules are hooked and which parameters need the generic fallback."""
        name_of = {id(p): n for n, p in self.params.items()}
        self.hooked = {}  # module name -> (module, rule, {role: param name})
        holders = {n: [] for n in self.params}
        owners = {n: [] for n in self.params}  # every module holding the parameter directly
        # One walk over the modules: a walk per parameter made planning O(parameters x modules),
        # 0.14 s of every Fisher call on SmolLM2 (272 tensors, 400+ modules).
        for mname, module in self.model.named_modules():
            own = {role: name_of[id(p)] for role, p in module._parameters.items()
                   if p is not None and id(p) in name_of}
            for pname in dict.fromkeys(own.values()):
                owners[pname].append(mname)
            if not own:
                continue
            rule = None if mname in unsupported else rule_for(mname, module)
            ok = rule is not None and set(own) <= rule.roles
            for pname in own.values():
                holders[pname].append(mname if ok else None)
            if ok:
                self.hooked[mname] = (module, rule, own)
        for pname, hs in holders.items():
            # A head that re-exposes its child's parameter (BERT: ``self.decoder.bias = self.bias``)
            # holds it without using it; the child's hook sees every use.
            hooked_holders = [m for m in hs if m is not None]
            containers = [m for m in owners[pname] if m not in hooked_holders]
            if hooked_holders and all(any(h.startswith(c + ".") or not c for h in hooked_holders)
                                      for c in containers):
                holders[pname] = hooked_holders
        self.fallback = [n for n, hs in holders.items() if None in hs]
        if self.sharded and self.fallback:
            raise UsageError(f"parameter '{self.fallback[0]}' has no per-layer Fisher rule (it needs the vmapped "
                             "per-sample fallback), which a sharded model does not support; use shard size 1")
        self.holders = {n: hs for n, hs in holders.items() if None not in hs}
        for mname in list(self.hooked):
            module, rule, own = self.hooked[mname]
            own = {role: n for role, n in own.items() if n in self.holders}
            if own:
                self.hooked[mname] = (module, rule, own)
            else:
                del self.hooked[mname]

    # -- one batch -------------------------------------------------------------------------
    def add_batch(self, batch, weights=None):
        """Accumulate one batch.

        Args:
            batch: dict of (B, T) tensors with ``labels``; each row is a sample.
            weights: (B, S) membership of each sample in each of the S groups (default: all ones).
        """
        size = batch["labels"].shape[0]
        if weights is None:
            weights = torch.ones(size, self.n_groups)
        weights = torch.as_tensor(weights, dtype=torch.float32).reshape(size, self.n_groups)
        # Decided once per batch on the host, so that no block below waits on the device to ask.
        self._unit = self.n_groups == 1 and bool((weights == 1).all())
        weights = weights.to(self.device)
        step = self._samples_per_pass(batch)
        for start in range(0, size, step):
            rows = slice(start, min(size, start + step))
            self._add_rows({k: v[rows] for k, v in batch.items()} if step < size else batch, weights[rows])
        self.counts += weights.sum(0).to("cpu", torch.float64)

    def _samples_per_pass(self, batch):
        """The whole batch, or slices of samples when its activations would exceed the pass budget.

        Per-sample gradients do not depend on which samples share a pass.
        """
        if self._costs is None:
            self._costs = activation_bytes(self.model, self.kind, self.hooked)
        return samples_per_pass(batch, self._costs, self.pass_bytes)

    def _add_rows(self, batch, weights):
        unsupported = set()
        while True:
            try:
                self._run_batch(batch, weights)
                break
            except _Unsupported as err:
                if self.sharded:  # a half-run forward of a sharded model cannot be rerun
                    raise UsageError(f"module '{err.module_name}' is called on rows that are not samples; its "
                                     "parameters need the vmapped per-sample fallback, which a sharded model "
                                     "does not support; use shard size 1") from None
                unsupported.add(err.module_name)
                self._plan_hooks(unsupported)

    def _run_batch(self, batch, weights):
        self._batch_size = batch["labels"].shape[0]
        self._weights = weights
        self._row_sample = None
        # Masked and causal LMs run their output projection on target rows only (objectives).
        if self.kind == "mlm":
            self._row_sample = (batch["labels"] != IGNORE_INDEX).nonzero()[:, 0]
        elif self.kind == "causal":
            self._row_sample = (batch["labels"][:, 1:] != IGNORE_INDEX).nonzero()[:, 0]
        self._calls = {m: [] for m in self.hooked}
        self._done = set()
        self._capturing = False
        dummy = torch.zeros((), device=weights.device, requires_grad=True)
        self._dummy = dummy
        with self._frozen_hooked_params(), self._forward_hooks(), torch.enable_grad():
            losses = sequence_losses(self.model, batch, self.kind).mean_per_sample()  # (B,)
            self._count_pending()
            if self.fallback:
                self._accumulate_fallback(losses)
            self._capturing = True
            fallback = [self.params[n] for n in self.fallback]  # outputs downstream of them only
            torch.autograd.grad(losses.sum(), [dummy] + fallback, allow_unused=True)
            self._capturing = False
            for pname in self.holders:  # uses whose output did not reach the loss count as zero
                if pname not in self._done:
                    self._process(pname)
        self._calls = None

    @contextlib.contextmanager
    def _frozen_hooked_params(self):
        """Hooked parameters do not require grad during the pass.

        So backward computes only activation gradients; their per-sample gradients come from the
        hooks instead.
        """
        frozen = [self.params[n] for n in self.holders]
        for p in frozen:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in frozen:
                p.requires_grad_(True)

    @contextlib.contextmanager
    def _forward_hooks(self):
        handles = [module.register_forward_hook(self._make_forward_hook(mname))
                   for mname, (module, _, _) in self.hooked.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _make_forward_hook(self, mname):
        module, rule, _ = self.hooked[mname]
        is_decoder = (self.kind in ("mlm", "causal") and module is self.model.get_output_embeddings())

        def hook(mod, args, output):
            return self._on_forward(mname, rule, is_decoder, args[0], output)

        return hook

    def _on_forward(self, mname, rule, is_decoder, x, output):
        size = self._batch_size
        row_sample = None
        if rule.input_is_index:
            if x.dim() == 0 or x.shape[0] not in (1, size):
                raise _Unsupported(mname)
            if x.shape[0] == 1 and size > 1:  # position ids broadcast over the batch
                x = x.expand(size, *x.shape[1:])
                output = output.expand(size, *output.shape[1:])
            x = x.reshape(size, -1)
        elif is_decoder and x.dim() == 2 and x.shape[0] == len(self._row_sample):
            row_sample = self._row_sample  # the LM decoder runs on target rows only
        elif x.dim() < 2 or x.shape[0] != size:
            raise _Unsupported(mname)
        if not output.requires_grad:
            # Hooked weights are frozen, so outputs at the bottom of the graph would not require
            # grad; adding a zero leaf puts every hooked output on a path to that leaf, and
            # backward to it computes activation gradients only, never weight gradients.
            output = output + self._dummy
        call = _Call(mname, x.detach(), row_sample)
        self._calls[mname].append(call)
        output.register_hook(lambda grad: self._on_grad(call, grad))
        return output

    def _count_pending(self):
        self._pending = {}
        for pname, mnames in self.holders.items():
            self._pending[pname] = sum(len(self._calls[m]) for m in set(mnames))
        for mname, calls in self._calls.items():
            for call in calls:
                call.remaining = len(self.hooked[mname][2])

    def _on_grad(self, call, grad):
        if not self._capturing:
            return None
        call.g = grad.detach()
        for pname in self.hooked[call.module_name][2].values():
            self._pending[pname] -= 1
            if self._pending[pname] == 0:
                self._process(pname)
        return None

    # -- per-sample gradients of one parameter ----------------------------------------------
    def _uses(self, pname):
        """[(call, rule, role)] of every use of parameter ``pname`` in this batch."""
        uses = []
        for mname in dict.fromkeys(self.holders[pname]):
            module, rule, own = self.hooked[mname]
            role = next(r for r, n in own.items() if n == pname)
            uses += [(call, rule, role) for call in self._calls[mname]]
        return uses

    def _process(self, pname):
        self._done.add(pname)
        uses = [u for u in self._uses(pname) if u[0].g is not None]
        if uses:
            if all(rule.input_is_index for _, rule, _ in uses):
                self._accumulate_sparse_embedding(pname, uses)
            else:
                self._accumulate_dense(pname, uses)
        for call, rule, role in self._uses(pname):
            call.remaining -= 1
            if call.remaining <= 0:
                call.x = call.g = None  # free the activations as soon as nothing needs them

    def _accumulate_dense(self, pname, uses):
        param, (first, last) = self.params[pname], self.rows[pname]
        if last <= first:
            return  # a shard with no rows of this parameter
        size = self._batch_size
        chunk, block = chunk_and_block(size, last - first, row_numel(param), self.chunk_elements,
                                       self.cache_elements)
        whole = (first, last) == (0, param.shape[0]) and block >= last - first
        # Embedding rows go last: they are added into the dense per-sample gradient in place.
        uses = sorted(uses, key=lambda u: u[1].input_is_index)
        for start in range(0, size, chunk):
            stop = min(size, start + chunk)
            prepared = [(*_prepare(call, rule, size, start, stop), self.hooked[call.module_name][0], rule, role)
                        for call, rule, role in uses]
            weights = self._weights[start:stop].T
            for a in range(first, last, block):
                b = min(last, a + block)
                grad = None
                for x, g, module, rule, role in prepared:
                    grad = rule.per_sample_grad(x, g, role, module, param, out=grad,
                                                rows=None if whole else (a, b))
                flat_sum = self.sums[pname].narrow(1, a - first, b - a).view(self.n_groups, -1)
                squares = grad.reshape(stop - start, -1).square_()
                if self._unit and stop - start == 1:
                    # One sample of weight 1: sum + 1·g² is sum + g², rounded once either way, and
                    # add_ is one pass where a k = 1 matrix product is about 25% slower (CPU).
                    flat_sum.add_(squares)
                else:
                    flat_sum.addmm_(weights, squares)

    def _accumulate_sparse_embedding(self, pname, uses):
        """Untied embeddings: per-sample gradients touch only the rows of that sample's tokens."""
        param, (first, last) = self.params[pname], self.rows[pname]
        vocab, width = param.shape
        rows = None if (first, last) == (0, vocab) else (first, last)
        keys, grads = [], []
        for call, rule, _ in uses:
            idx = call.x
            g = call.samples(call.g, self._batch_size, 0, self._batch_size).float()
            sample = torch.arange(idx.shape[0], device=idx.device)[:, None].expand_as(idx)
            keep = kept_tokens(idx, self.hooked[call.module_name][0], rows)
            keys.append((sample * vocab + idx)[keep])
            grads.append(g[keep])
        keys, grads = torch.cat(keys), torch.cat(grads)
        unique, inverse = torch.unique(keys, return_inverse=True)
        # index_put_ with accumulate: much faster than index_add_ on CPU for these shapes.
        per_sample = grads.new_zeros((len(unique), width)).index_put_((inverse,), grads, accumulate=True)
        per_sample.square_()
        sample, token = unique // vocab, unique % vocab - first
        for group in range(self.n_groups):
            w = self._weights[sample, group][:, None]
            self.sums[pname][group].index_put_((token,), per_sample * w, accumulate=True)

    # -- parameters without a hook rule ------------------------------------------------------
    def _accumulate_fallback(self, losses):
        """Exact per-sample gradients from a vmapped backward (one backward per sample, batched)."""
        params = [self.params[n] for n in self.fallback]
        size = len(losses)
        try:
            eye = torch.eye(size, dtype=losses.dtype, device=losses.device)
            grads = torch.autograd.grad(losses, params, grad_outputs=eye, is_grads_batched=True,
                                        retain_graph=True, allow_unused=True)
        except RuntimeError:  # an op without a batching rule: same numbers, one sample at a time
            per = [torch.autograd.grad(losses[n], params, retain_graph=True, allow_unused=True)
                   for n in range(size)]
            grads = [None if per[0][i] is None else torch.stack([p[i] for p in per])
                     for i in range(len(params))]
        for name, grad in zip(self.fallback, grads):
            if grad is not None:
                self.sums[name].view(self.n_groups, -1).addmm_(
                    self._weights.T, grad.reshape(size, -1).float().square())

    # -- results and state -------------------------------------------------------------------
    def all_reduce(self, group=None):
        """Sum running sums and counts over the ranks of ``group``.

        Args:
            group: a torch.distributed process group (None: the default group).  For a sharded
                model: the ranks holding the same rows.
        """
        for tensor in self.sums.values():
            all_reduce_sum(tensor, group)
        device = next(iter(self.sums.values())).device
        self.counts = all_reduce_sum(self.counts.to(device), group).cpu()

    def fisher(self, group=0):
        """The diagonal Fisher of one sample group: running sum / number of samples.

        The sums are divided in place (no second copy), so the accumulator is finished for that
        group.

        Args:
            group: index of the sample group (a column of ``add_batch``'s weights).

        Returns:
            {param name: F}, each shaped like its parameter: this rank's rows (``rows``) of a
            sharded model, whole tensors otherwise.

        Raises:
            UsageError: no samples reached the group.
        """
        count = float(self.counts[group])
        if count <= 0:
            raise UsageError("no samples reached the Fisher estimate; give a larger corpus or fraction")
        if group not in self._divided:
            self._divided.add(group)
            for s in self.sums.values():
                s[group].div_(count)
        return {n: s[group] for n, s in self.sums.items()}

    def state_tensors(self):
        """The running state to checkpoint: {"sum/<param name>": (S, ...) sums, "count": (S,) counts}."""
        state = {f"sum/{n}": s for n, s in self.sums.items()}
        state["count"] = self.counts
        return state

    def load_state_tensors(self, state):
        """Restore the running state from a checkpoint written from ``state_tensors``.

        Args:
            state: {"sum/<param name>": tensor, "count": tensor}, as ``state_tensors`` returns it.

        Raises:
            UsageError: ``state`` lacks a sum of this model's parameters or the counts.
        """
        missing = [n for n in self.sums if f"sum/{n}" not in state]
        if missing or "count" not in state:
            raise UsageError("the checkpoint does not match this model; delete it to start over")
        for n in self.sums:
            self.sums[n].copy_(state[f"sum/{n}"])
        self.counts = state["count"].to(torch.float64).cpu()


def _prepare(call, rule, batch_size, start, stop):
    """Per-sample (x, g) of a call for samples [start, stop), in the model's dtype.

    x is (c, L, d_in), g (c, L, d_out); for an embedding x is the indices (c, L).
    """
    g = call.samples(call.g, batch_size, start, stop)
    if rule.input_is_index:
        return call.x[start:stop], g
    return call.samples(call.x, batch_size, start, stop), g


def _local_shape(param, rows):
    """Shape of this rank's rows [start, stop) of ``param`` (a 0-dim parameter stays 0-dim)."""
    if param.dim() == 0:
        return ()
    return (rows[1] - rows[0], *param.shape[1:])
