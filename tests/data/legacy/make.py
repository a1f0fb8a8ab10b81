"""Writes the committed files of tests/data/legacy/: what the previous release left mid-run.

Run on commit 578638c (main before the one journal format and the legacy-key map, issue 27 item 2),
from this folder, with that commit's package first on the path::

    git archive 578638c landscape | tar -x -C /tmp/old
    cd tests/data/legacy && PYTHONPATH=/tmp/old:../.. python3 make.py

The inputs (the tiny BERT of tests/conftest.py with the committed ``tokenizer/``, whose training is
not deterministic; the corpus, the directions, the toy dataset) are rebuilt identically by
``inputs``, which the tests call too, in ``INPUTS``: a surface records its model's absolute path,
so the folder is the same for every run.  Every command runs there, naming its inputs by relative
names (``model``, ``corpus.jsonl``, ``dirs.h5``, ``toy.tsv``) as the files record them.
Only the small files a resume reads are kept (tests/test_legacy_files.py resumes them):

* ``surface.h5`` and ``surface.h5.journal``: a 5x4 surface stopped after 6 of its 20 points;
* ``trace.ckpt``: a Hessian trace journal of 2 probes (a run of 4 resumes it);
* ``runs.csv`` and ``runs.csv.settings.json``: a fine-tuning sweep of 1 restart (a run of 2 resumes it);
* ``fisher.safetensors.ckpt``: a Fisher checkpoint of 2 of its 4 batches (``fisher_checkpoint``, added
  later from the same commit, alone: the other files were kept as they were).
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parents[1]

INPUTS = Path("/tmp/landscape-legacy-inputs")
SURFACE = ["surface", "--model", "model", "--directions", "dirs.h5", "--corpus", "corpus.jsonl", "--max-samples", "4",
           "--seq-len", "16", "--batch-size", "5", "--x", "-1:1:5", "--y", "-1:1:4", "--quiet", "--device", "cpu"]
SURFACE_STOP = 6  # points recorded before the stop
TOKENIZER = ("tokenizer.json", "tokenizer_config.json")
TRACE = {"max_samples": 2, "seq_len": 16, "batch_size": 2, "seed": 0}
FISHER = ["fisher", "--model", "model", "--corpus", "corpus.jsonl", "--max-samples", "8", "--seq-len", "16",
          "--batch-size", "2", "--checkpoint-every", "0", "--quiet", "--device", "cpu"]
FISHER_STOP = 2  # batches in the checkpoint
SWEEP = ["finetune", "--model", "model", "--dataset", "toy.tsv", "--regularizer", "dropout", "--fractions", "1",
         "--epochs", "1", "--batch-size", "8", "--seq-len", "16", "--lr", "1e-3", "--threads", "1", "--device",
         "cpu"]


def inputs() -> Path:
    """``INPUTS``, holding the tiny model, corpus, directions and dataset under their relative names.

    Made once per version of this script and of tests/conftest.py (what it is made from, hashed
    into ``INPUTS/done``); a lock keeps two processes from making it at once.
    """
    import fcntl
    import hashlib
    import json

    sys.path.insert(0, str(TESTS))
    from conftest import TEXT, _save_bert, write_toy_tsv

    from landscape import directions as D
    from landscape.models import load_model

    INPUTS.mkdir(exist_ok=True)
    with open(INPUTS / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        made_from = hashlib.sha256(b"".join(p.read_bytes() for p in (Path(__file__), TESTS / "conftest.py",
                                                                       *sorted((HERE / "tokenizer").glob("*"))))
                                   ).hexdigest()
        if (INPUTS / "done").exists() and (INPUTS / "done").read_text() == made_from:
            return INPUTS
        _save_bert(INPUTS / "model")
        tokenizer = HERE / "tokenizer"
        if not tokenizer.exists():  # the first make: keep the tokenizer this training gave
            tokenizer.mkdir()
            for name in TOKENIZER:
                shutil.copyfile(INPUTS / "model" / name, tokenizer / name)
        for name in TOKENIZER:
            shutil.copyfile(tokenizer / name, INPUTS / "model" / name)
        (INPUTS / "corpus.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in TEXT))
        dirs, settings = D.make_directions(load_model(str(INPUTS / "model")).model, dims=2, seed=0)
        D.save_directions(INPUTS / "dirs.h5", dirs, settings)
        write_toy_tsv(INPUTS / "toy.tsv", 24)
        (INPUTS / "done").write_text(made_from)
    return INPUTS


def trace_operator():
    """The Hessian operator of the trace journal, over ``model`` and ``corpus.jsonl`` in the current folder."""
    from landscape import curvature
    from landscape.data.corpus import load_batches
    from landscape.models import load_model

    loaded = load_model("model")
    batches = load_batches(loaded, "corpus.jsonl", **TRACE)
    return curvature.HessianOperator(loaded.model, batches, kind=loaded.kind)


def _stopped_surface(out) -> None:
    from landscape.cli import main
    from landscape.surface.file import SurfaceFile

    real, calls = SurfaceFile.record, []

    def record(self, results):
        if len(calls) >= SURFACE_STOP:
            raise KeyboardInterrupt  # as Ctrl-C: the file is flushed, the journal kept
        calls.append(1)
        return real(self, results)

    SurfaceFile.record = record
    try:
        assert main([*SURFACE, "--out", str(out)]) == 130
    finally:
        SurfaceFile.record = real


def fisher_checkpoint(out) -> None:
    """``fisher`` into ``out``, interrupted after ``FISHER_STOP`` batches: its checkpoint is kept."""
    from landscape.cli import main
    from landscape.fisher.accumulator import FisherAccumulator

    real, calls = FisherAccumulator.add_batch, []

    def add_batch(self, *args, **kwargs):
        if len(calls) >= FISHER_STOP:
            raise KeyboardInterrupt  # as Ctrl-C: the running sums are checkpointed
        calls.append(1)
        return real(self, *args, **kwargs)

    FisherAccumulator.add_batch = add_batch
    try:
        assert main([*FISHER, "--out", str(out)]) == 130
    finally:
        FisherAccumulator.add_batch = real


def main() -> None:
    import torch

    from landscape import curvature
    from landscape.cli import main as cli

    torch.set_num_threads(1)
    os.chdir(inputs())
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        _stopped_surface(scratch / "surface.h5")
        curvature.trace(trace_operator(), samples=2, checkpoint=scratch / "trace.ckpt")
        assert cli([*SWEEP, "--restarts", "1", "--out", str(scratch / "sweep.csv"), "--runs-out",
                    str(scratch / "runs.csv")]) == 0
        fisher_checkpoint(scratch / "fisher.safetensors")
        for name in ("surface.h5", "surface.h5.journal", "trace.ckpt", "runs.csv", "runs.csv.settings.json",
                     "fisher.safetensors.ckpt"):
            shutil.copyfile(scratch / name, HERE / name)


if __name__ == "__main__":
    main()
