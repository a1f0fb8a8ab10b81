"""Benchmark: seconds to fingerprint a model checkpoint (``identity.source_fingerprint``).

For each folder: once with the weight files evicted from the page cache (``posix_fadvise
DONTNEED``: a cold read, as on a first run), then the median of 5 warm runs (as after the stage
has loaded the model).  ``--synthetic-8b`` also times a sparse safetensors file (no disk space
used) with the 291 tensor names and shapes of Llama-3-8B in bfloat16 (16 GB apparent size): the
cost follows the number of tensors, not their size, since each tensor contributes 4096 elements.

    python benchmarks/fingerprint.py ~/.cache/landscape/checkpoints/smollm2-135m-instruct --synthetic-8b
"""

import argparse
import json
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from landscape import identity  # noqa: E402


def _evict(folder):
    for path in Path(folder).glob("*.safetensors"):
        with open(path, "rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _time(folder):
    _evict(folder)
    start = time.perf_counter()
    identity.folder_fingerprint(folder)
    cold = time.perf_counter() - start
    warm = []
    for _ in range(5):
        start = time.perf_counter()
        identity.folder_fingerprint(folder)
        warm.append(time.perf_counter() - start)
    return cold, statistics.median(warm)


def _llama3_8b_shapes():
    hidden, inter, vocab, layers, kv = 4096, 14336, 128256, 32, 1024
    shapes = {"model.embed_tokens.weight": [vocab, hidden], "lm_head.weight": [vocab, hidden],
              "model.norm.weight": [hidden]}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": [hidden, hidden], p + "self_attn.k_proj.weight": [kv, hidden],
                       p + "self_attn.v_proj.weight": [kv, hidden], p + "self_attn.o_proj.weight": [hidden, hidden],
                       p + "mlp.gate_proj.weight": [inter, hidden], p + "mlp.up_proj.weight": [inter, hidden],
                       p + "mlp.down_proj.weight": [hidden, inter], p + "input_layernorm.weight": [hidden],
                       p + "post_attention_layernorm.weight": [hidden]})
    return shapes


def _sparse_checkpoint(folder):
    header, offset = {}, 0
    for name, shape in sorted(_llama3_8b_shapes().items()):
        size = 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path = Path(folder) / "model.safetensors"
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        handle.truncate(8 + len(text) + offset)  # sparse: the data reads as zeros, takes no disk
    return len(header), offset


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", help="from_pretrained folders with safetensors weights")
    parser.add_argument("--synthetic-8b", action="store_true", help="also a sparse Llama-3-8B-shaped checkpoint")
    args = parser.parse_args()
    for folder in args.folders:
        tensors = sum(1 for _ in identity._safetensors_entries(next(Path(folder).glob("*.safetensors"))))
        size = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")) / 1e9
        cold, warm = _time(folder)
        print(f"{Path(folder).name}: {tensors} tensors, {size:.2f} GB: cold {cold:.3f} s, warm {warm:.3f} s")
    if args.synthetic_8b:
        with tempfile.TemporaryDirectory() as folder:
            tensors, size = _sparse_checkpoint(folder)
            cold, warm = _time(folder)
            print(f"sparse Llama-3-8B shapes: {tensors} tensors, {size / 1e9:.2f} GB: first {cold:.3f} s, "
                  f"warm {warm:.3f} s (sparse: no disk read)")


if __name__ == "__main__":
    main()
