"""Argument groups that several subcommands share, and their translation to API calls."""

import argparse

from .. import checks
from ..errors import UsageError
from ..runtime import THREADS_HELP, parse_threads
from . import options


class _Threads:
    """argparse ``type=`` of ``--threads``: auto, or a count in ``domain`` (read by the option tests)."""

    form, domain, __name__ = "number", checks.int_in(0, checks.THREADS_MAX), "auto|N"

    def __call__(self, text):
        try:
            return parse_threads(text)
        except UsageError as err:
            raise argparse.ArgumentTypeError(str(err).split(": ", 1)[-1]) from None


_threads = _Threads()


def add_threads_arg(parser):
    """``--threads`` (default auto) of every command that runs a model; ``cli.main`` applies it after
    parsing (``runtime.apply_threads``), so that no torch is imported to parse the arguments."""
    group = parser.add_argument_group("CPU threads")
    group.add_argument("--threads", type=_threads, default="auto", metavar="auto|N", help=THREADS_HELP)


def add_model_args(parser):
    add_threads_arg(parser)
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None,
                       help="Hugging Face model id, local from_pretrained folder, or PEFT adapter folder (base "
                            "resolved as PEFT does; needs landscape[lora]) (default: the embedded model)")
    group.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    group.add_argument("--dtype", default="float32", help="float32 | tf32 | bfloat16 | float16")


def add_corpus_args(parser, max_samples_default=None, batch_size_default=16):
    group = parser.add_argument_group("corpus")
    group.add_argument("--corpus", default=None,
                       help="text file, JSONL file, HF dataset name or save_to_disk folder "
                            "(default: the embedded corpus)")
    group.add_argument("--fraction", type=options.FRACTION, default=None,
                       help="seeded document-level fraction of the corpus to use, in (0, 1] (default: all of it)")
    no_cap = "" if max_samples_default else " (default: all that the corpus gives)"
    group.add_argument("--max-samples", type=options.POSITIVE_INT, default=max_samples_default,
                       help=f"at most this many packed sequences{no_cap}")
    group.add_argument("--seq-len", type=options.SEQ_LEN, default=128, help="tokens per packed sequence")
    group.add_argument("--batch-size", type=options.POSITIVE_INT, default=batch_size_default,
                       help="packed sequences per forward pass")
    group.add_argument("--seed", type=options.SEED, default=0, help="seed for sub-sampling and masking")
    group.add_argument("--bos", choices=("auto", "yes", "no"), default="auto",
                       help="BOS token first in every sample: auto = as the model's tokenizer frames a text, "
                            "yes = always, no = never")


def add_shard_args(parser):
    parser.add_argument("--shard-size", type=options.POSITIVE_INT, default=1,
                        help="under torchrun, shard the model over groups of this many ranks with FSDP2 (each rank "
                             "holds 1/K of it); the world / K groups split the work; 1 = no sharding")


def add_new_head_arg(parser):
    parser.add_argument("--allow-new-head", action="store_true",
                        help="accept a checkpoint without its pretraining head (transformers then initializes "
                             "it randomly: the numbers measure that random head)")


def add_overwrite_arg(parser, help="replace an --out computed with other settings, or holding another kind of "
                                    "file (default: refuse)"):
    parser.add_argument("--overwrite", action="store_true", help=help)
