"""Benchmark: peak memory of each stage, in bytes per parameter above the loaded model.

Each stage runs in a fresh child process on the same tiny sample (8 sequences x 64 tokens of the
embedded corpus, one batch): the model alone (load, build the sample, one forward under
``torch.inference_mode``: the baseline), ``fisher``, ``directions`` (random, and ``--fisher F
--subset top:5``), a 2D 3x3 ``surface`` on each of those direction files (and with
``--stream-directions`` on the random one), ``hessian --top 1`` (at most 10 Hessian-vector
products), and the Hessian's three measures: ``hessian-top3`` (``--top 3 --max-iter 30``: past the
first thick restart of its 21-vector basis), ``hessian-trace`` (``--trace 4``) and
``hessian-spectrum`` (``--spectrum 1 --steps 40``); their Lanczos bases go to a temporary file
beyond ``--basis-mb`` (1024 MB), so on a model over ~13M parameters they show the file-backed path.
``--sample NxT`` changes the sample (e.g. ``2x32``, the size the Hessian's memory was first
measured at). ``--hvp difference`` gives the ``hessian`` rows the gradient-only product (the
default under ``--nproc`` above 1: a sharded Hessian takes no other, and only in float32). The peak is, on
CPU, the child's peak RSS from the moment its model is loaded (and sharded): the child resets the
kernel's high-water mark right after ``load_model`` and ``shard_model`` return, so the loader's
own transient peak, which is the same for every stage and can hide what a lean stage adds, is not
counted (the reset also lowers what ``os.wait4`` reports, so a checkout measured with this script
before and after a change is compared the same way), with glibc returning freed buffers of 1 MiB or more to the system
(``MALLOC_MMAP_THRESHOLD_``; see ``Runner``); on a GPU it is
``torch.cuda.max_memory_allocated()``. A stage's cost is (its peak - the baseline's peak) /
parameters, for each dtype; a stage whose subcommand has no ``--dtype`` runs in float32 and is
marked ``*``. Then, per stage, the extrapolation to 8B and 70B parameters: GiB = (bytes of the
model's dtype + bytes/param above the model) x N.

    python benchmarks/memory.py                       # embedded model and SmolLM2-135M if built
    python benchmarks/memory.py --model embedded --dtypes float32 --stages fisher,surface
    python benchmarks/memory.py --model DIR --sample 2x32 --stages hessian-top3,hessian-trace,hessian-spectrum
    python benchmarks/memory.py --repo /path/to/older/checkout --json before.json

``--repo DIR`` measures another checkout: children run with ``PYTHONPATH=DIR``. ``--nproc N
--shard-size K`` runs each stage, and the model alone (sharded), under ``torch.distributed.run``
with ``--shard-size K`` and reports the largest rank's peak: bytes per parameter per rank.

This process imports no torch: a child's ``ru_maxrss`` also counts the RSS its parent had when it
spawned it (measured: ``python -c pass`` spawned by a parent holding 1.5 GiB reports 1513 MiB).
"""

import argparse
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_SAMPLE = (8, 64)  # sequences x tokens, one batch


def sample_options(sample):
    """The stages' sample options for (sequences, tokens): one batch of all the sequences."""
    n, t = sample
    return ["--max-samples", str(n), "--seq-len", str(t), "--batch-size", str(n)]
GRID = ["--x=-0.1:0.1:3", "--y=-0.1:0.1:3"]
STAGES = ("fisher", "directions", "directions-top5", "surface", "surface-top5", "surface-stream", "hessian",
          "hessian-top3", "hessian-trace", "hessian-spectrum")
NEEDS = {"directions-top5": "fisher", "surface": "directions", "surface-top5": "directions-top5",
         "surface-stream": "directions"}
SAMPLED = {"fisher", "surface", "hessian"}  # subcommands that build a sample
DTYPE_BYTES = {"float32": 4, "tf32": 4, "bfloat16": 2, "float16": 2}
SCALES = {"8B": 8e9, "70B": 70e9}
EMBEDDED = "embedded"


