"""Critical sharpness as a stage: ``run_critical_sharpness`` writes λ_c = 2/η_c of a model as a JSON report.

η_c is the smallest step along an update direction d at which the loss rises back above its value
at the origin (Kalra et al., arXiv 2601.16979; ``curvature.critical`` has the line search).  The
update d is the gradient step −∇L of ``update_corpus`` (default: the loss's own corpus), the sign
step −sign ∇L (Adam's first step), or a direction file as written.  The loss along the line is the
one surfaces report, evaluated by the surfaces' own evaluator (``surface.evaluate_points``), so
``surface --directions`` along the ``vectors`` file this writes draws the line the search walked.
With another ``update_corpus`` the number is the relative critical sharpness λ_c^{corpus→update}:
how far the update of one loss can go before the other one climbs.

Only forward passes walk the line (at most ``curvature.critical.MAX_PASSES``, the origin's
included), beside the gradient's one forward and backward over the update sample; ``rayleigh``
adds dᵀHd/dᵀd from one Hessian-vector product (``curvature.HessianOperator``).

This module sits above ``surface`` and ``curvature`` (as ``direction_kinds`` does), the one place
that combines the surfaces' evaluator with the Hessian operator.
"""

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import adapters
from .critical_shards import group_sum, sharded_gradient, write_direction, zeros_like_local
from .curvature.critical import LineSearch, critical_step
from .direction_file import check_existing_directions
from .errors import SettingsMismatch, UsageError
from .files import (
    PathLike,
    atomic_output,
    check_distinct_paths,
    check_output_path,
    json_text,
    replace_together,
    staged_path,
)
from .identity import MODEL_KEY, SAMPLE_KEY, check_file_model, model_fingerprint, refuse_changed, sample_fingerprint
from .inputs import sample_batches, stage_model, stage_runtime
from .models import LoadedModel, model_id
from .outputs import claim_output
from .results import StageResult
from .settings import CRITICAL_DIRECTIONS, CriticalSharpnessSettings
from .sharding import is_sharded_model

FORMAT = "landscape-critical-sharpness/1"
UPDATE_KEY = "update_sample_fingerprint"
H5_SUFFIXES = (".h5", ".hdf5")
# The first step tried: where the update loss's linear model has fallen by this share of the loss.
START_DECREASE = 0.1
Direction = Dict[str, torch.Tensor]
Log = Optional[Callable[[str], None]]


@dataclass
class CriticalSharpnessResult(StageResult):
    """What ``run_critical_sharpness`` wrote.

    ``StageResult``'s ``computed``: 1 when this call ran the search, 0 when the report was already
    complete with these settings; ``total``: 1.  ``vectors``: the update direction's file, or None;
    ``report``: the report as a dict (``critical_lr``, ``critical_sharpness``, ... ; docs/curvature.md).
    """

    vectors: Optional[Path]
    report: dict


# ----------------------------------------------------------------------------- the pieces
def loss_gradient(model: torch.nn.Module, batches: List[dict], kind: str,
                  names: Optional[List[str]] = None) -> Tuple[Direction, float]:
    """∇L and L of the token-weighted mean loss over ``batches`` (the loss surfaces report).

    One forward and backward per batch, in eval mode as the model is; the sums are float32 on the
    model's device.  Parameters left out (without ``requires_grad``, or not in ``names``) get a
    zero gradient that holds no memory (an expanded scalar).  A sharded (FSDP2) model's gradient
    comes from its own backward, as this rank's rows of each tensor (``critical_shards``): every
    rank of its group calls this with the same batches.

    Args:
        model: the model, in eval mode.
        batches: batch dicts with ``labels``, on the model's device.
        kind: the objective (``models.LoadedModel.kind``).
        names: the parameters to differentiate (None: every one with ``requires_grad``).

    Returns:
        ({name: gradient (this rank's rows when sharded), for every parameter of ``named_parameters()``},
        L in nats per target token).

    Raises:
        UsageError: no parameter requires grad, or the sample has no target tokens.
    """
    named = list(model.named_parameters())
    trainable = [(name, p) for name, p in named if p.requires_grad and (names is None or name in names)]
    if not trainable:
        raise UsageError("no parameter of the model requires grad: there is no gradient to step along")
    whole = _whole_gradient if not is_sharded_model(model) else sharded_gradient
    sums, total, tokens = whole(model, batches, kind, trainable)
    if tokens == 0:
        raise UsageError("the update sample has no target tokens")
    gradient = {name: acc.div_(tokens) for (name, _), acc in zip(trainable, sums)}
    return {name: gradient.get(name, zeros_like_local(p)) for name, p in named}, total / tokens


