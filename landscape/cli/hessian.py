"""hessian; and the command-line parts of curvature and paths that other subcommands gain:
``directions --kind hessian | --to | --trajectory``, ``plot --kind spectrum`` (and trajectory
points on contours), ``compare --hessian``."""

import math
import warnings
from pathlib import Path

from .. import adapters
from ..errors import UsageError
from ..files import check_output_path
from . import options
from .common import (
    add_corpus_args,
    add_model_args,
    add_new_head_arg,
    add_overwrite_arg,
    claim,
    load_model_from_args,
    model_id,
)

H5_SUFFIXES = (".h5", ".hdf5")
HESSIAN_COLUMNS = ("top_eigenvalue", "trace", "trace_stderr")


def register(subparsers):
    parser = subparsers.add_parser(
        "hessian", help="Hessian top eigenvalues, trace and spectral density (optionally Fisher-masked)",
        description="Curvature of the loss that surfaces report (token-weighted mean cross-entropy over the "
                    "sample, eval mode): the top eigenpairs by Lanczos, the trace by Hutchinson, the "
                    "spectral density by stochastic Lanczos quadrature, of the Hessian over the perturbable "
                    "parameters, or of P·H·P for a Fisher subset.  Writes a JSON report and optionally the "
                    "top eigenvectors as a direction file.  Long runs keep checkpoints next to --out "
                    "(OUT.top.ckpt, OUT.trace.ckpt, OUT.spectrum.ckpt); rerunning the same command resumes.  --seed "
                    "seeds the sample, random masks, the Lanczos start vector and the probes.  The model is not "
                    "sharded: Hessian-vector products need all of it on one device (no --shard-size; see "
                    "docs/scale.md).")
    add_model_args(parser)
    add_new_head_arg(parser)
    add_corpus_args(parser, max_samples_default=64)
    group = parser.add_argument_group("what to compute")
    group.add_argument("--top", type=options.EIGENPAIRS, default=2, help="top eigenpairs; 0 = none")
    group.add_argument("--trace", type=options.NON_NEGATIVE_INT, default=0, metavar="N",
                       help="Hutchinson probes for the trace, e.g. 100; 0 = no trace")
    group.add_argument("--spectrum", type=options.NON_NEGATIVE_INT, default=0, metavar="RUNS",
                       help="stochastic Lanczos quadrature runs for the density, e.g. 10; 0 = none")
    group.add_argument("--steps", type=options.LANCZOS_STEPS, default=80, help="Lanczos steps per spectrum run")
    group.add_argument("--bins", type=options.BINS, default=200, help="histogram bins of the density")
    group.add_argument("--tol", type=options.OPEN_UNIT, default=1e-4,
                       help="eigenpairs converge when |Hv - λv| <= tol·|λ|")
    group.add_argument("--max-iter", type=options.POSITIVE_INT, default=500,
                       help="at most this many Hessian-vector products for the eigenpairs")
    _add_mask_args(group)
    parser.add_argument("--cache-mb", type=options.NON_NEGATIVE, default=1024.0,
                        help="memory for the cached first-order graphs, in MB; 0 = recompute")
    parser.add_argument("--out", required=True, help="JSON report to write (.json)")
    parser.add_argument("--vectors", default=None,
                        help="also write the top-1/top-2 eigenvectors as a direction file (.h5) for `surface` "
                             "(default: the report only)")
    add_overwrite_arg(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar (default: a progress bar on stderr)")
    parser.set_defaults(func=run_hessian)


def _add_mask_args(group, ignore_default="biasbn"):
    group.add_argument("--fisher", default=None, help="Fisher file (safetensors) for --subset")
    group.add_argument("--subset", default=None,
                       help="top:K | bottom:K | random:K | all: the Hessian restricted to those parameters "
                            "(P·H·P; K in percent of the perturbable elements; default: all)")
    group.add_argument("--mask-granularity", choices=("global", "tensor"), default="global",
                       help="rank elements over the whole model (global) or inside each tensor (tensor)")
    group.add_argument("--ignore", choices=("biasbn", "none"), default=ignore_default,
                       help="biasbn: 1-D tensors (biases, LayerNorm) are not coordinates, as directions do not "
                            "perturb them; none: every trainable element (the full Hessian)")


def _check_counts(top, trace, runs, steps, bins, tol, max_iter, vectors):
    for flag, value, low in (("--top", top, 0), ("--trace", trace, 0), ("--spectrum", runs, 0),
                             ("--steps", steps, 1), ("--bins", bins, 1), ("--max-iter", max_iter, 1)):
        if value < low:
            raise UsageError(f"{flag} must be at least {low}, got {value}")
    if not 0 < tol < 1:
        raise UsageError(f"--tol must be in (0, 1), got {tol}")
    if not (top or trace or runs):
        raise UsageError("nothing to compute: give --top K, --trace N or --spectrum RUNS")
    if vectors and top < 1:
        raise UsageError("--vectors needs --top 1 or more")
    if top and max_iter < top:
        raise UsageError(f"--max-iter ({max_iter}) must be at least --top ({top})")


def _fisher_and_subset(args):
    """(Fisher scores or None, {metadata}, subset spec) with the flag-level checks."""
    from ..fisher import load_fisher
    from ..surface.directions import parse_mask_spec

    subset = args.subset or "all"
    parse_mask_spec(subset)
    if args.fisher:
        return (*load_fisher(args.fisher), subset)
    if subset != "all":
        raise UsageError(f"--subset {subset} needs --fisher F.safetensors")
    return None, {}, subset


def _checked_fingerprint(args, loaded, fisher_meta):
    """The model's fingerprint, after refusing a --fisher file computed on another model."""
    from ..fisher import check_fisher_model
    from ..identity import model_fingerprint

    weights = model_fingerprint(loaded)
    if args.fisher:
        check_fisher_model(args.fisher, fisher_meta, weights, args.model)
    return weights


def _mask_settings(args, fisher_meta, subset, seed):
    return {"fisher": str(Path(args.fisher).resolve()) if args.fisher else "",
            "fisher_provenance": str(fisher_meta.get("corpus", "")), "subset": subset, "mask_seed": int(seed),
            "mask_granularity": args.mask_granularity, "ignore": args.ignore}


def run_hessian(args):
    from ..curvature.report import (
        check_existing_report,
        direction_fingerprint,
        hessian_report,
        mask_size,
        remove_checkpoints,
        save_report,
        subset_mask,
    )
    from ..data.corpus import describe_framing, load_batches
    from ..identity import MODEL_KEY
    from ..surface.directions import check_existing_directions

    out = check_output_path(args.out, "--out", [".json"])
    vectors = check_output_path(args.vectors, "--vectors", H5_SUFFIXES) if args.vectors else None
    claim(args, out, "hessian-report")
    if vectors is not None:
        claim(args, vectors, "directions")
    _check_counts(args.top, args.trace, args.spectrum, args.steps, args.bins, args.tol, args.max_iter, vectors)
    if not args.cache_mb >= 0:
        raise UsageError(f"--cache-mb must be 0 or more, got {args.cache_mb}")
    fisher, fisher_meta, subset = _fisher_and_subset(args)
    loaded = load_model_from_args(args)
    weights = _checked_fingerprint(args, loaded, fisher_meta)
    batches = load_batches(loaded, corpus=args.corpus, fraction=args.fraction, max_samples=args.max_samples,
                           seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed, bos=args.bos)
    mask = subset_mask(loaded.model, fisher, subset, seed=args.seed, ignore=args.ignore,
                       granularity=args.mask_granularity)
    sample = {"model": model_id(loaded), "corpus": str(args.corpus or "embedded"), "fraction": args.fraction,
              "max_samples": args.max_samples, "seq_len": args.seq_len, "corpus_seed": args.seed,
              "framing": describe_framing(loaded.tokenizer, args.bos), "precision": str(args.dtype).lower(),
              MODEL_KEY: weights, **adapters.record(loaded)}
    masking = _mask_settings(args, fisher_meta, subset, args.seed)
    settings = dict(sample, **masking, batch_size=args.batch_size, seed=args.seed, top=args.top, tol=args.tol,
                    max_iter=args.max_iter, trace=args.trace, spectrum=args.spectrum,
                    steps=args.steps if args.spectrum else None, bins=args.bins if args.spectrum else None,
                    vectors=str(vectors) if vectors else "")
    n_selected = mask_size(loaded.model, mask)
    n_parameters = sum(p.numel() for p in loaded.model.parameters())
    vector_settings = dict(sample, **masking, seed=args.seed, tol=args.tol, n_selected=n_selected,
                           n_parameters=n_parameters, source="landscape hessian")
    if not args.overwrite:
        done = check_existing_report(out, settings)
        if done is not None and (vectors is None or (done.get("vectors") or {}).get("fingerprint")
                                 == direction_fingerprint(vectors)):
            print(f"{out} is complete with these settings; nothing to do")
            _print_summary(done)
            return 0
        if vectors is not None:
            check_existing_directions(vectors, dict(_scalars(vector_settings), kind="hessian", norm="unit"))
    share = 100.0 * n_selected / max(1, n_parameters)
    print(f"Hessian of {loaded.source} over {n_selected:,} of {n_parameters:,} parameters ({share:.2f}%, "
          f"subset {subset}, ignore {args.ignore}); sample of {sum(b['labels'].shape[0] for b in batches)} "
          f"sequences x {args.seq_len} tokens", flush=True)
    report = hessian_report(loaded.model, batches, top=args.top, trace_samples=args.trace,
                            spectrum_runs=args.spectrum, steps=args.steps, bins=args.bins, mask=mask,
                            seed=args.seed, tol=args.tol, max_iter=args.max_iter, checkpoint=out, vectors=vectors,
                            vector_settings=vector_settings, settings=settings,
                            cache_bytes=int(args.cache_mb * 2**20), progress=not args.quiet,
                            log=lambda line: print(line, flush=True))
    save_report(out, report)
    remove_checkpoints(out)
    print(f"wrote {out}" + (f" and {vectors}" if vectors else ""))
    return 0


def _print_summary(report):
    values = report.get("eigenvalues")
    if values:
        print(f"top eigenvalues: {', '.join(f'{v:.6g}' for v in values)}")
    if report.get("trace"):
        print(f"trace: {report['trace']['mean']:.6g} ± {report['trace']['stderr']:.2g}")


def _scalars(settings):
    return {k: ("" if v is None else v) for k, v in settings.items() if v is None or isinstance(v, (str, int, float))}


# ----------------------------------------------------------------------------- directions beyond random
def add_directions_args(parser):
    """The options of `directions` for eigenvector axes and paths between checkpoints."""
    group = parser.add_argument_group(
        "kinds beyond random",
        "--kind hessian: the top-1 (--dims 1) or top-2 (--dims 2) Hessian eigenvectors as axes (unit norm), of "
        "P·H·P when --fisher/--subset are given (--ignore as for random directions; --seed seeds the Lanczos "
        "start vector and random masks).  Its sample is set by the corpus options below, whose defaults are "
        "those of `landscape surface`.  --to and --trajectory write raw parameter differences: --norm, --ignore "
        "and --fisher do not apply.")
    group.add_argument("--kind", choices=("random", "hessian"), default="random",
                       help="random: seeded Gaussian directions; hessian: eigenvector axes")
    group.add_argument("--to", default=None, metavar="MODEL_B",
                       help="one direction θ_B − θ_A from --model A to MODEL_B (x = 0 is A, x = 1 is B; "
                            "--dims does not apply; default: random directions)")
    group.add_argument("--trajectory", nargs="+", default=None, metavar="CKPT",
                       help="checkpoints in training order (at least 4): the top-2 PCA plane relative to the "
                            "last one, which is the plane's origin; --model must be that last checkpoint "
                            "(it is when --model is left out; default: random directions)")
    group.add_argument("--corpus", default=None, help="hessian: corpus of the sample (default: the embedded corpus)")
    group.add_argument("--max-samples", type=options.POSITIVE_INT, default=None,
                       help="hessian: sequences (default: 64)")
    group.add_argument("--seq-len", type=options.SEQ_LEN, default=None,
                       help="hessian: tokens per sequence (default: 128)")
    group.add_argument("--batch-size", type=options.POSITIVE_INT, default=None,
                       help="hessian: batch size (default: 16)")
    group.add_argument("--sample-seed", type=options.SEED, default=None,
                       help="hessian: seed of the sample, as `surface --seed` (default: 0)")
    group.add_argument("--bos", choices=("auto", "yes", "no"), default=None,
                       help="hessian: BOS framing of the samples (default: auto)")
    group.add_argument("--tol", type=options.OPEN_UNIT, default=None,
                       help="hessian: eigenpair tolerance (default: 1e-4)")
    group.add_argument("--device", default=None, help="hessian: auto | cpu | cuda | cuda:N (default: auto)")


_HESSIAN_ONLY = ("corpus", "max_samples", "seq_len", "batch_size", "sample_seed", "bos", "tol", "device")


def other_directions(args, out) -> bool:
    """Write the directions of ``--kind hessian``, ``--to`` or ``--trajectory`` to ``out``; False for
    plain random directions (the caller makes them)."""
    given = [f"--{name.replace('_', '-')}" for name in _HESSIAN_ONLY if getattr(args, name) is not None]
    if args.to and args.trajectory:
        raise UsageError("--to and --trajectory contradict each other; give one")
    if (args.to or args.trajectory) and args.kind != "random":
        raise UsageError(f"--kind {args.kind} and --{'to' if args.to else 'trajectory'} contradict each other; "
                         "give one")
    if args.kind == "random" and given:
        raise UsageError(f"{given[0]} sets the Hessian's sample: it applies to --kind hessian only")
    if args.to or args.trajectory:
        if args.fisher or args.subset:
            raise UsageError(f"--{'to' if args.to else 'trajectory'} writes raw parameter differences: "
                             "--fisher/--subset do not apply")
        _interpolation(args, out) if args.to else _trajectory(args, out)
        return True
    if args.kind == "hessian":
        _hessian_directions(args, out)
        return True
    return False


def _save(out, dirs, settings, overwrite):
    from ..surface.directions import check_existing_directions, save_directions

    if not overwrite:
        check_existing_directions(out, _scalars(settings))
    return save_directions(out, dirs, settings)


def _interpolation(args, out):
    from ..identity import MODEL_KEY, model_fingerprint
    from ..models import load_model
    from ..surface.directions import interpolation_direction

    model_a = load_model(args.model, device="cpu", dtype="float32", allow_new_head=args.allow_new_head)
    model_b = load_model(args.to, device="cpu", dtype="float32", allow_new_head=args.allow_new_head)
    if model_a.adapter and not model_b.adapter:
        raise UsageError("--model is a PEFT adapter and --to a plain model: give the plain model (the base) as "
                         "--model and the adapter as --to; the direction is then in the base's parameters")
    # base -> adapter: the adapter's merged weights (base names); adapter -> adapter: their own parameters
    plain_b = adapters.merged_model(model_b) if not model_a.adapter else model_b.model
    direction = interpolation_direction(model_a.model, plain_b)
    distance = math.sqrt(sum(float(t.double().pow(2).sum()) for t in direction.values()))
    settings = {"kind": "interpolation", "model": model_id(model_a), MODEL_KEY: model_fingerprint(model_a),
                "to": model_id(model_b), "to_fingerprint": model_fingerprint(model_b), "norm": "none",
                "ignore": "none", "subset": "all", "dims": 1, "distance": distance,
                "n_selected": sum(int((t != 0).sum()) for t in direction.values()),
                "n_parameters": sum(p.numel() for p in model_a.model.parameters()), **adapters.record(model_a),
                **{f"to_{k}": v for k, v in adapters.record(model_b).items()}}
    _save(out, [direction], settings, args.overwrite)
    print(f"wrote {out}: 1 direction from {model_a.source} (x = 0) to {model_b.source} (x = 1), "
          f"|θ_B − θ_A| = {distance:.4g}")


def _trajectory(args, out):
    import h5py
    import numpy as np
    import torch

    from ..identity import MODEL_KEY, model_fingerprint
    from ..models import load_model
    from ..surface.connectivity import model_parameters
    from ..surface.directions import trajectory_directions

    if len(args.trajectory) < 4:
        raise UsageError(f"--trajectory needs at least 4 checkpoints, got {len(args.trajectory)}")
    loaded = [load_model(c, device="cpu", dtype="float32", allow_new_head=args.allow_new_head)
              for c in args.trajectory]
    params = [model_parameters(m.model) for m in loaded]
    dirs, explained, coords = trajectory_directions(params)
    last = loaded[-1]
    if args.model is not None:
        model = load_model(args.model, device="cpu", dtype="float32", allow_new_head=args.allow_new_head)
        own = model_parameters(model.model)
        if list(own) != list(params[-1]) or any(not torch.equal(own[n], params[-1][n]) for n in own):
            raise UsageError(f"the plane's origin is the last checkpoint '{args.trajectory[-1]}' but --model "
                             f"'{args.model}' has other weights; give --model {args.trajectory[-1]} or leave it out")
    labels = [Path(c).name or str(c) for c in args.trajectory]
    settings = {"kind": "trajectory", "model": model_id(last), MODEL_KEY: model_fingerprint(last), "norm": "unit",
                "ignore": "none", "subset": "all", "dims": 2, "orthogonal": True,
                "n_selected": sum(int((t != 0).sum()) for t in dirs[0].values()),
                "n_parameters": sum(p.numel() for p in last.model.parameters()),
                "explained_variance": np.asarray(explained, dtype=np.float64),
                "trajectory_coordinates": np.asarray(coords, dtype=np.float64),
                "trajectory_labels": np.asarray(labels, dtype=h5py.string_dtype()),
                "trajectory_checkpoints": np.asarray([model_id(m) for m in loaded], dtype=h5py.string_dtype())}
    _save(out, dirs, settings, args.overwrite)
    print(f"wrote {out}: the PCA plane of {len(loaded)} checkpoints around {last.source} (the surface's --model), "
          f"explained variance {explained[0]:.1%} + {explained[1]:.1%}")
    for label, (x, y) in zip(labels, coords):
        print(f"  {label}: ({x:.4g}, {y:.4g})")


def _hessian_directions(args, out):
    from ..curvature import top_eigenpairs
    from ..curvature.report import mask_size, save_eigenvectors, subset_mask
    from ..data.corpus import describe_framing, load_batches
    from ..identity import sample_fingerprint
    from ..models import load_model
    from ..surface.directions import check_existing_directions

    tol = 1e-4 if args.tol is None else args.tol
    if not 0 < tol < 1:
        raise UsageError(f"--tol must be in (0, 1), got {tol}")
    fisher, fisher_meta, subset = _fisher_and_subset(args)
    loaded = load_model(args.model, device="auto" if args.device is None else args.device, dtype="float32",
                        allow_new_head=args.allow_new_head)
    weights = _checked_fingerprint(args, loaded, fisher_meta)
    seq_len = 128 if args.seq_len is None else args.seq_len
    seed = 0 if args.sample_seed is None else args.sample_seed
    bos = "auto" if args.bos is None else args.bos
    max_samples = 64 if args.max_samples is None else args.max_samples
    batches = load_batches(loaded, corpus=args.corpus, max_samples=max_samples, seq_len=seq_len,
                           batch_size=16 if args.batch_size is None else args.batch_size, seed=seed, bos=bos)
    mask = subset_mask(loaded.model, fisher, subset, seed=args.seed, ignore=args.ignore,
                       granularity=args.mask_granularity)
    settings = dict(_mask_settings(args, fisher_meta, subset, args.seed), kind="hessian", norm="unit",
                    model=model_id(loaded), model_fingerprint=weights, **adapters.record(loaded),
                    corpus=str(args.corpus or "embedded"),
                    max_samples=max_samples,
                    seq_len=seq_len, corpus_seed=seed, framing=describe_framing(loaded.tokenizer, bos),
                    sample_fingerprint=sample_fingerprint(batches), seed=args.seed, tol=tol,
                    n_selected=mask_size(loaded.model, mask),
                    n_parameters=sum(p.numel() for p in loaded.model.parameters()))
    if not args.overwrite:
        check_existing_directions(out, _scalars(settings))
    with warnings.catch_warnings():  # the attention fallback and non-convergence, as one line each
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *rest, **kw: print(f"note: {message}", flush=True)
        values, vectors = top_eigenpairs(loaded.model, batches, k=args.dims, mask=mask, seed=args.seed, tol=tol,
                                         progress=True)
    save_eigenvectors(out, vectors, values, settings)
    print(f"wrote {out}: the top-{args.dims} Hessian eigenvector(s) over {settings['n_selected']:,} of "
          f"{settings['n_parameters']:,} parameters (subset {subset}), eigenvalues "
          f"{', '.join(f'{v:.6g}' for v in values)}")


# ----------------------------------------------------------------------------- plot and compare
def plot_other(args) -> bool:
    """``plot --kind spectrum`` of a Hessian report, and contours with a trajectory's points; False
    when the ordinary surface plot applies."""
    if args.kind == "spectrum":
        from ..plots.spectrum import plot_spectrum

        out = plot_spectrum(args.surface, args.out, log=args.log, title=args.title)
        print(f"wrote {out}")
        return True
    if args.kind in ("contour", "contourf", "heatmap"):
        from ..plots.trajectory import plot_with_trajectory

        out = plot_with_trajectory(args.surface, args.out, kind=args.kind, field=args.field, log=args.log,
                                   zmin=args.zmin, zmax=args.zmax, cmap=args.cmap, levels=args.levels,
                                   title=args.title)
        if out is not None:
            print(f"wrote {out} (with the trajectory's checkpoints)")
            return True
    return False


def compare_reports(args):
    """The reports of ``compare --hessian`` (one per surface, in order), or None."""
    from ..curvature.report import load_report

    if not args.hessian:
        return None
    paths = [p.strip() for p in args.hessian.split(",")]
    if any(not p for p in paths) or len(paths) != len(args.surfaces):
        raise UsageError(f"--hessian names {len(paths)} report(s) for {len(args.surfaces)} surface file(s); give "
                         "one `landscape hessian` JSON per surface, comma-separated, in the same order")
    reports = [load_report(p) for p in paths]
    for report_path, report, surface_path in zip(paths, reports, args.surfaces):
        _check_same_model(report_path, report, surface_path)
    return reports


def _check_same_model(report_path, report, surface_path):
    """A Hessian report joined to a surface must be of the surface's model (when both say which)."""
    from ..identity import MODEL_KEY
    from ..surface.file import read_surface

    made_for = str((report.get("settings") or {}).get(MODEL_KEY) or "")
    surface_model = str(read_surface(surface_path).settings.get(MODEL_KEY) or "")
    if made_for and surface_model and made_for != surface_model:
        raise UsageError(f"Hessian report '{report_path}' is of another model (model fingerprint {made_for}) than "
                         f"surface '{surface_path}' ({surface_model}); give the report of the surface's model")


def compare_columns(rows, reports, csv_path):
    """Add top_eigenvalue, trace, trace_stderr to the sharpness rows and rewrite the CSV with them."""
    from ..curvature.report import report_numbers
    from ..files import write_csv
    from ..surface.sharpness import COLUMNS

    def cell(value):
        return "" if isinstance(value, float) and math.isnan(value) else (repr(value) if isinstance(value, float)
                                                                        else value)

    for row, report in zip(rows, reports):
        row.update(report_numbers(report))
    write_csv([{k: cell(row[k]) for k in COLUMNS + HESSIAN_COLUMNS} for row in rows], csv_path,
              COLUMNS + HESSIAN_COLUMNS)
    print(f"{'label':<24} {'top eigenvalue':>15} {'trace':>12} {'± stderr':>10}")
    for row in rows:
        print(f"{str(row['label'])[:24]:<24} {row['top_eigenvalue']:>15.6g} {row['trace']:>12.6g} "
              f"{row['trace_stderr']:>10.2g}")
