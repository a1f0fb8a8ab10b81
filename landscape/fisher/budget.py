"""How much memory a Fisher pass may use: per-sample gradients at a time, and activations.

The running sums are 4 bytes per parameter and cannot shrink; everything else is bounded so that
it stays a small share beside them on a large model, while a small model still runs whole batches
and whole tensors (there, the bounds' floors apply and memory is no concern).
"""

from typing import Optional

import torch

DEFAULT_CHUNK_MB = 256
# Per-sample gradients: DEFAULT_CHUNK_MB, lowered to this many bytes per parameter for models
# under about 1B parameters, but never below MIN_CHUNK_MB.
CHUNK_BYTES_PER_PARAM = 0.25
MIN_CHUNK_MB = 64
# Activations of one forward and backward: this many bytes per parameter, at least MIN_PASS_MB
# (which keeps the embedded model's benchmark batches whole).
PASS_BYTES_PER_PARAM = 0.5
MIN_PASS_MB = 192


def _parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def default_chunk_mb(model) -> float:
    """The default per-sample gradient budget of ``model``, in MB (see the constants above)."""
    return max(MIN_CHUNK_MB, min(DEFAULT_CHUNK_MB, CHUNK_BYTES_PER_PARAM * _parameters(model) / 2**20))


def default_pass_mb(model) -> float:
    """The activation budget of one forward and backward of ``model``, in MB."""
    return max(MIN_PASS_MB, PASS_BYTES_PER_PARAM * _parameters(model) / 2**20)


def activation_bytes(model, kind, hooked) -> tuple:
    """Rough activation bytes of a Fisher pass: (per token, per target token).

    Per token, each hooked module's input, kept once by the hook and about once more by autograd;
    per target token (the rows language models project onto the vocabulary), the float32 logits,
    log-probabilities and their gradient.
    """
    width = 0
    for module, rule, _ in hooked.values():
        if not rule.input_is_index:
            weight = getattr(module, "weight", None)
            width += getattr(module, "in_features", None) or (weight.shape[0] if weight is not None else 0)
    size = next(model.parameters()).element_size()
    decoder = model.get_output_embeddings() if kind in ("mlm", "causal", "seq2seq") else None
    vocab = decoder.weight.shape[0] if decoder is not None and getattr(decoder, "weight", None) is not None else 0
    return 2 * size * width, 12 * vocab


def samples_per_pass(batch: dict, costs: tuple, budget_bytes: int) -> int:
    """Samples per forward and backward: the whole batch unless its activations would exceed the budget.

    Args:
        batch: (B, T) tensors with ``labels`` (-100 where nothing is predicted; a classifier's
            labels are (B,)).
        costs: what ``activation_bytes`` returns for the model.
        budget_bytes: the activation budget of one pass, in bytes.

    Returns:
        The number of samples per pass, in [1, B].
    """
    labels = batch["labels"]
    size = labels.shape[0]
    length = max((v.shape[1] for v in batch.values() if torch.is_tensor(v) and v.dim() >= 2), default=1)
    targets = int((labels != -100).sum()) / max(1, size)
    per_sample = length * costs[0] + targets * costs[1]
    return max(1, min(size, int(budget_bytes // max(1.0, per_sample))))


def row_numel(param) -> int:
    """Elements in one row (dim 0 slice) of ``param``."""
    return max(1, param.numel() // max(1, param.shape[0])) if param.dim() else 1


def chunk_and_block(size, rows, row_numel, budget, cache=None):
    """Chunking of per-sample gradients: (samples per chunk, rows per block).

    Chosen so that chunk x block x row_numel <= budget elements where possible: whole tensors
    while one sample's gradient fits, else one sample and row blocks.  With ``cache`` (on a CPU),
    those row blocks hold at most ``cache`` elements: each block is squared and summed while it is
    still in the CPU's cache, instead of three passes over main memory (``CACHE_BLOCK_ELEMENTS``).

    Args:
        size: samples in the batch.
        rows: rows of the parameter.
        row_numel: elements per row.
        budget: the element budget.
        cache: the elements of a cache-sized block, or None (no cache blocks: a GPU).

    Returns:
        (samples per chunk, rows per block).
    """
    numel = rows * row_numel
    chunk, block = (max(1, budget // numel), rows) if numel <= budget else (1, max(1, budget // row_numel))
    if cache is not None and numel > budget:
        # Only tensors already in row blocks get smaller ones: the rounding of a product can
        # depend on its shape, and whole tensors and sample chunks stay what they were.
        block = max(1, min(block, cache // row_numel))
    return chunk, block


# Per-sample gradients on a CPU are formed in blocks of about this many elements (4 MiB of
# float32): SmolLM2's 49152 x 576 tied embedding, one sample of 64 tokens at a time, formed, squared
# and summed for 4 samples in 0.41 s in such blocks against 0.62 s in 64 MB blocks (1 thread on this
# project's CPU, 1 MiB of L2 per core and 32 MiB of L3; the same bits).
CACHE_BLOCK_ELEMENTS = 1 << 20


# Seconds per (sample token x parameter) of a Fisher pass on a CPU: SmolLM2-135M-Instruct's rate on
# this project's 2-core machine (4999 samples of 128 tokens, 53 min: issue 30), the fastest per element
# seen (the embedded model's is about 4x slower), so the estimate below is a lower bound.
CPU_SECONDS_PER_TOKEN_PARAMETER = 3.7e-11
LONG_SAMPLE_SECONDS = 300.0


def long_sample_note(model, samples: int, seq_len: int) -> Optional[str]:
    """One line saying that a Fisher pass on a CPU will take long, with the options that shorten it.

    Args:
        model: the model (on its device: only a CPU pass is estimated).
        samples: the samples this process will run.
        seq_len: tokens per sample.

    Returns:
        The line, or None when the estimate is under ``LONG_SAMPLE_SECONDS`` or the model is not
        on the CPU.
    """
    if next(model.parameters()).device.type != "cpu":
        return None
    parameters = _parameters(model)
    seconds = CPU_SECONDS_PER_TOKEN_PARAMETER * samples * seq_len * parameters
    if seconds < LONG_SAMPLE_SECONDS:
        return None
    return (f"note: {samples:,} samples of {seq_len} tokens on a {parameters / 1e6:.1f}M-parameter model take "
            f"{seconds / 60:.0f} min or more on this CPU; --max-samples N or --fraction F takes a smaller sample")