def _whole_gradient(model, batches, kind, trainable):
    """(float32 sums of ∇(loss sum) per trainable parameter, loss sum, target tokens) of an unsharded model."""
    from .data.objectives import sequence_losses

    sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for _, p in trainable]
    total, tokens = 0.0, 0.0
    with torch.enable_grad():
        for batch in batches:
            losses = sequence_losses(model, batch, kind)
            loss = losses.loss_sum.sum()
            grads = torch.autograd.grad(loss, [p for _, p in trainable], allow_unused=True)
            for acc, grad in zip(sums, grads):
                if grad is not None:
                    acc.add_(grad.float())
            total += float(loss.detach().double())
            tokens += float(losses.n_tokens.sum())
    return sums, total, tokens


def step_direction(gradient: Direction, how: str, model: Optional[torch.nn.Module] = None) -> Tuple[Direction, float]:
    """(d, dL/dη along d at the origin) for the update ``how`` ('gradient': −g, 'sign': −sign g).

    ``model``: the model of a gradient held as local rows (sharded), whose slope is summed over
    its shard group (a collective); None: ``gradient`` is whole.
    """
    if how == "gradient":
        direction = {name: -g for name, g in gradient.items()}
        slope = -sum(float(g.double().square().sum()) for g in gradient.values())
    elif how == "sign":
        direction = {name: -torch.sign(g) for name, g in gradient.items()}
        slope = -sum(float(g.double().abs().sum()) for g in gradient.values())
    else:
        raise UsageError(f"the update must be one of {', '.join(CRITICAL_DIRECTIONS)}, got {how!r}")
    slope = slope if model is None else group_sum(slope, model)
    if slope == 0:
        raise UsageError("the gradient of the update sample is zero: there is no update to step along")
    return direction, slope


def line_loss(loaded: LoadedModel, direction: Direction, batches: List[dict]) -> Callable[[float], float]:
    """η -> L(θ + η·d) on ``batches``, by the surfaces' evaluator (one forward pass over the sample each)."""
    from .surface import evaluate_points

    def loss_at(eta: float) -> float:
        losses, _ = evaluate_points(loaded.model, [direction], batches, [(float(eta),)], kind=loaded.kind)
        return float(losses[0])

    return loss_at


def moved_parameters(loaded: LoadedModel) -> Optional[List[str]]:
    """What a gradient step moves: a PEFT adapter's own parameters (as fine-tuning it would), else None (all)."""
    return adapters.adapter_parameter_names(loaded.model) if loaded.adapter else None


def rayleigh_quotient(loaded: LoadedModel, direction: Direction, batches: List[dict], hvp: str = "exact") -> float:
    """dᵀHd/dᵀd of the loss over ``batches`` from one Hessian-vector product (``curvature.HessianOperator``).

    On a PEFT adapter the Hessian is the adapter's own block (``moved_parameters``).  ``hvp``: how the
    product is formed, "exact" or "difference" (``curvature.HessianOperator``).  On a sharded model
    (FSDP2) d is this rank's rows of each tensor, as ``loss_gradient`` gives it: the operator takes
    them as its local pieces, and both sums are added over the shard group (every rank of the group
    calls this); the sharded product is the gradient-only one, of a float32 model
    (``settings.refuse_unshardable_hessian``).

    Raises:
        UsageError: d moves parameters outside the Hessian's coordinates, or a sharded product the
            sharded model cannot give.
    """
    from .curvature import HessianOperator

    names = moved_parameters(loaded)
    mask = None if names is None else adapters.adapter_mask(loaded.model, names)
    hessian = HessianOperator(loaded.model, batches, mask, loaded.kind, cache_bytes=0, hvp=hvp)
    v = hessian.from_local_rows(direction).double()
    whole = group_sum(sum(float(t.double().square().sum()) for t in direction.values()), loaded.model)
    inside = group_sum(float(v.square().sum()), loaded.model)
    if not math.isclose(whole, inside, rel_tol=1e-6):
        raise UsageError("the direction moves parameters outside the Hessian's coordinates (those that do not "
                         "require grad, or a PEFT adapter's base): its Rayleigh quotient would leave them out")
    return group_sum(float(v @ (hessian @ v.float()).double()), loaded.model) / inside


