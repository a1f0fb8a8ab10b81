"""surface."""

import os

from ..errors import UsageError
from ..files import check_output_path
from . import options
from .common import (
    add_corpus_args,
    add_model_args,
    add_new_head_arg,
    add_overwrite_arg,
    add_shard_args,
    claim,
    load_model_from_args,
    model_id,
)


def register(subparsers):
    _register_surface(subparsers)


H5_SUFFIXES = (".h5", ".hdf5")


# ----------------------------------------------------------------------------- surface
def _register_surface(subparsers):
    parser = subparsers.add_parser(
        "surface", help="loss grid along directions (resumable HDF5)",
        description="Loss and token accuracy at every point of a 1D or 2D grid along the directions of a "
                    "direction file. Rerunning the same command resumes; under torchrun the grid is "
                    "sharded over ranks.")
    add_model_args(parser)
    add_new_head_arg(parser)
    add_corpus_args(parser, max_samples_default=64)
    parser.add_argument("--directions", required=True, help="direction file from `landscape directions`")
    parser.add_argument("--x", type=options.RANGE, default="-1:1:21", help="MIN:MAX:NUM along the first direction")
    parser.add_argument("--y", type=options.RANGE, default=None,
                        help="MIN:MAX:NUM along the second direction (default: -1:1:21 for a 2-direction file)")
    parser.add_argument("--one-d", action="store_true",
                        help="only the x direction of a 2-direction file (default: both directions)")
    parser.add_argument("--points-per-pass", type=options.POSITIVE_INT, default=1,
                        help="grid points per vmapped forward pass; more helps on a GPU")
    parser.add_argument("--flush-seconds", type=options.NON_NEGATIVE, default=2.0,
                        help="seconds between rewrites of the HDF5 file; every point is journaled at once")
    parser.add_argument("--stream-directions", action="store_true",
                        help="keep the directions in host memory in float32 and copy them to the device at each "
                             "point: beside the model the device holds only a copy of its perturbed weights "
                             "(default: the directions are held on the device in the model's dtype)")
    add_shard_args(parser)
    add_overwrite_arg(parser)
    parser.add_argument("--out", required=True, help="surface file to write or resume (.h5)")
    parser.set_defaults(func=run_surface)


def run_surface(args):
    from ..data.corpus import describe_framing, load_batches
    from ..identity import MODEL_KEY, model_fingerprint
    from ..runtime import join_torchrun
    from ..sharding import shard_layout
    from ..surface import compute_surface_file, directions, parse_range
    from ..surface.file import check_grid_size

    out = check_output_path(args.out, "--out", H5_SUFFIXES)
    claim(args, out, "surface")
    xs = _grid(args.x, "x")
    ys = _grid(args.y, "y") if args.y else None
    if args.one_d and ys is not None:
        raise UsageError("--one-d and --y contradict each other; drop one")
    if args.points_per_pass < 1:
        raise UsageError(f"--points-per-pass must be at least 1, got {args.points_per_pass}")
    if not args.one_d and ys is None and directions.count_directions(args.directions) == 2:
        ys = parse_range("-1:1:21")
    check_grid_size(xs, ys)  # before anything heavy is loaded
    device, _, _ = join_torchrun(args.device)
    layout = shard_layout(args.shard_size)
    loaded = load_model_from_args(args, device=device, layout=layout)
    batches = load_batches(loaded, corpus=args.corpus, fraction=args.fraction, max_samples=args.max_samples,
                           seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed, bos=args.bos)
    settings = {"model": model_id(loaded), "corpus": str(args.corpus or "embedded"),
                "fraction": args.fraction, "max_samples": args.max_samples, "seq_len": args.seq_len,
                "corpus_seed": args.seed, "precision": str(args.dtype).lower(),
                "framing": describe_framing(loaded.tokenizer, args.bos), MODEL_KEY: model_fingerprint(loaded)}
    info = {"batch_size": args.batch_size, "device": str(next(loaded.model.parameters()).device),
            "world_size": int(os.environ.get("WORLD_SIZE", "1")), "points_per_pass": args.points_per_pass,
            "shard_size": args.shard_size}
    result = compute_surface_file(out, loaded.model, args.directions, batches, xs, ys, settings=settings,
                                  overwrite=args.overwrite, points_per_pass=args.points_per_pass,
                                  flush_seconds=args.flush_seconds, info=info, stream=args.stream_directions)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {result['path']}: {result['computed']} point(s) computed now, {result['total']} in the grid")
    return 0


def _grid(text, axis):
    from ..surface import parse_range

    try:
        return parse_range(text, axis)
    except UsageError as err:
        raise UsageError(f"--{axis}: {err}") from None