# ------------------------------------------------------------------------------- child side
def child(spec):
    """Run one stage (the CLI in-process) or the model alone; write the result JSON (per rank)."""
    import torch

    if spec["mode"] == "random-llama":
        return random_llama(spec["folder"], *spec["shape"])
    _reset_peak_once_loaded()
    if spec["mode"] == "model":
        info, code = model_alone(spec), 0
    else:
        from landscape.cli import main

        info, code = {}, main(spec["argv"])
    import landscape

    info.update(landscape=landscape.__file__, after_load=_peak_since_reset(),
                cuda_peak=torch.cuda.max_memory_allocated() if torch.cuda.is_initialized() else None)
    rank = os.environ.get("RANK")
    Path(spec["result"] + (f".rank{rank}" if rank else "")).write_text(json.dumps(info))
    return code


def _reset_peak_once_loaded():
    """Reset this process's peak RSS (Linux: ``/proc/self/clear_refs``) when the model is in place:
    after ``load_model`` and again after ``shard_model``, which the stages call at run time.

    Loading has a transient peak of its own (reading the checkpoint, building the model, a rank
    holding the whole model before sharding it) that can exceed the model plus what a lean stage
    adds; measured from the whole process, such a stage would look free."""
    import landscape.models

    targets = [(landscape.models, "load_model")]
    try:
        import landscape.sharding

        targets.append((landscape.sharding, "shard_model"))
    except ImportError:  # a checkout from before sharding
        pass
    for module, name in targets:
        original = getattr(module, name)

        def wrapped(*args, _original=original, **kwargs):
            result = _original(*args, **kwargs)
            _clear_peak()
            return result
        setattr(module, name, wrapped)


def _clear_peak():
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux: the whole-process peak is all there is
        pass