# ----------------------------------------------------------------------------- the stage
def run_critical_sharpness(settings: Optional[CriticalSharpnessSettings] = None, *, out: PathLike,
                           model: Optional[LoadedModel] = None, overwrite: bool = False,
                           vectors: Optional[PathLike] = None, progress: bool = False,
                           log: Log = None) -> CriticalSharpnessResult:
    """Critical sharpness λ_c = 2/η_c of the sample's loss along an update direction, as a JSON report.

    Under torchrun with ``settings.model.shard_size`` K > 1 the model is sharded with FSDP2 over
    groups of K ranks (``critical_shards``: the gradient from its backward, the direction as local
    rows, the line's forward passes by the surfaces' sharded evaluator, ``rayleigh``'s product by the
    sharded Hessian operator) and rank 0 writes; every rank returns the same result.

    Args:
        settings: the model, the loss's sample, the update (``direction``, ``update_corpus``), the
            tolerance of η_c and ``rayleigh`` (None: ``CriticalSharpnessSettings()``).
        out: the report (.json) to write; rerunning with the same settings reads it back.
        model: a ``models.LoadedModel`` already in memory (None: load ``settings.model``).
        overwrite: replace outputs made with other settings (or holding something else).
        vectors: also write the update direction d, as walked (no normalization), to this direction
            file (.h5): ``surface --directions`` along it draws the line.
        progress: unused (a search is at most a few forward passes); kept for the stage shape.
        log: called with one line per stage of the run (None: silent).

    Returns:
        A ``CriticalSharpnessResult``.

    Raises:
        UsageError: a direction along which the loss rises at once (refused, never flipped), a
            direction file of another model, ``rayleigh`` on a sharded model with the exact product
            or not in float32, or outputs that may not be written (``OutputRefused``, ``OutputBusy``,
            ``SettingsMismatch``).
    """
    settings = settings or CriticalSharpnessSettings()
    out = check_output_path(out, "out", [".json"])
    vectors = check_output_path(vectors, "vectors", H5_SUFFIXES) if vectors is not None else None
    file = None if settings.direction in CRITICAL_DIRECTIONS else settings.direction
    check_distinct_paths({"out": out, "vectors": vectors},
                         {"corpus": settings.sample.corpus, "update_corpus": settings.update_corpus, "direction": file,
                          "model": settings.model.source})
    with claim_output(out, "critical-sharpness", overwrite=overwrite), stage_runtime(settings.model), \
            (claim_output(vectors, "directions", overwrite=overwrite) if vectors else contextlib.nullcontext()):
        return _run(settings, out, vectors, model, overwrite, log or (lambda line: None))


def _run(s: CriticalSharpnessSettings, out, vectors, model, overwrite, log) -> CriticalSharpnessResult:
    loaded, batches, update, file_direction, recorded = prepare(s, model)
    result = dict(path=out, settings=s, total=1, vectors=vectors,
                  fingerprints={MODEL_KEY: recorded[MODEL_KEY], SAMPLE_KEY: recorded[SAMPLE_KEY]})
    vector_settings = dict(recorded, source="landscape critical-sharpness", dims=1, norm="none", kind="update")
    done = None if overwrite else _finished(out, recorded, vectors)
    if done is not None:
        return CriticalSharpnessResult(computed=0, report=done, **result)
    if vectors is not None and not overwrite:
        check_existing_directions(vectors, _scalars(vector_settings))
    report, direction = measure(s, loaded, batches, update, file_direction, recorded, log)
    _write(out, vectors, report, direction, vector_settings, loaded.model)
    return CriticalSharpnessResult(computed=1, report=report, **result)


