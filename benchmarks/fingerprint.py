"""Benchmark: seconds to fingerprint a model checkpoint (``identity.source_fingerprint``).

The fingerprint (version 2) hashes every stored byte of every tensor once per file version, then
reads the per-tensor digests from its cache in the data home.  For each folder this prints:

* first: no cache (an empty data home) and the weight files evicted from the page cache
  (``posix_fadvise DONTNEED``: a cold read, as on a first run), with the hashing throughput;
* first, warm: no cache, the files in the page cache (the CPU side of hashing);
* cached: the median of 5 runs with the cache (every later run);
* the sampled version-1 fingerprint, for comparison (what the cache replaces);
* an extrapolation to an 8B checkpoint (16 GB in bfloat16) at the cold and warm throughputs.

``--synthetic-8b`` also times a sparse safetensors file (no disk space used) with the 291 tensor
names and shapes of Llama-3-8B in bfloat16 (16 GB apparent size): its holes read as zeros without
a disk, so it measures hashing 16 GB on this CPU (it takes a while).

    python benchmarks/fingerprint.py "$(landscape where --checkpoint smollm2-135m-instruct)"
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

from landscape import identity, weights_hash  # noqa: E402


def _evict(folder):
    for path in Path(folder).glob("*.safetensors"):
        with open(path, "rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _seconds(call):
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def _time(folder):
    """{first, first_warm, cached, sampled} seconds for one folder."""
    times = {}
    with tempfile.TemporaryDirectory() as home:
        os.environ["LANDSCAPE_DATA"] = home  # an empty cache
        _evict(folder)
        times["first"] = _seconds(lambda: identity.folder_fingerprint(folder))
        times["cached"] = statistics.median(_seconds(lambda: identity.folder_fingerprint(folder)) for _ in range(5))
    with tempfile.TemporaryDirectory() as home:
        os.environ["LANDSCAPE_DATA"] = home  # empty again, the files now in the page cache
        times["first_warm"] = _seconds(lambda: identity.folder_fingerprint(folder))
    times["sampled"] = statistics.median(_seconds(lambda: identity._folder_digest(Path(folder), whole=False))
                                         for _ in range(5))
    return times


def _report(name, tensors, size, t):
    cold, warm = size / t["first"], size / t["first_warm"]
    print(f"{name}: {tensors} tensors, {size / 2**20:.0f} MiB: first {t['first']:.2f} s ({cold / 2**20:.0f} MiB/s, "
          f"cold), first with the files in the page cache {t['first_warm']:.2f} s ({warm / 2**20:.0f} MiB/s), "
          f"cached {t['cached'] * 1e3:.1f} ms; sampled (version 1) {t['sampled'] * 1e3:.1f} ms")
    return cold, warm


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
    eight_b = 16.06e9  # bytes of Llama-3-8B's weights in bfloat16
    for folder in args.folders:
        files = sorted(Path(folder).glob("*.safetensors"))
        tensors = sum(1 for path in files for _ in weights_hash.sampled_file_tensors(path))
        size = sum(p.stat().st_size for p in files)
        cold, warm = _report(Path(folder).name, tensors, size, _time(folder))
        print(f"  extrapolated to an 8B checkpoint (16 GB bf16): first {eight_b / cold:.0f} s from a cold disk "
              f"like this one, {eight_b / warm:.0f} s from the page cache; cached: about the same as here "
              f"(a stat per file and one small JSON per file)")
    if args.synthetic_8b:
        with tempfile.TemporaryDirectory() as folder:
            tensors, size = _sparse_checkpoint(folder)
            _report("sparse Llama-3-8B shapes (holes: no disk read)", tensors, size, _time(folder))


if __name__ == "__main__":
    main()
