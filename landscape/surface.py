"""Loss surfaces: the loss of a model perturbed along 1 or 2 directions, on a grid.

``evaluate`` perturbs the weights in place from a kept copy of the base weights (no reloads) and
restores them bit-identically at the end.  ``compute_surface_file`` writes a resumable HDF5 file
(contract: ``xcoordinates``, ``ycoordinates`` (2D), ``train_loss``, ``train_acc``; 1D ``(nx,)``,
2D ``(ny, nx)`` with ``train_loss[iy, ix]`` = loss at ``(x[ix], y[iy])``; NaN = not computed yet).

Crash safety: every finished point is appended to a journal (``S.h5.journal``) at once, and the
HDF5 file is rewritten to a temporary file and atomically renamed into place every few seconds.
A SIGKILL therefore loses only the points being computed; rerunning replays the journal.
Under ``torchrun`` grid points are sharded over ranks and rank 0 alone writes the files.
"""

import contextlib
import fcntl
import hashlib
import json
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from .directions import load_directions
from .errors import UsageError
from .io import atomic_output
from .models import model_kind
from .objectives import sequence_losses

FORMAT = "landscape-surface"
JOURNAL_MAGIC = "landscape-surface-journal"


# ----------------------------------------------------------------------------- grids
def parse_range(text, flag="--x"):
    """'MIN:MAX:NUM' -> float64 array of NUM evenly spaced values from MIN to MAX (inclusive)."""
    parts = str(text).split(":")
    try:
        low, high, num = float(parts[0]), float(parts[1]), int(parts[2])
        if len(parts) != 3:
            raise ValueError
    except (ValueError, IndexError):
        raise UsageError(f"{flag} '{text}' is not MIN:MAX:NUM (e.g. -1:1:21)") from None
    if num < 2:
        raise UsageError(f"{flag} '{text}' is empty: NUM must be at least 2")
    if not np.isfinite([low, high]).all() or low >= high:
        raise UsageError(f"{flag} '{text}' is inverted or empty: MIN must be smaller than MAX")
    return np.linspace(low, high, num)


def grid_points(xs, ys=None):
    """Row-major list of coefficient tuples: (x,) for 1D, (x, y) with x fastest for 2D."""
    if ys is None:
        return [(float(x),) for x in xs]
    return [(float(x), float(y)) for y in ys for x in xs]


# ----------------------------------------------------------------------------- evaluation
class InPlacePerturbation:
    """Sets a model's weights to base + Σ c_i·d_i in place; ``restore`` puts the base back bit for bit.

    Only tensors on which some direction is non-zero are touched or copied.  Directions are kept
    in float32 on the parameter's device; the sum is formed in float32 and cast to the model dtype.
    """

    def __init__(self, model, directions):
        self.entries = []
        for name, param in model.named_parameters():
            parts = [d[name] for d in directions]
            if not any(bool(t.any()) for t in parts):
                continue
            base = param.detach().clone()
            base32 = base if base.dtype == torch.float32 else base.float()
            parts = [t.to(device=param.device, dtype=torch.float32) for t in parts]
            self.entries.append((name, param, base, base32, parts))

    @torch.no_grad()
    def set(self, coeffs):
        for _, param, _, base32, parts in self.entries:
            target = param.data if param.dtype == torch.float32 else torch.empty_like(base32)
            torch.add(base32, parts[0], alpha=float(coeffs[0]), out=target)
            for coeff, part in zip(coeffs[1:], parts[1:]):
                target.add_(part, alpha=float(coeff))
            if target is not param.data:
                param.data.copy_(target)

    @torch.no_grad()
    def restore(self):
        for _, param, base, _, _ in self.entries:
            param.data.copy_(base)

    def stacked(self, points):
        """{name: (P, *shape) float32} parameter sets for a list of coefficient tuples."""
        coeffs = torch.tensor(points, dtype=torch.float32)
        out = {}
        for name, param, _, base32, parts in self.entries:
            c = coeffs.to(param.device)
            total = base32.unsqueeze(0).expand((len(points),) + tuple(base32.shape)).clone()
            for i, part in enumerate(parts):
                total += c[:, i].reshape((-1,) + (1,) * part.dim()) * part.unsqueeze(0)
            out[name] = total.to(param.dtype)
        return out