def prepare(s: CriticalSharpnessSettings, model: Optional[LoadedModel] = None, layout=None):
    """(loaded model, the loss's batches, the update's batches, a direction file's direction or None, recorded).

    ``recorded``: what fixes the numbers, as the report stores it (``_recorded``).  Under torchrun
    the model is sharded over ``layout`` (None: ``sharding.shard_layout`` of ``s.model.shard_size``).
    """
    from .runtime import join_torchrun
    from .sharding import shard_layout

    device, _, _ = join_torchrun(s.model.device)
    layout = layout or shard_layout(s.model.shard_size)
    loaded = stage_model(s.model, model, layout, device, corpora=[s.sample.corpus, s.update_corpus])
    batches = sample_batches(loaded, s.sample)
    relative = s.update_corpus is not None
    update = sample_batches(loaded, s.sample, corpus=s.update_corpus) if relative else batches
    file_direction, attrs = _file_direction(loaded, s.direction, s.model.source)
    recorded = _recorded(s, loaded, batches, update if relative and file_direction is None else None, attrs)
    return loaded, batches, update, file_direction, recorded


def measure(s: CriticalSharpnessSettings, loaded, batches, update, file_direction, recorded, log: Log,
            own: bool = False) -> Tuple[dict, Direction]:
    """(the report, the direction d walked): the line search (and the Rayleigh quotient) of one model.

    ``own``: with another update corpus, also the critical sharpness of the update's own loss along
    d (the report's ``update``), from the same gradient.
    """
    relative = s.update_corpus is not None
    if file_direction is None:
        log("gradient of the update sample" if relative else "gradient of the sample")
        gradient, update_loss = loss_gradient(loaded.model, update, loaded.kind, moved_parameters(loaded))
        direction, update_slope = step_direction(gradient, s.direction, loaded.model)
        del gradient
        start = START_DECREASE * max(abs(update_loss), 1e-12) / abs(update_slope)
        slope = None if relative else update_slope  # the loss's own slope is known only along its own gradient
    else:
        direction, start, slope = file_direction, 1.0, None
    log("line search")
    search = critical_step(line_loss(loaded, direction, batches), start=start, tolerance=s.tolerance, slope=slope)
    report = _report(s, search, recorded, relative, None if file_direction is None else s.direction)
    if own and relative and file_direction is None:
        log("line search of the update's own loss")
        mine = critical_step(line_loss(loaded, direction, update), start=start, tolerance=s.tolerance,
                             slope=update_slope)
        report["update"] = {"critical_lr": mine.critical_lr, "critical_sharpness": mine.critical_sharpness,
                            "loss_at_origin": mine.loss_at_origin, "forward_passes": mine.forward_passes,
                            "converged": mine.converged}
    if s.rayleigh:
        log("Rayleigh quotient")
        report["rayleigh_quotient"] = rayleigh_quotient(loaded, direction, batches, s.hvp)
        report["hessian_vector_products"] = 1
    return report, direction


def _file_direction(loaded, direction: str, source) -> Tuple[Optional[Direction], dict]:
    """(the first direction of a direction file as the surfaces hold it, its attributes), or (None, {})."""
    if direction in CRITICAL_DIRECTIONS:
        return None, {}
    from .surface.run import load_directions_for

    directions, attrs, _ = load_directions_for(loaded.model, direction, axes=1)
    check_file_model(direction, "direction file", attrs.get(MODEL_KEY), model_fingerprint(loaded), source)
    return directions[0], attrs


def _recorded(s: CriticalSharpnessSettings, loaded, batches, update, attrs) -> dict:
    """What fixes the report's numbers, with the files' spellings: a rerun must match it to read it back."""
    from .data.corpus import describe_framing

    recorded = dict(s.identity(), model=model_id(loaded), framing=describe_framing(loaded.tokenizer, s.sample.bos),
                    kind=loaded.kind, **adapters.record(loaded))
    recorded.update({MODEL_KEY: model_fingerprint(loaded), SAMPLE_KEY: sample_fingerprint(batches)})
    recorded["corpus"] = str(s.sample.corpus or "embedded")
    if s.hvp != "exact":  # only then: reports written before the option keep resuming
        recorded["hvp"] = s.hvp
    if update is not None:
        recorded[UPDATE_KEY] = sample_fingerprint(update)
    if attrs:
        recorded["direction"] = str(Path(s.direction).resolve())
        recorded["direction_fingerprint"] = str(attrs.get("fingerprint", ""))
    return json_ready(recorded)