def _peak_since_reset():
    """VmHWM in bytes (the peak RSS since the last reset), or None where /proc does not say."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def model_alone(spec):
    """Load the model as the stages do (sharded under torchrun with a shard size), build the same
    sample, run one forward; parameter count."""
    import torch

    from landscape.data.corpus import load_batches
    from landscape.models import load_model

    device = spec["device"]
    if spec.get("shard_size", 1) > 1:
        from landscape.runtime import join_torchrun
        from landscape.sharding import shard_layout, shard_model

        device, _, _ = join_torchrun(device)
        loaded = load_model(spec["model"], device="cpu", dtype=spec["dtype"])
        shard_model(loaded.model, shard_layout(spec["shard_size"]))
    else:
        loaded = load_model(spec["model"], device=device, dtype=spec["dtype"])
    n, t = spec.get("sample", DEFAULT_SAMPLE)
    batches = load_batches(loaded, max_samples=n, seq_len=t, batch_size=n,
                           device=next(loaded.model.parameters()).device)
    with torch.inference_mode():
        for batch in batches:
            loaded.model(**batch)
    n_params = sum(p.numel() for p in loaded.model.parameters())  # parameters() yields tied ones once
    print(f"{n_params} parameters")
    return {"n_params": n_params, "device": str(next(loaded.model.parameters()).device)}


def random_llama(folder, layers, hidden, vocab):
    """Write a random-weight Llama (``layers`` blocks of width ``hidden``, untied embedding and head over
    ``vocab`` tokens (at least the tokenizer's), heads of 64) with the embedded model's tokenizer to
    ``folder``: a model shaped like the ones people fine-tune, at a size this machine runs, without
    a download."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from landscape.datahome import EMBEDDED_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)
    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    config = LlamaConfig(vocab_size=max(vocab, len(tokenizer)), hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=512, bos_token_id=tokenizer.cls_token_id,
                         eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return 0


# ------------------------------------------------------------------------------ parent side
def spawn(argv, env, log):
    """(exit code, peak RSS in bytes, seconds) of one child; its stdout and stderr go to ``log``.

    wait4's ru_maxrss (KiB on Linux) is the child's own peak; for a launcher it is the max over the
    launcher and the children it reaped (measured: torchrun with ranks of 313 and 713 MiB reports
    713 MiB; with tiny ranks, 222 MiB, the launcher's own torch import)."""
    actions = [(os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
               (os.POSIX_SPAWN_DUP2, 1, 2)]
    start = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
    _, status, usage = os.wait4(pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024, time.perf_counter() - start


class Runner:
    """Spawns children that run ``repo``'s code, under torchrun when ``nproc`` > 1."""

    def __init__(self, args, work):
        self.work, self.nproc, self.shard_size = work, args.nproc, args.shard_size or args.nproc
        self.sample = args.sample
        # A sharded Hessian takes the gradient-only product only (docs/curvature.md, "Sharded").
        self.hvp = args.hvp or ("difference" if self.nproc > 1 else None)
        # glibc keeps freed blocks in per-thread heaps (arenas) and reuses them poorly across threads:
        # measured here, a sharded forward's all-gather buffers, freed block after block, grew the
        # RSS by the whole model although none was alive.  A fixed mmap threshold returns every
        # buffer of 1 MiB or more to the system when it is freed, so RSS shows what is alive (the
        # CUDA allocator's figures on a GPU need no such help).
        self.env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="1048576",
                        PYTHONPATH=os.pathsep.join(filter(None, [args.repo, os.environ.get("PYTHONPATH")])))
        self.helps = {}

    def run(self, spec, name, launcher=None):
        """Result dict of one child: rc, rss, cuda (max over ranks), seconds, error, child's info."""
        result = self.work / f"{name}.result.json"
        spec = dict(spec, result=str(result))
        me = [sys.executable, str(Path(__file__).resolve())]
        argv = (launcher or me) + ["--child", json.dumps(spec)]
        rc, rss, seconds = spawn(argv, self.env, self.work / f"{name}.log")
        infos = [json.loads(Path(p).read_text()) for p in glob.glob(f"{result}*")]
        cudas = [i["cuda_peak"] for i in infos if i.get("cuda_peak") is not None]
        after_load = [i["after_load"] for i in infos if i.get("after_load") is not None]
        out = dict(infos[0] if infos else {}, rc=rc, rss=rss, seconds=seconds, argv=spec.get("argv"),
                   cuda=max(cudas) if cudas else None, after_load=max(after_load) if after_load else None)
        out.pop("cuda_peak", None)
        if rc < 0:
            out["error"] = f"killed by {signal.Signals(-rc).name} at {rss / 2**20:.0f} MiB RSS (out of memory?)"
        elif rc != 0:
            out["error"] = error_line(self.work / f"{name}.log")
        return out

    def help_text(self, command):
        """``landscape COMMAND --help`` of the measured checkout (read once per subcommand)."""
        if command not in self.helps:
            self.run({"mode": "cli", "argv": [command, "--help"]}, f"help-{command}")
            self.helps[command] = (self.work / f"help-{command}.log").read_text()
        return self.helps[command]

    def launcher(self):
        """torchrun for this script, or None (the plain interpreter) for one process."""
        if self.nproc == 1:
            return None
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={self.nproc}",
                str(Path(__file__).resolve())]

    def baseline(self, model, device, dtype, name):
        """The model alone, loaded (and sharded) as the stages load it."""
        spec = {"mode": "model", "model": None if model == EMBEDDED else model, "device": device, "dtype": dtype,
                "shard_size": self.shard_size if self.nproc > 1 else 1, "sample": list(self.sample)}
        return self.run(spec, name, self.launcher())

    def stage(self, command, stage_args, name):
        """Run ``landscape COMMAND`` with the stage's arguments (plus --shard-size under torchrun)."""
        if self.nproc > 1:
            stage_args = stage_args + ["--shard-size", str(self.shard_size)]
        if command == "hessian" and self.hvp:
            stage_args = stage_args + ["--hvp", self.hvp]
        return self.run({"mode": "cli", "argv": [command] + stage_args}, name, self.launcher())


def error_line(log):
    """The log's first ``...error: ...`` line (the CLI's, a traceback's, a rank's before torchrun's
    summary), else its last line."""
    lines = [line.strip() for line in Path(log).read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line.lower()]
    return errors[0] if errors else (lines or ["(no output)"])[-1]


def stage_command(stage, files):
    """(subcommand, its arguments) of a stage; ``files``: this model and dtype's output paths."""
    dirs2 = ["--dims", "2"]
    return {
        "fisher": ("fisher", ["--out", files["fisher"]]),
        "directions": ("directions", dirs2 + ["--out", files["directions"]]),
        "directions-top5": ("directions", dirs2 + ["--fisher", files["fisher"], "--subset", "top:5",
                                                   "--out", files["directions-top5"]]),
        "surface": ("surface", ["--directions", files["directions"]] + GRID + ["--out", files["surface"]]),
        "surface-top5": ("surface", ["--directions", files["directions-top5"]] + GRID
                         + ["--out", files["surface-top5"]]),
        # directions in host memory: on a GPU the device holds the base copy only; on CPU the
        # host is the device, so this shows the float32 directions' host memory instead
        "surface-stream": ("surface", ["--directions", files["directions"], "--stream-directions"] + GRID
                           + ["--out", files["surface-stream"]]),
        "hessian": ("hessian", ["--top", "1", "--max-iter", "10", "--out", files["hessian"]]),
        # 30 products: past the first thick restart (the basis holds 21 vectors for --top 3)
        "hessian-top3": ("hessian", ["--top", "3", "--max-iter", "30", "--out", files["hessian-top3"]]),
        "hessian-trace": ("hessian", ["--top", "0", "--trace", "4", "--out", files["hessian-trace"]]),
        "hessian-spectrum": ("hessian", ["--top", "0", "--spectrum", "1", "--steps", "40",
                                         "--out", files["hessian-spectrum"]]),
    }[stage]


def common_options(command, help_text, model, dtype, device, sample=DEFAULT_SAMPLE):
    """The model, dtype, device, sample and quiet options that ``command`` accepts.

    --device goes with --dtype: `directions` has a --device for --kind hessian only, and refuses it
    for random directions."""
    opts = [] if model == EMBEDDED else ["--model", model]
    if "--dtype" in help_text:
        opts += ["--dtype", dtype] + ([] if command == "directions" else ["--device", device])
    for flag, values in (("--quiet", []), ("--threads", ["1"])):
        if flag in help_text:
            opts += [flag] + values
    return opts + (sample_options(sample) if command in SAMPLED else [])


def measure_model(runner, model, dtypes, stages, device):
    """{"n_params", "device", "baseline": {dtype: run}, "stages": {stage: {dtype: run}}} of one model."""
    label = model_label(model)
    out = {"baseline": {}, "stages": {s: {} for s in stages}, "nproc": runner.nproc,
           "shard_size": runner.shard_size}
    for dtype in dtypes:
        folder = runner.work / label / dtype
        folder.mkdir(parents=True, exist_ok=True)
        base = out["baseline"][dtype] = runner.baseline(model, device, dtype, f"{label}/{dtype}/model")
        out.update(n_params=base.get("n_params"), device=base.get("device"), code=base.get("landscape"))
        progress(label, dtype, "model alone", base)
        files = {s: str(folder / (s + _suffix(s))) for s in STAGES}
        for stage in stages:
            out["stages"][stage][dtype] = run_stage(runner, stage, files, model, dtype, device, out["stages"])
            progress(label, dtype, stage, out["stages"][stage][dtype])
    if not out.get("device"):  # no baseline: the stages tell whether they used CUDA
        cuda = any(run.get("cuda") for runs in out["stages"].values() for run in runs.values())
        out["device"] = "cuda" if cuda else "cpu"
        out["code"] = next((run.get("landscape") for runs in out["stages"].values() for run in runs.values()
                            if run.get("landscape")), None)
    return out


def _suffix(stage):
    return ".safetensors" if stage == "fisher" else ".json" if stage.startswith("hessian") else ".h5"


def run_stage(runner, stage, files, model, dtype, device, done):
    """One stage's run, or a skip when the stage it needs failed."""
    need = NEEDS.get(stage)
    if need and done[need][dtype].get("rc") != 0:
        return {"skipped": f"needs {need}"}
    command, stage_args = stage_command(stage, files)
    help_text = runner.help_text(command)
    run = runner.stage(command, common_options(command, help_text, model, dtype, device, runner.sample) + stage_args,
                       f"{model_label(model)}/{dtype}/{stage}")
    run["float32_only"] = "--dtype" not in help_text
    return run


def progress(label, dtype, stage, run):
    state = run.get("skipped") or run.get("error") or f"{run['rss'] / 2**20:.0f} MiB RSS, {run['seconds']:.1f} s"
    print(f"  [{label} {dtype}] {stage}: {state}", file=sys.stderr, flush=True)


def model_label(model):
    return EMBEDDED if model == EMBEDDED else Path(model).name or model


def peak(run, device):
    """The run's peak in bytes (the largest rank's): the CUDA allocator's peak on a GPU; on CPU the
    peak RSS once the model was loaded (see ``_reset_peak_once_loaded``), else the whole process's."""
    if str(device).startswith("cuda"):
        return run.get("cuda")
    return run.get("after_load") or run.get("rss")


def above_model(run, base, n_params, device):
    """Bytes per parameter above the model alone, or None where it cannot be computed."""
    if not base or run.get("rc") != 0 or None in (peak(run, device), peak(base, device), n_params):
        return None
    return (peak(run, device) - peak(base, device)) / n_params


# ---------------------------------------------------------------------------------- report
def print_model(label, res, dtypes):
    device, n_params = res["device"], res.get("n_params")
    size = f"{n_params:,} parameters" if n_params else "no baseline"
    print(f"\n== {label}: {size}, device {device}, code imported from {res.get('code', '?')}")
    unit = "CUDA max_memory_allocated" if str(device).startswith("cuda") else "peak RSS after the model is loaded"
    ranks = f", the largest of {res.get('nproc')} ranks (shard size {res.get('shard_size')})" \
        if res.get("nproc", 1) > 1 else ""
    print(f"   {unit}{ranks}; B/param = (stage peak - model-alone peak) / parameters; MiB = the stage's peak")
    cell = "{:>9} {:>8} {:>7}"
    print(f"{'stage':<16}" + "".join(f" | {d:^26}" for d in dtypes))
    print(f"{'':<16}" + "".join(" | " + cell.format("B/param", "MiB", "s") for _ in dtypes))
    base = res["baseline"]
    if base:
        row = [cell.format("0", mib(peak(base[d], device)), f"{base[d]['seconds']:.1f}") for d in dtypes]
        print(f"{'model alone':<16}" + "".join(f" | {c}" for c in row))
    notes = {}  # message -> where it happened
    if any(run.get("float32_only") for runs in res["stages"].values() for run in runs.values()):
        notes["* the subcommand has no --dtype: ran in float32"] = []
    for stage, runs in res["stages"].items():
        row = [stage_cell(runs[d], base.get(d), n_params, device, cell, notes, f"{stage} {d}") for d in dtypes]
        print(f"{stage:<16}" + "".join(f" | {c}" for c in row))
    for message, where in notes.items():
        print(f"   {', '.join(where) + ': ' if where else ''}{message}")


def stage_cell(run, base, n_params, device, cell, notes, where):
    if "skipped" in run or run["rc"] != 0:
        notes.setdefault(run.get("skipped") or run["error"], []).append(where)
        return f"{'skipped' if 'skipped' in run else 'failed':>26}"
    bpp = above_model(run, base, n_params, device)
    mark = "*" if run["float32_only"] else ""
    return cell.format(("-" if bpp is None else f"{bpp:.2f}") + mark, mib(peak(run, device)), f"{run['seconds']:.1f}")


def mib(value):
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def print_extrapolation(label, res, dtypes):
    print(f"\n   {label}, extrapolated: GiB = (model dtype bytes + B/param above) x N; fixed costs (imports,"
          " activations of the sample) count per parameter too, so only large models extrapolate")
    print(f"{'stage':<16}" + "".join(f" | {d + ' ' + n:>14}" for d in dtypes for n in SCALES))
    print(f"{'model alone':<16}" + "".join(f" | {DTYPE_BYTES[d] * n / 2**30:>14.1f}"
                                          for d in dtypes for n in SCALES.values()))
    for stage, runs in res["stages"].items():
        cells = []
        for d in dtypes:
            bpp = above_model(runs[d], res["baseline"].get(d), res.get("n_params"), res.get("device"))
            cells += ["-" if bpp is None else f"{(DTYPE_BYTES[d] + bpp) * n / 2**30:.1f}" for n in SCALES.values()]
        print(f"{stage:<16}" + "".join(f" | {c:>14}" for c in cells))


def git_head(repo):
    done = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "not a git checkout"


# ------------------------------------------------------------------------------------ main
def default_models():
    home = Path(os.environ.get("LANDSCAPE_DATA") or Path.home() / ".cache" / "landscape").expanduser()
    smollm = home / "checkpoints" / "smollm2-135m-instruct"
    return [EMBEDDED] + ([str(smollm)] if (smollm / "config.json").exists() else [])


def with_needs(stages):
    """The chosen stages plus those whose outputs they read, in pipeline order."""
    chosen = set(stages)
    for stage in reversed(STAGES):
        if stage in chosen and stage in NEEDS:
            chosen.add(NEEDS[stage])
    return [s for s in STAGES if s in chosen]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=None,
                        help=f"folder or hub id, repeatable or comma-separated; '{EMBEDDED}' = the embedded model "
                             "(default: embedded, and SmolLM2-135M from the data home when built)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated subset of {','.join(STAGES)} (the stages they read from are added)")
    parser.add_argument("--repo", default=str(Path(__file__).resolve().parent.parent),
                        help="checkout whose code is measured (default: this script's)")
    parser.add_argument("--work", default=None, help="folder for outputs and logs (default: a temporary one, removed)")
    parser.add_argument("--json", default=None, help="write every raw number here")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    parser.add_argument("--nproc", type=int, default=1, help="processes per stage under torch.distributed.run")
    parser.add_argument("--shard-size", type=int, default=None, help="passed to each stage when --nproc > 1 "
                                                                     "(default: --nproc)")
    parser.add_argument("--hvp", default=None, choices=("exact", "difference"),
                        help="the hessian rows' Hessian-vector product (default: the stage's, exact; difference "
                             "when --nproc > 1, the only one a sharded Hessian takes)")
    parser.add_argument("--sample", default="x".join(map(str, DEFAULT_SAMPLE)), metavar="NxT",
                        help="sequences x tokens of the sample, one batch (default: %(default)s)")
    parser.add_argument("--random-llama", default=None, metavar="L,H,V",
                        help="also measure a random-weight Llama of L layers, width H and vocabulary V, written "
                             "into the work folder (e.g. 8,512,32000: 58M parameters)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.models = [m for text in (args.model or default_models()) for m in text.split(",") if m]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    text = args.sample
    try:
        args.sample = tuple(int(x) for x in text.lower().split("x"))
    except ValueError:
        args.sample = ()
    if len(args.sample) != 2 or min(args.sample) < 1:
        parser.error(f"--sample takes sequences x tokens, e.g. 8x64, got {text!r}")
    unknown = set(args.stages.split(",")) - set(STAGES) - {""}
    if unknown or set(args.dtypes) - set(DTYPE_BYTES):
        parser.error(f"unknown stage(s) {sorted(unknown)} or dtype(s) in {args.dtypes}")
    args.stages = with_needs(args.stages.split(","))
    if args.random_llama is not None and not re.fullmatch(r"\d+,\d+,\d+", args.random_llama):
        parser.error(f"--random-llama takes layers,width,vocabulary, e.g. 8,512,32000, got {args.random_llama!r}")
    args.repo = str(Path(args.repo).resolve())
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    print("command: " + shlex.join(["python"] + sys.argv))
    print(f"code: {args.repo} (git {git_head(args.repo)}); sample: {' '.join(sample_options(args.sample))}; "
          "OMP_NUM_THREADS=1"
          + (f"; torchrun --nproc-per-node {args.nproc}, largest process" if args.nproc > 1 else ""))
    work = Path(args.work or tempfile.mkdtemp(prefix="landscape-memory-"))
    work.mkdir(parents=True, exist_ok=True)  # a --work folder not made yet (the children's logs go there)
    runner = Runner(args, work)
    if runner.hvp and any(s.startswith("hessian") for s in args.stages):
        print(f"hessian rows: --hvp {runner.hvp}")
    results = {}
    try:
        if args.random_llama:
            folder = work / ("llama-" + args.random_llama.replace(",", "-"))
            shape = [int(x) for x in args.random_llama.split(",")]
            if runner.run({"mode": "random-llama", "folder": str(folder), "shape": shape}, "random-llama")["rc"]:
                raise SystemExit(f"could not write the random Llama: see {work / 'random-llama.log'}")
            args.models = ([] if args.model is None else args.models) + [str(folder)]
        for model in args.models:
            results[model] = res = measure_model(runner, model, args.dtypes, args.stages, args.device)
            print_model(model_label(model), res, args.dtypes)
            if res["baseline"]:
                print_extrapolation(model_label(model), res, args.dtypes)
            sys.stdout.flush()
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": sys.argv, "repo": args.repo, "models": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