def _check_directions(model, directions):
    if not 1 <= len(directions) <= 2:
        raise UsageError(f"a surface needs 1 or 2 directions, got {len(directions)}")
    names = {n for n, _ in model.named_parameters()}
    for direction in directions:
        missing = sorted(names - set(direction))
        if missing:
            raise UsageError(f"the direction has no tensor '{missing[0]}'; was it made for this model?")


def loss_and_accuracy(model, batches, kind=None):
    """Token-weighted mean target cross-entropy (nats) and token accuracy over all batches."""
    kind = kind or model_kind(model)
    totals = 0.0
    with torch.inference_mode():
        for batch in batches:
            s = sequence_losses(model, batch, kind)
            # Summed on the device: one host transfer per point, not one per batch.
            totals = totals + torch.stack([s.loss_sum.sum(), s.n_tokens.sum(), s.n_correct.sum()]).double()
    loss, tokens, correct = (float(t) for t in totals.cpu()) if torch.is_tensor(totals) else (0.0,) * 3
    if tokens == 0:
        raise UsageError("the evaluation sample has no target tokens")
    return loss / tokens, correct / tokens


class _LossModule(torch.nn.Module):
    """model -> (loss sum, token count, correct count) over a list of batches, for functional_call."""

    def __init__(self, model, batches, kind):
        super().__init__()
        self.model, self.batches, self.kind = model, batches, kind

    def forward(self):
        sums = []
        for batch in self.batches:
            s = sequence_losses(self.model, batch, self.kind)
            sums.append(torch.stack([s.loss_sum.sum().float(), s.n_tokens.sum().float(),
                                     s.n_correct.sum().float()]))
        return torch.stack(sums).sum(0)


def _evaluate_stacked(model, perturbation, batches, points, kind):
    """Several points in one vmapped pass (torch.func): returns [(loss, acc)] per point."""
    from torch.func import functional_call, vmap

    wrapper = _LossModule(model, batches, kind)
    stacked = {"model." + n: t for n, t in perturbation.stacked(points).items()}

    def one(params):
        return functional_call(wrapper, params, (), tie_weights=True, strict=False)

    with torch.inference_mode():
        totals = vmap(one)(stacked).double().cpu()  # (P, 3)
    return [(float(t[0] / t[1]), float(t[2] / t[1])) for t in totals]


def _points_pass(model, perturbation, batches, chunk, kind):
    """[(loss, acc)] for a chunk of points: one in-place pass per point, or one vmapped pass."""
    if len(chunk) == 1:
        perturbation.set(chunk[0])
        return [loss_and_accuracy(model, batches, kind)]
    return _evaluate_stacked(model, perturbation, batches, chunk, kind)


def evaluate_points(model, directions, batches, points, kind=None, points_per_pass=1,
                    progress=False, on_result=None):
    """Loss and accuracy at each coefficient tuple in ``points``; weights restored afterwards.

    directions: list of 1 or 2 {name: tensor}; points: list of (x,) or (x, y) tuples.
    points_per_pass > 1 evaluates that many points per vmapped pass (torch.func; for GPUs).
    on_result(i, loss, acc) is called as each point finishes.  Returns two float64 arrays (P,).
    """
    _check_directions(model, directions)
    kind = kind or model_kind(model)
    losses = np.full(len(points), np.nan)
    accs = np.full(len(points), np.nan)
    perturbation = InPlacePerturbation(model, directions)
    bar = tqdm(total=len(points), desc="surface", unit="pt", disable=not progress, leave=False)
    step = max(1, int(points_per_pass))
    try:
        for start in range(0, len(points), step):
            chunk = points[start: start + step]
            for offset, (loss, acc) in enumerate(_points_pass(model, perturbation, batches, chunk, kind)):
                losses[start + offset], accs[start + offset] = loss, acc
                if on_result is not None:
                    on_result(start + offset, loss, acc)
            bar.update(len(chunk))
    finally:
        perturbation.restore()
        bar.close()
    return losses, accs


