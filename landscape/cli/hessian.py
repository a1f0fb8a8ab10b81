"""hessian: the command line of ``curvature.run_hessian``."""

from ..adapters import ADAPTER_SUBSET
from ..errors import UsageError
from . import options
from .common import add_corpus_args, add_model_args, add_new_head_arg, add_overwrite_arg


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
    group.add_argument("--trace", type=options.TRACE_PROBES, default=0, metavar="N",
                       help="Hutchinson probes for the trace, e.g. 100; 0 = no trace")
    group.add_argument("--spectrum", type=options.SPECTRUM_RUNS, default=0, metavar="RUNS",
                       help="stochastic Lanczos quadrature runs for the density, e.g. 10; 0 = none")
    group.add_argument("--steps", type=options.LANCZOS_STEPS, default=80, help="Lanczos steps per spectrum run")
    group.add_argument("--bins", type=options.BINS, default=200, help="histogram bins of the density")
    group.add_argument("--tol", type=options.OPEN_UNIT, default=1e-4,
                       help="eigenpairs converge when |Hv - λv| <= tol·|λ|")
    group.add_argument("--max-iter", type=options.HVP_BUDGET, default=500,
                       help="at most this many Hessian-vector products for the eigenpairs")
    _add_mask_args(group)
    parser.add_argument("--cache-mb", type=options.CACHE_MB, default=1024.0,
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
                            "(P·H·P; K in percent of the perturbable elements; default: all); adapter: only "
                            "the parameters of a PEFT adapter --model (no --fisher)")
    group.add_argument("--mask-granularity", choices=("global", "tensor"), default="global",
                       help="rank elements over the whole model (global) or inside each tensor (tensor)")
    group.add_argument("--ignore", choices=("biasbn", "none"), default=ignore_default,
                       help="biasbn: 1-D tensors (biases, LayerNorm) are not coordinates, as directions do not "
                            "perturb them; none: every trainable element (the full Hessian)")


def run_hessian(args):
    from ..curvature import run_hessian

    if args.subset not in (None, "all", ADAPTER_SUBSET) and not args.fisher:
        raise UsageError(f"--subset {args.subset} needs --fisher F.safetensors")
    result = run_hessian(args.out, args.model, corpus=args.corpus, fraction=args.fraction, max_samples=args.max_samples,
                 seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed, bos=args.bos, device=args.device,
                 dtype=args.dtype, allow_new_head=args.allow_new_head, top=args.top, trace=args.trace,
                 spectrum=args.spectrum, steps=args.steps, bins=args.bins, tol=args.tol, max_iter=args.max_iter,
                 fisher=args.fisher, subset=args.subset or "all", granularity=args.mask_granularity,
                 ignore=args.ignore, cache_mb=args.cache_mb, vectors=args.vectors, overwrite=args.overwrite,
                 progress=not args.quiet, log=lambda line: print(line, flush=True))
    if result.computed:
        print(f"wrote {result.path}" + (f" and {result.vectors}" if result.vectors else ""))
    else:
        print(f"{result.path} is complete with these settings; nothing to do")
        _print_summary(result.report)
    return 0


def _print_summary(report):
    values = report.get("eigenvalues")
    if values:
        print(f"top eigenvalues: {', '.join(f'{v:.6g}' for v in values)}")
    if report.get("trace"):
        print(f"trace: {report['trace']['mean']:.6g} ± {report['trace']['stderr']:.2g}")
