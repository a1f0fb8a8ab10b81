"""hessian: the command line of ``curvature.run_hessian``."""

from ..settings import HessianSettings
from .generated import add_output_arguments, add_settings_arguments, settings_from_args


def register(subparsers):
    parser = subparsers.add_parser(
        "hessian", help="Hessian top eigenvalues, trace and spectral density (optionally Fisher-masked)",
        description="Curvature of the loss that surfaces report (token-weighted mean cross-entropy over the "
                    "sample, eval mode): the top eigenpairs by Lanczos, the trace by Hutchinson, the "
                    "spectral density by stochastic Lanczos quadrature, of the Hessian over the perturbable "
                    "parameters, or of P·H·P for a Fisher subset.  Writes a JSON report and optionally the "
                    "top eigenvectors as a direction file.  Long runs keep checkpoints next to --out "
                    "(OUT.top.ckpt, OUT.trace.ckpt, OUT.spectrum.ckpt); rerunning the same command resumes.  --seed "
                    "seeds the sample, random masks, the Lanczos start vector and the probes.  Under torchrun the "
                    "trace's probes and the spectrum's runs are split over the ranks; with --shard-size K "
                    "(and --hvp difference), groups of K ranks hold one FSDP2-sharded copy of the model and "
                    "of every vector (see docs/scale.md).")
    add_settings_arguments(parser, HessianSettings)
    add_output_arguments(parser, "JSON report to write (.json)")
    parser.add_argument("--vectors", default=None,
                        help="also write the top-1/top-2 eigenvectors as a direction file (.h5) for `surface` "
                             "(default: the report only)")
    parser.set_defaults(func=run_hessian, applies_threads=True)


def run_hessian(args):
    from ..curvature import run_hessian
    from ..runtime import rank_and_world

    result = run_hessian(settings_from_args(HessianSettings, args), out=args.out, vectors=args.vectors,
                         overwrite=args.overwrite, progress=not args.quiet, log=lambda line: print(line, flush=True))
    if rank_and_world()[0] != 0:  # under torchrun rank 0 speaks for the run
        return 0
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
