"""Driving the Fisher accumulator over the data: progress, checkpoints, interrupts, ranks.

Diagonal empirical Fisher (paper sections 2.1-2.3): F_j = (1/N) Σ_n (∂ℓ_n/∂θ_j)², ℓ_n the mean
target-token cross-entropy of sample (sequence) n, model in eval mode, exact per-sample gradients
(``fisher.accumulator``), one forward and one backward per batch.
"""

import contextlib
import itertools
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import checks, numerics
from ..errors import UsageError
from ..files import atomic_output
from ..identity import MODEL_KEY, SAMPLE_KEY, differences, module_fingerprint, refuse_changed_resume, sample_fingerprint
from ..progress import bar as progress_bar
from ..runtime import all_reduce_sum
from ..sharding import ShardLayout, collective_errors, sharded_like
from .accumulator import FisherAccumulator


def compute_fisher(model: torch.nn.Module, batches: Iterable[Dict[str, torch.Tensor]], *, kind: str,
                   progress: bool = False, total: Optional[int] = None, checkpoint=None,
                   checkpoint_every: float = 60.0, fingerprint: str = "",
                   max_chunk_mb: Optional[float] = None, layout: Optional[ShardLayout] = None,
                   model_fingerprint: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of ``model`` on ``batches``.

    F_j = (1/N) Σ_n (∂ℓ_n/∂θ_j)², ℓ_n the mean target-token cross-entropy of sample n (nats), so
    values are in nats² per (unit of parameter)².

    Args:
        model: a transformers LM or classifier (in eval mode for the passes).
        batches: iterable of dicts that ``model(**batch)`` accepts, each of (B, T) tensors with
            ``labels`` (-100 = ignored); each row is one sample.  Under an initialized
            torch.distributed group, each rank passes its own shard and the result is the Fisher
            of all ranks' samples together.
        kind: the objective (``models.LoadedModel.kind``; 'mlm' | 'causal' | 'seq2seq' |
            'classification').
        progress: a tqdm bar over samples.
        total: the number of samples, for the bar (counted when ``batches`` has a length).
        checkpoint: optional path; running sums are saved there every ``checkpoint_every`` seconds
            and on Ctrl-C, and a later call with the same path and ``fingerprint`` resumes after
            the batches already done (so pass the same batches in the same order).  The caller
            removes the file.  The checkpoint also records the model's and the sample's
            fingerprints (``identity``).
        checkpoint_every: seconds between checkpoint saves (>= 0).
        fingerprint: the settings fingerprint a resumed checkpoint must match.
        max_chunk_mb: memory for per-sample gradients at a time, in MB (None: a default that scales
            with the model, ``fisher.budget.default_chunk_mb``).
        layout: for a model sharded with ``sharding.shard_model``: every rank of a shard group
            passes the same batches (its group's samples); sums are reduced over
            ``layout.point_group``.
        model_fingerprint: the model's (``identity.model_fingerprint`` of its checkpoint); default:
            ``identity.module_fingerprint`` of an unsharded model.

    Returns:
        {param name: float32 tensor shaped like the param} for every parameter with requires_grad;
        a tied parameter appears once under its ``named_parameters()`` name.  For a sharded model
        the values are DTensors sharded like the parameters (``sharding.full_tensor`` gathers one;
        ``save_fisher`` writes them tensor by tensor).

    Raises:
        UsageError: no sample reached the estimate, or a resume whose model or sample changed
            (naming which).
    """
    # NaN would never be due: the sums would silently go unsaved.
    checkpoint_every = checks.non_negative_float(checkpoint_every, "checkpoint_every")
    accumulator = FisherAccumulator(model, 1, kind, max_chunk_mb)
    if checkpoint is not None:
        fingerprint = _with_identity(fingerprint, model, batches, model_fingerprint)
    shard_group = layout.shard_group if layout is not None and layout.sharded else None
    with collective_errors() if shard_group is not None else contextlib.nullcontext():
        _accumulate_all(accumulator, batches, None, progress, total, checkpoint, checkpoint_every, fingerprint,
                        shard_group=shard_group)
    accumulator.all_reduce(layout.point_group if layout is not None else None)
    fisher = accumulator.fisher(0)
    return {n: sharded_like(t, accumulator.params[n]) for n, t in fisher.items()}


def nested_fisher(model: torch.nn.Module, batches: Iterable[Dict[str, torch.Tensor]], sizes: Sequence[int], *,
                  kind: str, progress: bool = False, max_chunk_mb: Optional[float] = None, checkpoint=None,
                  checkpoint_every: float = 60.0, fingerprint: str = "",
                  model_fingerprint: Optional[str] = None) -> List[Dict[str, torch.Tensor]]:
    """Fisher of the first ``sizes[s]`` samples of ``batches``, for every s, in one pass.

    Each sample's squared gradients go into every prefix that contains it; iteration stops after
    the largest prefix.

    Args:
        model: a transformers LM or classifier.
        batches: iterable of batch dicts of (B, T) tensors with ``labels``; each row is a sample.
        sizes: prefix sizes, in samples.
        kind: the objective (``models.LoadedModel.kind``; 'mlm' | 'causal' | 'seq2seq' |
            'classification').
        progress: a tqdm bar over samples.
        max_chunk_mb: memory for per-sample gradients at a time, in MB (None: a default).
        checkpoint: optional path: every prefix's running sums are kept there as ``compute_fisher``
            keeps its one (every ``checkpoint_every`` seconds and on Ctrl-C; a later call with the
            same path, ``fingerprint`` and batches resumes; the caller removes the file).
        checkpoint_every: seconds between checkpoint saves (>= 0).
        fingerprint: the settings fingerprint a resumed checkpoint must match.
        model_fingerprint: the model's (``identity.model_fingerprint``); default: its module's.

    Returns:
        A list of {param name: float32 tensor shaped like the param}, one per size, in the given
        order.
    """
    sizes = [int(s) for s in sizes]
    if not sizes or min(sizes) < 1:
        raise UsageError("every nested sample needs at least one sample")
    limit = torch.tensor(sizes)

    def membership(offset, size):
        index = torch.arange(offset, offset + size)
        return (index[:, None] < limit[None, :]).float()

    checkpoint_every = checks.non_negative_float(checkpoint_every, "checkpoint_every")
    accumulator = FisherAccumulator(model, len(sizes), kind, max_chunk_mb)
    if checkpoint is not None:
        fingerprint = _with_identity(fingerprint, model, batches, model_fingerprint)
    _accumulate_all(accumulator, batches, membership, progress, max(sizes), checkpoint, checkpoint_every,
                    fingerprint, stop_after=max(sizes))
    return [accumulator.fisher(s) for s in range(len(sizes))]


def _with_identity(fingerprint, model, batches, model_fingerprint):
    """The settings fingerprint with the model's and the sample's content fingerprints added.

    The sample's only when ``batches`` is a list: a generator could be read only once.
    """
    if model_fingerprint is None:
        with contextlib.suppress(UsageError):  # a sharded model without a checkpoint's fingerprint
            model_fingerprint = module_fingerprint(model)
    ids = {MODEL_KEY: model_fingerprint or "",
           SAMPLE_KEY: sample_fingerprint(batches) if isinstance(batches, (list, tuple)) else "",
           **numerics.recorded(model)}  # the code numerics: a change since the start is refused
    return {"settings": fingerprint, **ids}


def _batch_rows(batch):
    return int(batch["labels"].shape[0])


def _accumulate_all(accumulator, batches, membership, progress, total, checkpoint, checkpoint_every,
                    fingerprint, stop_after=None, shard_group=None):
    done_batches, offset = 0, 0
    if checkpoint is not None and Path(checkpoint).exists():
        done_batches, offset = _resume(accumulator, checkpoint, fingerprint)
    if total is None and hasattr(batches, "__len__"):
        total = sum(_batch_rows(b) for b in batches)
    if stop_after is not None:
        total = min(total, stop_after) if total is not None else stop_after
    if offset and progress:  # said once, whatever the bar shows: where this run's numbers start
        print(f"resuming from '{checkpoint}': {offset} of {total if total is not None else '?'} samples done",
              file=sys.stderr, flush=True)
    remaining = itertools.islice(iter(batches), done_batches, None)
    last_save = time.monotonic()
    bar = progress_bar(total=total, initial=offset, unit="sample", desc="fisher", enabled=progress)
    in_batch = False
    with bar, _deferred_interrupts(enabled=checkpoint is not None) as stop:
        try:
            for batch in remaining:
                if stop_after is not None and offset >= stop_after:
                    break
                size = _batch_rows(batch)
                in_batch = True
                weights = membership(offset, size) if membership else None
                accumulator.add_batch(batch, weights)
                in_batch = False
                done_batches, offset = done_batches + 1, offset + size
                bar.update(size)
                due = checkpoint is not None and time.monotonic() - last_save >= checkpoint_every
                due, stopping = _agree(due, stop["requested"], shard_group, accumulator.device)
                if due:
                    _save_checkpoint(accumulator, checkpoint, fingerprint, done_batches, offset)
                    last_save = time.monotonic()
                if stopping:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            if checkpoint is not None and not in_batch:
                _save_checkpoint(accumulator, checkpoint, fingerprint, done_batches, offset)
            raise


def _agree(due, stopping, shard_group, device):
    """(save now, stop now), the same on every rank of a shard group.

    The ranks of a sharded model must run the same batches, so one rank's timer or Ctrl-C decides
    for all of them.
    """
    if shard_group is None:
        return due, stopping
    flags = all_reduce_sum(torch.tensor([float(due), float(stopping)], device=device), shard_group)
    return bool(flags[0] > 0), bool(flags[1] > 0)


@contextlib.contextmanager
def _deferred_interrupts(enabled=True):
    """Defer Ctrl-C (or SIGTERM, which torchrun sends) to the next batch boundary while checkpointing.

    So a checkpoint never holds half a batch.  A second Ctrl-C stops at once.
    """
    state = {"requested": False}
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum, frame):
        if state["requested"]:
            raise KeyboardInterrupt
        state["requested"] = True

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield state
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _save_checkpoint(accumulator, path, fingerprint, done_batches, offset):
    tensors = {k: v.detach().cpu().contiguous() for k, v in accumulator.state_tensors().items()}
    ids = fingerprint if isinstance(fingerprint, dict) else {"settings": fingerprint}
    meta = {"fingerprint": ids["settings"], **{k: v for k, v in ids.items() if k != "settings"},
            "batches_done": str(done_batches), "samples_done": str(offset)}
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def _resume(accumulator, path, fingerprint):
    """Load running sums from a checkpoint; returns (batches done, samples done)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        raise UsageError(f"checkpoint '{path}' is unreadable; delete it to start over") from None
    ids = fingerprint if isinstance(fingerprint, dict) else {"settings": fingerprint}
    # The stage's settings are a JSON object inside the "fingerprint" string: compared field by field,
    # so the refusal names the setting (and, for the sample, the setting that drew other tokens).
    then = {**_settings_of(meta.get("fingerprint", "")), **meta}
    now = {**_settings_of(ids["settings"]), **{k: v for k, v in ids.items() if k != "settings"}}
    refuse_changed_resume(path, then, now, "delete it to start over", UsageError)  # names the model or sample
    if meta.get("fingerprint", "") != ids["settings"]:
        found = differences(_settings_of(meta.get("fingerprint", "")), _settings_of(ids["settings"]))
        detail = f" ({found[0]}={then.get(found[0])!r}, this run has {now.get(found[0])!r})" if found else ""
        raise UsageError(f"checkpoint '{path}' was written with other settings{detail}; rerun with the same "
                         "settings to resume, or delete it to start over")
    _check_checkpoint(path, meta, state, accumulator)
    accumulator.load_state_tensors({k: v.to(accumulator.sums[k[4:]].device) if k.startswith("sum/") else v
                                    for k, v in state.items()})
    return int(meta["batches_done"]), int(meta["samples_done"])


def _settings_of(text) -> dict:
    """The settings a checkpoint's "fingerprint" holds, when it is a JSON object (the stage's); else {}."""
    try:
        settings = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return settings if isinstance(settings, dict) else {}


def _check_checkpoint(path, meta, state, accumulator) -> None:
    """Check the checkpoint's schema.

    Integer counts done in its header; running sums of squares and sample counts as float tensors,
    finite, non-negative, each sum shaped as this run's.
    """
    from ..schema import Schema

    schema = Schema("Fisher checkpoint", path, "delete it to start over")
    for key in ("batches_done", "samples_done"):
        text = schema.text(schema.field(meta, key, "header"), f"header.{key}")
        if not text.isdigit():
            schema.fail(f"is damaged: 'header.{key}' is {text[:20]!r}, not a count")
    for key, tensor in state.items():
        schema.tensor(key, tensor, dtypes=(torch.float32, torch.float64), minimum=0.0)
        name = key[4:] if key.startswith("sum/") else None
        if name in accumulator.sums and tuple(tensor.shape) != tuple(accumulator.sums[name].shape):
            schema.fail(f"holds '{key}' of shape {tuple(tensor.shape)}, this run's is "
                        f"{tuple(accumulator.sums[name].shape)}")
