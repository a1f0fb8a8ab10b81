"""fisher, stability, profile."""

import json
import sys
from pathlib import Path

from .. import adapters
from ..defaults import STABILITY_FRACTIONS, STABILITY_TOP
from ..errors import UsageError
from ..files import check_output_path
from .common import (
    add_corpus_args,
    add_model_args,
    add_new_head_arg,
    add_overwrite_arg,
    add_shard_args,
    load_model_from_args,
)


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
    parser.add_argument("--checkpoint-every", type=float, default=60.0,
                        help="seconds between checkpoints of the running sums")
    add_shard_args(parser)
    parser.set_defaults(func=run_fisher)


def _add_run_args(parser):
    parser.add_argument("--max-chunk-mb", type=float, default=None,
                        help="memory for per-sample gradients at a time, in MB (default: 256, lowered to a "
                             "quarter byte per model parameter for models under 1B parameters, at least 64)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (default: a progress bar on stderr)")


def _samples(args, loaded):
    """All samples of the corpus sub-sample, in seeded document order, and the pad id."""
    from ..data.corpus import load_samples
    from ..data.objectives import pad_token_id

    samples = load_samples(loaded, args.corpus, args.fraction, args.max_samples, args.seq_len, args.seed, args.bos)
    return samples, pad_token_id(loaded.tokenizer)


def _check_chunk(max_chunk_mb):
    if max_chunk_mb is None:
        return
    if not max_chunk_mb > 0 or max_chunk_mb == float("inf"):  # also refuses NaN
        raise UsageError(f"--max-chunk-mb must be a positive number of MB, got {max_chunk_mb}")


def run_fisher(args):
    from ..data.corpus import batches as make_batches
    from ..data.corpus import describe_framing
    from ..fisher import check_existing_fisher, compute_fisher, provenance, save_fisher
    from ..runtime import barrier, join_torchrun
    from ..sharding import shard_layout

    out = check_output_path(args.out, "--out", [".safetensors"])
    _check_chunk(args.max_chunk_mb)
    args.device, rank, world = join_torchrun(args.device)
    layout = shard_layout(args.shard_size)
    loaded = load_model_from_args(args, layout=layout)
    samples, pad = _samples(args, loaded)
    meta = provenance(loaded.source, args.corpus, args.fraction, len(samples), args.seed,
                      max_samples=args.max_samples, seq_len=args.seq_len, dtype=args.dtype,
                      objective=loaded.kind, framing=describe_framing(loaded.tokenizer, args.bos),
                      **adapters.record(loaded))
    if not args.overwrite:
        check_existing_fisher(out, meta)
    device = next(loaded.model.parameters()).device
    # Point groups split the samples as ranks do; the ranks of one group run the same ones.
    mine = samples[layout.group_index::layout.n_groups]
    shard = make_batches(mine, args.batch_size, pad, device) if mine else []
    settings = {"model": loaded.source, "corpus": args.corpus, "fraction": args.fraction,
                "max_samples": args.max_samples, "seq_len": args.seq_len, "batch_size": args.batch_size,
                "seed": args.seed, "dtype": args.dtype, "bos": args.bos, "rank": rank, "world": world,
                "shard_size": args.shard_size}
    checkpoint = out.with_name(out.name + (f".rank{rank}" if world > 1 else "") + ".ckpt")
    fisher = compute_fisher(loaded.model, shard, kind=loaded.kind, progress=not args.quiet and rank == 0,
                            checkpoint=checkpoint, checkpoint_every=args.checkpoint_every,
                            fingerprint=json.dumps(settings, sort_keys=True), max_chunk_mb=args.max_chunk_mb,
                            layout=layout)
    if layout.group_index == 0:  # every group holds the same reduced sums; group 0 writes them
        extra = {"shard_size": args.shard_size} if layout.sharded else {}
        save_fisher(out, fisher, dict(meta, ranks=world, **extra))
    if rank == 0:
        total = sum(t.numel() for t in fisher.values())
        print(f"wrote {out}: Fisher of {total:,} parameters ({len(fisher)} tensors) from {len(samples)} "
              f"samples of {args.seq_len} tokens")
    barrier()
    checkpoint.unlink(missing_ok=True)
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
    parser.add_argument("--fractions", default=",".join(f"{f:g}" for f in STABILITY_FRACTIONS),
                        help="comma-separated fractions of the reference sample")
    parser.add_argument("--top", default=",".join(f"{k:g}" for k in STABILITY_TOP),
                        help="comma-separated top-k percentages")
    parser.add_argument("--out", required=True, help="output table (.csv)")
    _add_run_args(parser)
    parser.set_defaults(func=run_stability)


def run_stability(args):
    from ..data.corpus import batches as make_batches
    from ..fisher.stability import format_table, parse_numbers, stability, write_csv

    out = check_output_path(args.out, "--out", [".csv"])
    _check_chunk(args.max_chunk_mb)
    fractions = parse_numbers(args.fractions, "--fractions", 0.0, 1.0)
    top = parse_numbers(args.top, "--top", 0.0, 100.0)
    loaded = load_model_from_args(args)
    samples, pad = _samples(args, loaded)
    batches = make_batches(samples, args.batch_size, pad, next(loaded.model.parameters()).device)
    rows = stability(loaded.model, batches, fractions, top, kind=loaded.kind, progress=not args.quiet)
    write_csv(rows, out)
    print(format_table(rows))
    print(f"wrote {out} (reference: {len(samples)} samples)")
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
    parser.set_defaults(func=run_profile)


def run_profile(args):
    from ..fisher import load_fisher
    from ..guided.profile import write_profile
    from ..models import load_model

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out '{out}' is a file; give a folder")
    fisher, meta = load_fisher(args.fisher)
    # A profile reads the Fisher file: the model only gives shapes and dropout sites.
    loaded = load_model(args.model, device="cpu", dtype="float32", allow_new_head=True)
    title = f"{Path(loaded.source).name}, {meta.get('samples', '?')} samples"
    paths = write_profile(fisher, loaded.model, out, title=title)
    for what, path in paths.items():
        print(f"wrote {path}", file=sys.stdout)
    return 0
