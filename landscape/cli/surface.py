"""directions, surface."""

from .. import adapters
from ..adapters import ADAPTER_SUBSET
from ..errors import UsageError
from ..files import check_output_path
from . import options
from .common import (
    add_corpus_args,
    add_model_args,
    add_new_head_arg,
    add_overwrite_arg,
    add_shard_args,
    add_threads_arg,
    claim,
    model_id,
)
from .hessian import add_directions_args, other_directions


def register(subparsers):
    _register_directions(subparsers)
    _register_surface(subparsers)


# ----------------------------------------------------------------------------- directions
def _register_directions(subparsers):
    parser = subparsers.add_parser(
        "directions", help="filter-normalized, Fisher-masked random directions",
        description="Seeded Gaussian directions, normalized per filter/layer and optionally masked by "
                    "Fisher scores, written to an HDF5 direction file.")
    parser.add_argument("--model", default=None,
                        help="Hugging Face model id, local from_pretrained folder or PEFT adapter folder (default: "
                             "the embedded model)")
    parser.add_argument("--fisher", default=None, help="Fisher file (safetensors) for --subset")
    parser.add_argument("--subset", default=None,
                        help="top:K | bottom:K | random:K | all (K in percent, (0, 100]), or adapter: only the "
                             "parameters of a PEFT adapter --model (its LoRA factors and saved head; no --fisher) "
                             "(default: all)")
    parser.add_argument("--mask-granularity", choices=("global", "tensor"), default="global",
                        help="rank elements over the whole model (global) or inside each tensor (tensor, as the "
                             "paper's code does)")
    parser.add_argument("--norm", choices=("filter", "layer", "none"), default="filter",
                        help="rescale each filter (output unit) or each whole tensor of a direction to the norm of "
                             "the same part of the weights (Li et al.), or leave the Gaussian as drawn")
    parser.add_argument("--ignore", choices=("biasbn", "none"), default="biasbn",
                        help="biasbn: 1-D tensors (biases, LayerNorm) are not perturbed; none: every tensor is")
    parser.add_argument("--seed", type=options.SEED, default=0, help="seed of the directions and of random masks")
    parser.add_argument("--dims", type=int, choices=(1, 2), default=2,
                        help="number of directions: 1 for a 1D curve, 2 for a 2D surface")
    parser.add_argument("--orthogonalize", action="store_true",
                        help="make the second direction orthogonal to the first (default: two independent draws)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="load the weights in this dtype and round the directions to it: a bfloat16 model's "
                             "surface then holds exactly these values, and the file is about half the size")
    parser.add_argument("--out", required=True, help="direction file to write (.h5)")
    add_shard_args(parser)
    add_new_head_arg(parser)
    add_overwrite_arg(parser)
    add_directions_args(parser)
    add_threads_arg(parser)
    parser.set_defaults(func=run_directions)


def run_directions(args):
    from ..fisher import check_fisher_model, fisher_metadata
    from ..identity import MODEL_KEY, model_fingerprint
    from ..models import load_model
    from ..runtime import join_torchrun
    from ..sharding import shard_layout, shard_model
    from ..surface import directions

    out = check_output_path(args.out, "--out", H5_SUFFIXES)
    claim(args, out, "directions")
    if other_directions(args, out):  # --kind hessian, --to, --trajectory
        return 0
    subset = args.subset or "all"
    if subset == ADAPTER_SUBSET:
        if args.fisher:
            raise UsageError(f"--subset {ADAPTER_SUBSET} selects the adapter's parameters by name: --fisher does not "
                             "apply")
    else:
        directions.parse_mask_spec(subset)
    if subset not in ("all", ADAPTER_SUBSET) and not args.fisher:
        raise UsageError(f"--subset {subset} needs --fisher F.safetensors")
    _, rank, _ = join_torchrun("cpu")
    layout = shard_layout(args.shard_size)
    # Random directions need only the weights' shapes; masking them by a Fisher measures the head.
    loaded = load_model(args.model, device="cpu", dtype=args.dtype,
                        allow_new_head=args.allow_new_head or not args.fisher)
    weights = model_fingerprint(loaded)  # of the checkpoint's files, unchanged by sharding
    if args.fisher:
        check_fisher_model(args.fisher, fisher_metadata(args.fisher), weights, args.model)
    shard_model(loaded.model, layout)
    settings = {"model": model_id(loaded), "fisher": str(args.fisher or ""), MODEL_KEY: weights,
                **adapters.record(loaded)}
    if not args.overwrite:
        directions.check_existing_directions(out, dict(
            settings, seed=args.seed, norm=args.norm, ignore=args.ignore, subset=subset, dims=args.dims,
            mask_granularity=args.mask_granularity, orthogonal=args.orthogonalize))
    attrs = directions.write_directions(
        out, loaded.model, dims=args.dims, seed=args.seed, norm=args.norm, ignore=args.ignore,
        fisher=args.fisher, subset=subset, granularity=args.mask_granularity, orthogonal=args.orthogonalize,
        precision=args.dtype, settings=settings, progress=True)
    if rank == 0:
        share = 100.0 * attrs["n_selected"] / max(1, attrs["n_parameters"])
        print(f"wrote {out}: {args.dims} direction(s), norm={args.norm}, subset={subset}, "
              f"{attrs['n_selected']:,} of {attrs['n_parameters']:,} parameters perturbed ({share:.2f}%), "
              f"{out.stat().st_size / 2**20:.1f} MiB")
    return 0


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
