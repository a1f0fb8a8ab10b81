"""Reading a checkpoint's weight files to identify them (for ``identity``): whole or sampled.

Whole (``file_tensors``): a SHA-256 over every stored byte of each tensor, so any edited weight
changes it.  Reading a whole checkpoint costs its size (517 MiB for SmolLM2-135M, 16 GB for an 8B
model in bfloat16), so each file's per-tensor digests are computed once per file version and kept
in the data home (``<data home>/fingerprints/``), keyed by the file's resolved path, size,
``mtime_ns``, ``ctime_ns`` and inode: a rewritten or replaced file is hashed again (``ctime`` moves
on every write and cannot be set back, unlike ``mtime``).  A data home that cannot be written only
means no cache.  See docs/identity.md.

Sampled (``sampled_file_tensors``, ``tensor_sample``): the stored bytes of 4096 elements of each
tensor (64 evenly spaced runs of 64), the fingerprint of version 1, kept for models that exist
only in memory and to read files that recorded a version-1 fingerprint.
"""

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

import torch

from .files import json_text

RUNS, RUN_LENGTH = 64, 64
SAMPLES_PER_TENSOR = RUNS * RUN_LENGTH  # elements hashed per tensor by the sampled scheme
CACHE_SCHEME = "landscape-tensor-sha256/1"
_CHUNK = 16 << 20  # bytes read (and hashed) at a time

# safetensors' dtype codes; torch tensors from .bin files and parameters are named the same way.
TORCH_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}
_ITEM_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}

Entry = Tuple[str, str, list, bytes]  # (name, dtype code, shape, digest or sampled bytes)


def weight_files(folder: Path, adapter: bool) -> List[Path]:
    """The checkpoint files of ``folder`` as transformers (or PEFT, for an ``adapter``) picks them.

    A sharded index's files, else the single file, safetensors before pickled ``.bin``.
    """
    names = ["adapter_model.safetensors", "adapter_model.bin"] if adapter else \
        ["model.safetensors", "pytorch_model.bin"]
    for name in names:
        index = folder / f"{name}.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            return [folder / file for file in sorted(set(weight_map.values()))]
        if (folder / name).is_file():
            return [folder / name]
    return [] if adapter else sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("adapter_"))


# ----------------------------------------------------------------------------- whole
def file_tensors(path: Path) -> List[Entry]:
    """(name, dtype code, shape, SHA-256 of all its stored bytes) of every tensor of a weight file.

    From the cache when this version of the file was hashed before, else read whole and cached.
    """
    stat = os.stat(path)
    key = {"scheme": CACHE_SCHEME, "path": str(Path(path).resolve()), "size": stat.st_size,
           "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino}
    cached = _cached(key)
    if cached is not None:
        return cached
    reader = _bin_whole if Path(path).suffix == ".bin" else _safetensors_whole
    entries = [(name, code, list(shape), digest) for name, code, shape, digest in reader(Path(path))]
    _store(key, entries)
    return entries


def _cache_file(key: dict) -> Optional[Path]:
    from .datahome import data_home

    try:
        home = data_home()
    except Exception:  # noqa: BLE001 - no data home: no cache
        return None
    return home / "fingerprints" / (hashlib.sha1(key["path"].encode()).hexdigest() + ".json")


def _cached(key: dict) -> Optional[List[Entry]]:
    path = _cache_file(key)
    try:
        record = json.loads(path.read_text()) if path is not None else None
        if not isinstance(record, dict) or record.get("key") != key:
            return None
        return [(str(n), str(c), [int(s) for s in shape], bytes.fromhex(d)) for n, c, shape, d in record["tensors"]]
    except (OSError, ValueError, TypeError, KeyError):  # absent, of another version, or damaged: hash again
        return None


def _store(key: dict, entries: List[Entry]) -> None:
    path = _cache_file(key)
    if path is None:
        return
    record = {"key": key, "tensors": [[n, c, shape, d.hex()] for n, c, shape, d in entries]}
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json_text(record))
        os.replace(tmp, path)  # whole or absent: a reader never sees half a record
        _prune(path.parent)
    except OSError:  # an unwritable data home only costs the next run another read
        tmp.unlink(missing_ok=True)


