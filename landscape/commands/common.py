"""Argument groups that several subcommands share, and their translation to API calls."""

import os


def add_model_args(parser):
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None,
                       help="Hugging Face model id or local from_pretrained folder (default: the embedded model)")
    group.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    group.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default: float32)")


def add_corpus_args(parser, max_samples_default=None, batch_size_default=16):
    group = parser.add_argument_group("corpus")
    group.add_argument("--corpus", default=None,
                       help="text file, JSONL file, HF dataset name or save_to_disk folder "
                            "(default: the embedded corpus)")
    group.add_argument("--fraction", type=float, default=None,
                       help="seeded document-level fraction of the corpus to use, in (0, 1]")
    group.add_argument("--max-samples", type=int, default=max_samples_default,
                       help="at most this many packed sequences")
    group.add_argument("--seq-len", type=int, default=128, help="tokens per packed sequence (default: 128)")
    group.add_argument("--batch-size", type=int, default=batch_size_default)
    group.add_argument("--seed", type=int, default=0, help="seed for sub-sampling and masking (default: 0)")


def load_model_from_args(args):
    from ..models import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype)


def join_torchrun(device="auto"):
    """Join the torch.distributed group when started by torchrun (NCCL on GPUs, gloo on CPU).

    Returns (device for this rank, rank, world size); (device, 0, 1) outside torchrun.  On GPUs each
    rank takes cuda:LOCAL_RANK.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return device, 0, 1
    import torch
    import torch.distributed as dist

    from ..models import resolve_device

    if resolve_device(device).type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if str(device).startswith("cuda") else "gloo")
    return device, dist.get_rank(), world
