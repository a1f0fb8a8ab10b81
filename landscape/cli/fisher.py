"""fisher, stability, profile."""

from ..defaults import STABILITY_FRACTIONS, STABILITY_TOP
from . import options
from .common import add_corpus_args, add_model_args, add_new_head_arg, add_overwrite_arg, add_shard_args


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
    add_model_args(parser)
    add_new_head_arg(parser)
    add_corpus_args(parser)
    parser.add_argument("--out", required=True, help="output Fisher file (.safetensors)")
    add_overwrite_arg(parser)
    _add_run_args(parser)
    parser.add_argument("--checkpoint-every", type=options.NON_NEGATIVE, default=60.0,
                        help="seconds between checkpoints of the running sums")
    add_shard_args(parser)
    parser.set_defaults(func=run_fisher)


def _add_run_args(parser):
    parser.add_argument("--max-chunk-mb", type=options.CHUNK_MB, default=None,
                        help="memory for per-sample gradients at a time, in MB (default: 256, lowered to a "
                             "quarter byte per model parameter for models under 1B parameters, at least 64)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (default: a progress bar on stderr)")


def _sample_options(args):
    """The corpus and model options every Fisher stage takes, by their library names."""
    return dict(fraction=args.fraction, max_samples=args.max_samples, seq_len=args.seq_len,
                batch_size=args.batch_size, seed=args.seed, bos=args.bos, dtype=args.dtype, device=args.device,
                allow_new_head=args.allow_new_head, max_chunk_mb=args.max_chunk_mb, overwrite=args.overwrite,
                progress=not args.quiet)


def run_fisher(args):
    from ..fisher import run_fisher as fisher_stage
    from ..runtime import rank_and_world

    result = fisher_stage(args.out, args.model, args.corpus, shard_size=args.shard_size,
                          checkpoint_every=args.checkpoint_every, **_sample_options(args))
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
    add_model_args(parser)
    add_new_head_arg(parser)
    add_corpus_args(parser)
    parser.add_argument("--fractions", type=options.FRACTIONS, default=",".join(f"{f:g}" for f in STABILITY_FRACTIONS),
                        help="comma-separated fractions of the reference sample")
    parser.add_argument("--top", type=options.PERCENTS, default=",".join(f"{k:g}" for k in STABILITY_TOP),
                        help="comma-separated top-k percentages")
    parser.add_argument("--out", required=True, help="output table (.csv)")
    add_overwrite_arg(parser, "replace an --out that is not a stability table (default: refuse)")
    _add_run_args(parser)
    parser.set_defaults(func=run_stability)


def run_stability(args):
    from ..fisher import run_stability as stability_stage
    from ..fisher.stability import format_table

    result = stability_stage(args.out, args.model, args.corpus, fractions=args.fractions, top=args.top,
                             **_sample_options(args))
    print(format_table(result.rows))
    print(f"wrote {result.path} (reference: {result.samples} samples)")
    return 0


# ----------------------------------------------------------------------------------- profile
def _register_profile(subparsers):
    parser = subparsers.add_parser(
        "profile", help="parameter-wise and site-wise Fisher figures and CSV",
        description="Sorted parameter-wise Fisher (log scale), dropout-site scores (element-weighted mean "
                    "Fisher of the parameters each site drops), per-tensor and per-block tables.")
    parser.add_argument("fisher", help="a Fisher file written by `landscape fisher`")
    add_model_args(parser)
    parser.add_argument("--out", required=True, help="output folder")
    add_overwrite_arg(parser, "replace files in --out that the profile did not write (default: refuse)")
    parser.set_defaults(func=run_profile)


def run_profile(args):
    from ..guided.profile import run_profile as profile_stage

    for path in profile_stage(args.fisher, args.out, model=args.model, overwrite=args.overwrite).values():
        print(f"wrote {path}")
    return 0
