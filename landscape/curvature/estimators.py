"""Estimators built on matrix-vector products: Hutchinson's trace and the SLQ spectral density.

Both take any symmetric operator (``linear``'s convention: ``A @ v``, ``shape``, ``dtype``,
``device``): the loss Hessian (``HessianOperator``), the diagonal Fisher (``fisher_operator``), a
submatrix of either, or a plain square tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import numpy as np

from ..errors import UsageError
from .checkpoint import _identity, _Journal
from .krylov import DEFAULT_BASIS_BYTES
from .lanczos import _generator, _lanczos_run, _rademacher, _random_unit
from .linear import _Products


# ----------------------------------------------------------------------------- trace
def trace(A, samples: int = 100, seed: int = 0, *, progress: bool = False, checkpoint=None) -> tuple[float, float]:
    """Hutchinson estimate of a symmetric operator's trace: mean and standard error.

    Probe i is a Rademacher vector z_i drawn from (seed, i) alone; tr(A) ≈ mean_i z_iᵀ·A·z_i.

    Args:
        A: the operator (``linear``), e.g. ``HessianOperator(model, batches, mask, kind)`` (the trace of
            P·H·P with a mask), or a square tensor.
        samples: number of probes (one product each).
        seed: seeds the probes.
        progress: a tqdm bar over products, and a line on stderr when a checkpoint is resumed.
        checkpoint: path of a journal of finished probes; a rerun with the same settings skips
            them (more samples extend it); one written with other settings, or for another
            operator (its ``identity()``, which a checkpoint needs), is refused.

    Returns:
        (mean, standard error of the mean) in A's units, floats; the standard error is NaN for a
        single probe.
    """
    if int(samples) < 1:
        raise UsageError(f"the trace needs at least 1 probe, got {samples}")
    op = _Products(A, progress)
    op.check_journal(checkpoint)
    journal = _Journal(checkpoint, _identity(op, "trace", seed, probe="rademacher"), _check_probe) if checkpoint \
        else None
    done = {i: float.fromhex(r["value"]) for i, r in (journal.records.items() if journal else ()) if i < samples}
    mine = [i for i in range(int(samples)) if i not in done and (op.split is None or op.split.mine(i))]
    op.total = len(mine)
    if journal:
        journal.say_resumed(len(done), int(samples), "probes", progress)
    with op:
        if mine:
            op.record()  # the graph first, then the probe: not both beside the float32 weights
        for i in mine:
            # Not bound across probes: the next probe is drawn once this one is freed (a bound one
            # held two probes, 4 bytes per coordinate more, between products).
            z = _rademacher(op.dim, _generator(seed, 2, i), op.device, op).to(op.dtype)
            done[i] = op.summed(op.quadratic(z))  # this rank's pieces' share, added over the group
            del z
            if journal:
                journal.add(i, value=done[i].hex())
    if op.split is not None:  # the point groups' probes, on every rank
        done = op.split.gather(done)
    values = np.array([done[i] for i in range(int(samples))])
    stderr = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return float(values.mean()), stderr


def _check_probe(record: dict, schema, where: str) -> None:
    """A trace journal record: ``value``, the probe's zᵀHz as a float's hex string, finite."""
    text = schema.text(schema.field(record, "value", where), f"{where}: value")
    try:
        value = float.fromhex(text)
    except ValueError:
        schema.fail(f"is damaged: {where}: value {text[:20]!r} is not a hexadecimal float")
    schema.number(value, f"{where}: value")


# ----------------------------------------------------------------------------- spectrum
def _check_run(record: dict, schema, where: str) -> None:
    """Check a spectrum journal record: ``nodes`` and ``weights`` of one run.

    Both finite, as many of each, weights non-negative and summing to 1.
    """
    nodes = schema.numbers(schema.field(record, "nodes", where), f"{where}: nodes")
    weights = schema.numbers(schema.field(record, "weights", where), f"{where}: weights", length=len(nodes),
                             minimum=0.0)
    if not len(nodes) or abs(float(weights.sum()) - 1) > 1e-6:
        schema.fail(f"is damaged: {where}: the weights sum to {float(weights.sum()):g}, not 1")


@dataclass
class Spectrum:
    """Spectral density of the Hessian from stochastic Lanczos quadrature.

    edges: (bins+1,) bin edges and centers (bins,), eigenvalue units (nats/token per unit²);
    density: (bins,) probability density per unit eigenvalue, Σ density·width = 1;
    nodes, weights: per run, the Ritz values and their quadrature weights (each run's sum to 1);
    sigma: the Gaussian broadening's standard deviation; dim: the Hessian's size.
    """

    edges: np.ndarray
    centers: np.ndarray
    density: np.ndarray
    nodes: list = field(default_factory=list)
    weights: list = field(default_factory=list)
    sigma: float = 0.0
    dim: int = 0

    @property
    def ritz_mean(self) -> float:
        """Mean eigenvalue from the quadrature itself (an estimate of trace/dim)."""
        return float(np.mean([np.dot(n, w) for n, w in zip(self.nodes, self.weights)]))

    def mean(self) -> float:
        """Mean of the broadened histogram density."""
        return float(np.sum(self.centers * self.density * np.diff(self.edges)))

    def to_dict(self) -> dict:
        """JSON-ready: lists of floats."""
        return {"edges": self.edges.tolist(), "centers": self.centers.tolist(), "density": self.density.tolist(),
                "nodes": [np.asarray(n).tolist() for n in self.nodes],
                "weights": [np.asarray(w).tolist() for w in self.weights], "sigma": self.sigma, "dim": self.dim}


def _broaden(nodes: list, weights: list, bins: int, sigma: Optional[float]):
    """Gaussian-broadened mixture Σ_runs Σ_j w_j·N(θ_j, σ²)/runs, integrated exactly over each bin."""
    from scipy.special import ndtr

    theta = np.concatenate(nodes)
    mass = np.concatenate(weights) / len(nodes)
    low, high = float(theta.min()), float(theta.max())
    span = high - low if high > low else max(abs(high), 1.0) * 1e-3
    sigma = float(sigma) if sigma else span / bins  # one bin of the Ritz range: resolves it, hides no gap
    edges = np.linspace(low - 5 * sigma, high + 5 * sigma, bins + 1)
    cdf = ndtr((edges[:, None] - theta[None, :]) / sigma)  # (bins+1, nodes)
    per_bin = (cdf[1:] - cdf[:-1]) @ mass
    per_bin /= per_bin.sum()  # the tails beyond 5σ (< 1e-6) go back in
    return edges, (edges[1:] + edges[:-1]) / 2, per_bin / np.diff(edges), sigma


def spectrum(A, runs: int = 10, steps: int = 80, bins: int = 200, seed: int = 0, *, sigma: Optional[float] = None,
             reorthogonalize: bool = True, progress: bool = False, checkpoint=None,
             basis_bytes: int = DEFAULT_BASIS_BYTES) -> Spectrum:
    """Spectral density of a symmetric operator by stochastic Lanczos quadrature.

    Each run is a Lanczos process of ``steps`` products from a normalized Rademacher vector drawn
    from (seed, run); its Ritz values and weights are a Gauss quadrature of that vector's spectral
    measure, whose expectation is the eigenvalue distribution.  The density is their average,
    each node broadened by a Gaussian of width ``sigma``.

    Args:
        A: the operator (``linear``), e.g. ``HessianOperator(model, batches, mask, kind)`` (the spectrum
            of H restricted to the kept coordinates), or a square tensor.
        runs: independent Lanczos runs (each ``steps`` products).
        steps: Lanczos steps per run (at most the dimension).
        bins: histogram bins over [min node − 5σ, max node + 5σ].
        seed: seeds the start vectors.
        sigma: broadening, eigenvalue units; default one bin width of the Ritz-value range.
        reorthogonalize: full reorthogonalization (steps·dim of memory, or of a temporary file
            beyond ``basis_bytes``); without it, the three-term recurrence (ghost copies of
            outliers may take some weight).
        progress: a tqdm bar over products, and a line on stderr when a checkpoint is resumed.
        checkpoint: path of a journal of finished runs (as for ``trace``).
        basis_bytes: a run's basis stays in memory up to this many bytes, else goes to a temporary
            file read a block at a time (``krylov``; the same numbers up to rounding).

    Returns:
        A ``Spectrum``.
    """
    if int(runs) < 1 or int(steps) < 1 or int(bins) < 1:
        raise UsageError(f"the spectrum needs runs, steps and bins of at least 1, got {runs}, {steps}, {bins}")
    op = _Products(A, progress)
    op.check_journal(checkpoint)
    steps = min(int(steps), op.dim)
    journal = _Journal(checkpoint, _identity(op, "spectrum", seed, steps=steps, reorthogonalize=bool(reorthogonalize)),
                       _check_run) if checkpoint else None
    done = {i: (np.array(r["nodes"]), np.array(r["weights"]))
            for i, r in (journal.records.items() if journal else ()) if i < runs}
    mine = [r for r in range(int(runs)) if r not in done and (op.split is None or op.split.mine(r))]
    op.total = len(mine) * steps
    if journal:
        journal.say_resumed(len(done), int(runs), "runs", progress)
    with op:
        if mine:
            op.record()  # the graph first, then the start vector: not both beside the float32 weights
        for r in mine:
            start = partial(_random_unit, op.dim, _generator(seed, 3, r), op.device, rademacher=True, dtype=op.dtype,
                            op=op)
            done[r] = _lanczos_run(op, start, steps, reorthogonalize, int(basis_bytes))
            if journal:
                journal.add(r, nodes=done[r][0].tolist(), weights=done[r][1].tolist())
    if op.split is not None:  # the point groups' runs, on every rank
        done = op.split.gather(done)
    nodes = [done[r][0] for r in range(int(runs))]
    weights = [done[r][1] for r in range(int(runs))]
    edges, centers, density, width = _broaden(nodes, weights, int(bins), sigma)
    return Spectrum(edges, centers, density, nodes, weights, width, op.dim)