def json_ready(values: dict) -> dict:
    """``values`` as JSON gives them back (tuples as lists), so that a rerun compares equal."""
    import json

    return json.loads(json_text(values))


def _describe(s: CriticalSharpnessSettings, relative: bool, file) -> str:
    if file is not None:
        return f"the first direction of '{file}', as written"
    step = "-grad L" if s.direction == "gradient" else "-sign(grad L)"
    of = f"of the update corpus '{s.update_corpus}'" if relative else "of the loss's own sample"
    return f"{step} {of}"


def _moves(recorded: dict, file) -> str:
    """What d moves: a file's direction as written, a PEFT adapter's own parameters, or all of them."""
    if file is not None:
        return "as given"
    return "adapter" if recorded.get("adapter") else "all"


def _report(s, search: LineSearch, recorded: dict, relative: bool, file) -> dict:
    return {"format": FORMAT, "critical_lr": search.critical_lr, "critical_sharpness": search.critical_sharpness,
            "loss_at_origin": search.loss_at_origin, "forward_passes": search.forward_passes,
            "tolerance": s.tolerance, "converged": search.converged, "bracket": [search.lower, search.upper],
            "reached": search.reached, "steps": [list(step) for step in search.steps],
            "direction": {"kind": "file" if file is not None else s.direction, "relative": relative,
                          "description": _describe(s, relative, file),
                          "moves": _moves(recorded, file)},
            MODEL_KEY: recorded[MODEL_KEY], SAMPLE_KEY: recorded[SAMPLE_KEY], "settings": recorded}


def _scalars(values: dict) -> dict:
    """The entries a direction file's attributes can hold (text, numbers, booleans)."""
    return {k: v for k, v in values.items() if isinstance(v, (str, int, float, bool))}


def _write(out, vectors, report, direction, vector_settings, model) -> None:
    """The report and its direction file, written aside and moved into place together (by rank 0)."""
    from .runtime import rank_and_world

    staged = []
    if vectors is not None:  # every rank: a sharded direction is gathered for rank 0, tensor by tensor
        report["vectors"] = {"path": str(vectors), "fingerprint": write_direction(
            staged_path(vectors), model, direction, _scalars(vector_settings))}
        staged.append((staged_path(vectors), vectors))
    if rank_and_world()[0] != 0:
        return
    with atomic_output(staged_path(out)) as tmp:
        Path(tmp).write_text(json_text(report, indent=1) + "\n")
    replace_together([*staged, (staged_path(out), out)])


def load_critical_report(path: PathLike) -> dict:
    """A report written by ``run_critical_sharpness`` (UsageError if it is not one)."""
    import json

    from .files import require_readable_file

    path = require_readable_file(path, "critical-sharpness report")
    try:
        report = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, ValueError):
        report = None
    if not isinstance(report, dict) or report.get("format") != FORMAT:
        raise UsageError(f"'{path}' is not a critical-sharpness report; make one with `landscape critical-sharpness`")
    return report


def _finished(out: Path, recorded: dict, vectors) -> Optional[dict]:
    """The report at ``out`` when it is complete with these settings (and its vectors still there); else None.

    Raises:
        SettingsMismatch: ``out`` holds a report made with other settings.
    """
    if not out.exists():
        return None
    try:
        old = load_critical_report(out)
    except UsageError:
        raise SettingsMismatch(f"'{out}' exists but is not a critical-sharpness report") from None
    # A changed sample is named with the setting that changed its tokens (a sequence length, a seed).
    refuse_changed(out, old.get("settings", {}), recorded, holds="a critical-sharpness report")
    if vectors is not None and (old.get("vectors") or {}).get("fingerprint") != _fingerprint_of(vectors):
        return None
    return old


def _fingerprint_of(path) -> Optional[str]:
    """The fingerprint a direction file records, or None (no file, or not a direction file)."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            value = handle.attrs.get("fingerprint")
    except OSError:
        return None
    return value.decode() if isinstance(value, bytes) else (None if value is None else str(value))