KEEP_RECORDS = 256  # beyond this many, records of files that no longer exist are removed


def _prune(folder: Path) -> None:
    """Remove the records of weight files that are gone, once there are more than ``KEEP_RECORDS``.

    One record per weight file path (a few KB; temporary folders add up), so the cache stays small.
    """
    records = sorted(folder.glob("*.json"))
    if len(records) <= KEEP_RECORDS:
        return
    for record in records:
        try:
            if not Path(json.loads(record.read_text())["key"]["path"]).exists():
                record.unlink()
        except (OSError, ValueError, KeyError, TypeError):  # damaged: a record nobody can use
            record.unlink(missing_ok=True)


def _header(handle) -> Tuple[int, dict]:
    length = struct.unpack("<Q", handle.read(8))[0]
    return length, json.loads(handle.read(length))


def _safetensors_whole(path: Path) -> List[Entry]:
    """Every tensor hashed whole, several at a time (hashlib and ``os.pread`` release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    with open(path, "rb") as handle:
        length, header = _header(handle)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        tensors = sorted(((name, e) for name, e in header.items() if name != "__metadata__"),
                         key=lambda item: int(item[1]["data_offsets"][0]))  # in file order: reads move forward

        def digest_of(item):
            name, entry = item
            start, end = (8 + length + int(v) for v in entry["data_offsets"])
            digest = hashlib.sha256()
            while start < end:
                chunk = os.pread(handle.fileno(), min(_CHUNK, end - start), start)
                if not chunk:
                    raise ValueError(f"tensor '{name}' runs past the end of the file")
                digest.update(chunk)
                start += len(chunk)
            return name, str(entry["dtype"]), entry["shape"], digest.digest()

        workers = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(digest_of, tensors))


def _load_bin(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # an old (non-zip) serialization cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def _bin_whole(path: Path) -> Iterable[Entry]:
    for name, tensor in _load_bin(path).items():
        if torch.is_tensor(tensor):
            data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            yield name, code_of(tensor), list(tensor.shape), hashlib.sha256(memoryview(data)).digest()


def code_of(tensor: torch.Tensor) -> str:
    """The safetensors dtype code of a tensor's dtype."""
    return TORCH_CODES.get(tensor.dtype, str(tensor.dtype))


# ----------------------------------------------------------------------------- sampled
def _runs(count: int) -> List[tuple]:
    """The hashed elements of a tensor of ``count`` elements, as (first element, length) runs.

    All of a tensor of at most ``SAMPLES_PER_TENSOR`` elements, else ``RUNS`` evenly spaced runs of
    ``RUN_LENGTH`` consecutive elements: a cold read touches at most 2 pages per run.
    """
    if count <= SAMPLES_PER_TENSOR:
        return [(0, count)] if count else []
    return [((i * count) // RUNS, RUN_LENGTH) for i in range(RUNS)]


def tensor_sample(tensor: torch.Tensor) -> bytes:
    """The stored bytes of the sampled elements of a tensor (version 1)."""
    flat = tensor.detach().reshape(-1)
    return b"".join(flat[first:first + count].cpu().contiguous().view(torch.uint8).numpy().tobytes()
                    for first, count in _runs(flat.numel()))


def sampled_file_tensors(path: Path) -> Iterable[Entry]:
    """(name, dtype code, shape, sampled bytes) of every tensor of a weight file (version 1).

    Safetensors: the header and the sampled runs only (``os.pread``, readahead off).
    """
    if Path(path).suffix == ".bin":
        for name, tensor in _load_bin(path).items():
            if torch.is_tensor(tensor):
                yield name, code_of(tensor), tuple(tensor.shape), tensor_sample(tensor)
        return
    with open(path, "rb") as handle:
        length, header = _header(handle)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            code, shape = str(entry["dtype"]), entry["shape"]
            size = _ITEM_SIZES.get(code, 1)
            start, end = (int(v) for v in entry["data_offsets"])
            base = 8 + length + start
            sample = b"".join(os.pread(handle.fileno(), count * size, base + first * size)
                              for first, count in _runs((end - start) // size))
            yield name, code, shape, sample
