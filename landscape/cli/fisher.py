"""fisher, stability, profile."""

from ..settings import FisherSettings, ProfileSettings, StabilitySettings
from .common import add_overwrite_arg
from .generated import add_output_arguments, add_quiet_arg, add_settings_arguments, settings_from_args


def register(subparsers):
    _register_fisher(subparsers)
    _register_stability(subparsers)
    _register_profile(subparsers)


# ------------------------------------------------------------------------------------ fisher
def _register_fisher(subparsers):
    parser = subparsers.add_parser(
        "fisher", help="diagonal empirical Fisher of a model on a corpus",
        description="Exact diagonal empirical Fisher F_j = (1/N) sum_n (dl_n/dtheta_j)^2 with batched "
                    "per-sample gradients.  Interrupted runs resume from OUT.ckpt; under torchrun the "
                    "samples are split over the ranks; with --shard-size K, groups of K ranks hold one "
                    "FSDP2-sharded copy of the model and the groups split the samples.")
    add_settings_arguments(parser, FisherSettings)
    add_output_arguments(parser, "output Fisher file (.safetensors)")
    parser.set_defaults(func=run_fisher, applies_threads=True)


def run_fisher(args):
    from ..fisher import run_fisher as fisher_stage
    from ..runtime import rank_and_world

    result = fisher_stage(settings_from_args(FisherSettings, args), out=args.out, overwrite=args.overwrite,
                          progress=not args.quiet)
    if rank_and_world()[0] == 0:
        print(f"wrote {result.path}: Fisher of {result.parameters:,} parameters ({result.tensors} tensors) from "
              f"{result.samples} samples of {result.seq_len} tokens")
    return 0


# --------------------------------------------------------------------------------- stability
def _register_stability(subparsers):
    parser = subparsers.add_parser(
        "stability", help="Fisher stability over nested corpus fractions (paper Table 1)",
        description="Estimate the Fisher from nested sub-samples of the reference sample in one pass and "
                    "compare each with the reference: top-k% overlap and Jaccard, Spearman, relative L1.")
    add_settings_arguments(parser, StabilitySettings)
    add_output_arguments(parser, "output table (.csv)",
                         overwrite_help="replace an --out that is not a stability table (default: refuse)")
    parser.set_defaults(func=run_stability, applies_threads=True)


def run_stability(args):
    from ..fisher import run_stability as stability_stage
    from ..fisher.stability import format_table

    result = stability_stage(settings_from_args(StabilitySettings, args), out=args.out, overwrite=args.overwrite,
                             progress=not args.quiet)
    print(format_table(result.rows))
    print(f"wrote {result.path} (reference: {result.samples} samples)")
    return 0


# ----------------------------------------------------------------------------------- profile
def _register_profile(subparsers):
    parser = subparsers.add_parser(
        "profile", help="parameter-wise and site-wise Fisher figures and CSV",
        description="Sorted parameter-wise Fisher (log scale), dropout-site scores (element-weighted mean "
                    "Fisher of the parameters each site drops), per-tensor and per-block tables.")
    add_settings_arguments(parser, ProfileSettings)
    parser.add_argument("--out", required=True, help="output folder")
    add_overwrite_arg(parser, "replace files in --out that the profile did not write (default: refuse)")
    add_quiet_arg(parser)  # the model loads: its bar, for large weights on a terminal
    parser.set_defaults(func=run_profile, applies_threads=True)


def run_profile(args):
    from ..guided.profile import run_profile as profile_stage

    result = profile_stage(settings_from_args(ProfileSettings, args), out=args.out, overwrite=args.overwrite)
    for path in result.files.values():
        print(f"wrote {path}")
    return 0