def evaluate(model, directions, batches, xs, ys=None, kind=None, points_per_pass=1, progress=False,
             return_accuracy=False):
    """Loss surface of ``model`` along ``directions`` on a grid; the weights are unchanged after.

    directions: [dx] with ys=None (1D) or [dx, dy] (2D); batches: list of batch dicts on the
    model's device (with labels).  Returns numpy float64 (len(xs),) or (len(ys), len(xs)) with
    Z[iy, ix] = token-weighted mean cross-entropy at base + xs[ix]·dx + ys[iy]·dy; with
    return_accuracy, (Z, accuracy) of the same shape.
    """
    if (ys is None) != (len(directions) == 1):
        raise UsageError("give one direction with xs only, or two directions with xs and ys")
    shape = (len(xs),) if ys is None else (len(ys), len(xs))
    losses, accs = evaluate_points(model, directions, batches, grid_points(xs, ys), kind,
                                   points_per_pass, progress)
    if return_accuracy:
        return losses.reshape(shape), accs.reshape(shape)
    return losses.reshape(shape)


def sample_fingerprint(batches):
    """Short hash of the evaluation sample (inputs and targets), so a resumed file uses the same."""
    digest = hashlib.sha1()
    for batch in batches:
        for key in sorted(batch):
            digest.update(key.encode())
            digest.update(batch[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- distribution
def _dist():
    """(rank, world size) of the torch.distributed group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _broadcast(value):
    rank, world = _dist()
    if world == 1:
        return value
    box = [value if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _gather(values):
    rank, world = _dist()
    if world == 1:
        return [values]
    out = [None] * world
    torch.distributed.all_gather_object(out, values)
    return out


# ----------------------------------------------------------------------------- files
def journal_path(path):
    return Path(str(path) + ".journal")


def _canonical(identity):
    return json.loads(json.dumps(identity, sort_keys=True, default=str))


def _first_difference(old, new):
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return key, old.get(key), new.get(key)
    return None


def _refuse(path, old, new):
    key, before, now = _first_difference(old, new)
    if key == "grid":
        detail = "a different --x/--y grid"
    else:
        detail = f"{key}={before!r}, this run has {key}={now!r}"
    raise UsageError(f"'{path}' was computed with other settings ({detail}); rerun with --overwrite to "
                     "replace it, or choose another --out")


def _read_surface_state(path, identity, shape):
    """Loss/acc arrays from an existing surface file with the same settings (else UsageError)."""
    try:
        handle = h5py.File(path, "r")
    except OSError:
        raise UsageError(f"'{path}' exists but is not an HDF5 surface file; use --overwrite to replace it") from None
    with handle:
        stored = handle.attrs.get("identity")
        if stored is None or "train_loss" not in handle:
            raise UsageError(f"'{path}' exists but is not a landscape surface file; use --overwrite to replace it")
        old = json.loads(stored if isinstance(stored, str) else stored.decode())
        if old != identity:
            _refuse(path, old, identity)
        loss, acc = np.asarray(handle["train_loss"][()]), np.asarray(handle["train_acc"][()])
    if loss.shape != shape:
        raise UsageError(f"'{path}' has a {loss.shape} grid, this run {shape}; use --overwrite or another --out")
    return loss.astype(np.float64), acc.astype(np.float64)


def _replay_journal(path, identity, loss, acc):
    """Apply a journal's records to the flat loss/acc arrays; returns whether a header was found."""
    lines = journal_path(path).read_text().split("\n")
    header = lines[0]
    if not header.startswith(JOURNAL_MAGIC + " "):
        return False
    try:
        old = json.loads(header[len(JOURNAL_MAGIC) + 1:])
    except json.JSONDecodeError:
        return False
    if old != identity:
        _refuse(path, old, identity)
    # The last line may be cut short by a kill; a record is used only when it is complete.
    for line in lines[1:-1]:
        fields = line.split(" ")
        try:
            index, point_loss, point_acc = int(fields[0]), float.fromhex(fields[1]), float.fromhex(fields[2])
        except (ValueError, IndexError):
            continue
        if 0 <= index < loss.size and len(fields) == 3:
            loss[index], acc[index] = point_loss, point_acc
    return True


def _clean_partials(path):
    for stale in path.parent.glob(f".{path.name}.partial-*"):
        with contextlib.suppress(OSError):
            stale.unlink()


def _scalar_attrs(identity):
    return {k: ("" if v is None else v) for k, v in identity.items() if isinstance(v, (str, int, float, bool))
            or v is None}


def write_surface(path, xs, ys, loss, acc, attrs):
    """Write a surface file atomically (contract layout); attrs: scalars and strings."""
    with atomic_output(path) as tmp:
        with h5py.File(tmp, "w") as handle:
            handle.create_dataset("xcoordinates", data=np.asarray(xs, dtype=np.float64))
            if ys is not None:
                handle.create_dataset("ycoordinates", data=np.asarray(ys, dtype=np.float64))
            handle.create_dataset("train_loss", data=loss)
            handle.create_dataset("train_acc", data=acc)
            for key, value in attrs.items():
                handle.attrs[key] = value


def load_surface(path):
    """Read a surface file: dict with xcoordinates, ycoordinates (2D only), train_loss, train_acc,
    and 'attrs' (settings)."""
    with h5py.File(path, "r") as handle:
        out = {k: np.asarray(handle[k][()]) for k in ("xcoordinates", "ycoordinates", "train_loss", "train_acc")
               if k in handle}
        out["attrs"] = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in handle.attrs.items()}
    return out


class _SurfaceWriter:
    """Rank 0's side of a resumable surface file: journal per point, atomic HDF5 every few seconds."""

    def __init__(self, path, xs, ys, identity, attrs, overwrite, flush_seconds):
        self.path, self.xs, self.ys = Path(path), xs, ys
        self.identity, self.attrs, self.flush_seconds = identity, attrs, flush_seconds
        self.shape = (len(xs),) if ys is None else (len(ys), len(xs))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.journal = open(journal_path(self.path), "a+")
        try:
            fcntl.flock(self.journal.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.journal.close()
            raise UsageError(f"another run is writing '{self.path}' right now; wait for it or choose another --out")
        try:
            self._load(overwrite)
        except BaseException:
            created = self.journal.tell() == 0
            self.journal.close()
            if created:  # leave nothing behind for a refused run
                journal_path(self.path).unlink(missing_ok=True)
            raise
        self.last_flush = time.monotonic()

    def _load(self, overwrite):
        _clean_partials(self.path)
        if overwrite:
            self.path.unlink(missing_ok=True)
            self.journal.truncate(0)
        self.loss = np.full(self.shape, np.nan)
        self.acc = np.full(self.shape, np.nan)
        if self.path.exists():
            self.loss, self.acc = _read_surface_state(self.path, self.identity, self.shape)
        has_header = _replay_journal(self.path, self.identity, self.loss.reshape(-1), self.acc.reshape(-1))
        if not has_header:
            self.journal.truncate(0)
            self.journal.write(f"{JOURNAL_MAGIC} {json.dumps(self.identity, sort_keys=True)}\n")
            self.journal.flush()

    def missing(self):
        """Flat (row-major) indices of points not computed yet."""
        return np.flatnonzero(np.isnan(self.loss.reshape(-1))).tolist()

    def record(self, results):
        """results: (flat index, loss, acc) triples; journaled at once, HDF5 rewritten by time."""
        lines = "".join(f"{i} {float(l).hex()} {float(a).hex()}\n" for i, l, a in results)
        self.journal.write(lines)
        self.journal.flush()  # in the OS page cache: survives a SIGKILL of this process
        for i, l, a in results:
            self.loss.reshape(-1)[i], self.acc.reshape(-1)[i] = l, a
        if time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self):
        attrs = dict(self.attrs, points_done=int((~np.isnan(self.loss)).sum()), points_total=int(self.loss.size))
        write_surface(self.path, self.xs, self.ys, self.loss, self.acc, attrs)
        self.last_flush = time.monotonic()

    def close(self, complete):
        self.flush()
        if complete:
            journal_path(self.path).unlink(missing_ok=True)
        self.journal.close()


def surface_identity(directions_attrs, batches, model, xs, ys, settings=None):
    """Everything that changes the numbers of a surface; a resumed file must match it exactly."""
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    n_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
    identity = {
        "format": FORMAT,
        "dir_fingerprint": str(directions_attrs.get("fingerprint", "")),
        "sample_fingerprint": sample_fingerprint(batches),
        "n_samples": int(sum(b["labels"].shape[0] for b in batches)),
        "n_target_tokens": n_tokens,
        "kind": model_kind(model),
        "dtype": dtype,
        "grid": {"x": [float(x) for x in xs], "y": None if ys is None else [float(y) for y in ys]},
    }
    for key in ("norm", "ignore", "seed", "subset", "mask_seed", "mask_granularity", "orthogonal",
                "fisher", "model"):
        if key in directions_attrs:
            identity[f"dir_{key}"] = directions_attrs[key]
    identity.update(settings or {})
    return _canonical(identity)


def compute_surface_file(out, model, dir_file, batches, xs, ys=None, settings=None, overwrite=False,
                         points_per_pass=1, progress=True, flush_seconds=2.0, info=None):
    """Compute (or resume) a surface file: loss and accuracy at every grid point not yet in ``out``.

    model: in eval mode on its device; dir_file: a direction file made for it (a 2-direction file
    with ys=None gives the 1D surface along x); batches: the fixed evaluation sample.
    settings: extra attributes that identify the run (model, corpus, max_samples, ...); a file
    computed with other settings is refused unless ``overwrite``.  info: attributes stored but not
    compared (batch size, device).  Under torch.distributed, points are sharded over ranks and
    rank 0 writes.  Returns {'path', 'computed', 'total'}.
    """
    directions, dir_attrs = load_directions(dir_file, model)
    if ys is not None and len(directions) < 2:
        raise UsageError(f"'{dir_file}' holds one direction; drop --y or make 2 with `landscape directions --dims 2`")
    directions = directions[: 1 if ys is None else 2]
    identity = surface_identity(dir_attrs, batches, model, xs, ys, settings)
    attrs = dict(_scalar_attrs(identity), identity=json.dumps(identity, sort_keys=True),
                 dir_file=str(dir_file), **{k: v for k, v in (info or {}).items() if v is not None})
    rank, world = _dist()
    writer, todo = None, None
    if rank == 0:
        try:
            writer = _SurfaceWriter(out, xs, ys, identity, attrs, overwrite, flush_seconds)
            todo = writer.missing()
        except UsageError as err:
            todo = str(err)
    todo = _broadcast(todo)
    if isinstance(todo, str):
        raise UsageError(todo)
    points = grid_points(xs, ys)
    complete = False
    try:
        _compute_sharded(model, directions, batches, points, todo, writer, points_per_pass, progress)
        complete = True
    finally:
        if writer is not None:
            writer.close(complete)
    return {"path": Path(out), "computed": len(todo), "total": len(points)}


def _compute_sharded(model, directions, batches, points, todo, writer, points_per_pass, progress):
    rank, world = _dist()
    step = max(1, int(points_per_pass))
    kind = model_kind(model)
    _check_directions(model, directions)
    perturbation = InPlacePerturbation(model, directions)
    bar = tqdm(total=len(todo), desc="surface", unit="pt", disable=not progress or rank != 0)
    try:
        # Every rank runs the same number of rounds, so the collective gathers always pair up.
        for start in range(0, len(todo), step * world):
            mine = todo[start + rank * step: start + (rank + 1) * step]
            results = _points_pass(model, perturbation, batches, [points[i] for i in mine], kind) if mine else []
            gathered = [r for part in _gather([(i, l, a) for i, (l, a) in zip(mine, results)]) for r in part]
            if writer is not None:
                writer.record(gathered)
            bar.update(len(gathered))
    finally:
        perturbation.restore()
        bar.close()
