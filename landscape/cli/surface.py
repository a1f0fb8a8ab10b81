"""surface."""

from . import options
from .common import add_corpus_args, add_model_args, add_new_head_arg, add_overwrite_arg, add_shard_args


def register(subparsers):
    _register_surface(subparsers)


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
    parser.add_argument("--eval-corpus", default=None,
                        help="a held-out corpus (the forms --corpus takes), sampled with the same --fraction, "
                             "--max-samples, --seq-len, --seed and --bos: its loss and token accuracy at every point "
                             "are written as test_loss and test_acc, in the same pass over the grid (default: "
                             "train_loss and train_acc only)")
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
    from ..runtime import rank_and_world
    from ..surface import run_surface as surface_stage

    result = surface_stage(args.out, args.directions, args.model, args.corpus, x=args.x, y=args.y, one_d=args.one_d,
                           fraction=args.fraction, max_samples=args.max_samples, seq_len=args.seq_len,
                           batch_size=args.batch_size, seed=args.seed, bos=args.bos, dtype=args.dtype,
                           device=args.device, allow_new_head=args.allow_new_head, shard_size=args.shard_size,
                           points_per_pass=args.points_per_pass, flush_seconds=args.flush_seconds,
                           stream_directions=args.stream_directions, eval_corpus=args.eval_corpus,
                           overwrite=args.overwrite)
    if rank_and_world()[0] == 0:
        print(f"wrote {result['path']}: {result['computed']} point(s) computed now, {result['total']} in the grid")
    return 0
