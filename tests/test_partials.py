"""Partial files of killed writers (issue 28): the next run that claims an output in their folder
removes them, and never the partial of a live writer.

A writer puts ``.NAME.partial-PID`` next to its output and moves it into place when done; a SIGKILL
leaves it.  The kills are real: a run is stopped (SIGSTOP) the moment its partial file exists, killed
if it still does, and the same command is run again.  Live writers are real processes too: a pid
that is alive, one reused by a process started after the partial was written, a zombie, and a lock
held by another process (a writer on another machine sharing the folder, whose pid means nothing).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from landscape import outputs
from landscape.partials import remove_dead_partials, writer_alive

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))


def _cmd(*args):
    return [sys.executable, "-m", "landscape.cli", *map(str, args)]


def _dead_pid():
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def _sleeper():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def _partial(folder, target, pid, when=None):
    path = folder / f".{target}.partial-{pid}"
    path.write_bytes(b"half a file")
    if when is not None:
        os.utime(path, (when, when))
    return path


# ----------------------------------------------------------------------------- the rule, in one process
def test_only_partials_of_dead_writers_are_removed_by_a_claim(tmp_path):
    live = _sleeper()
    zombie = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               "handles = [open(p, 'a+b') for p in sys.argv[1:]]\n"
                               "[fcntl.flock(h.fileno(), fcntl.LOCK_EX) for h in handles]\n"
                               "print('held', flush=True); time.sleep(120)",
                               str(tmp_path / ".held.h5.lock"), str(tmp_path / ".F.safetensors.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        time.sleep(0.05)  # the live writer's partial is written after it started, as a real one is
        dead = _dead_pid()
        kept = [_partial(tmp_path, "live.h5", live.pid),  # a live writer
                _partial(tmp_path, "mine.h5", os.getpid()),  # this process's own
                _partial(tmp_path, "held.h5", dead),  # its output's lock is held elsewhere
                _partial(tmp_path, "F.safetensors.ckpt", dead)]  # the Fisher's lock is held elsewhere
        zombie.kill()
        time.sleep(0.2)  # killed, not reaped: a zombie
        assert Path(f"/proc/{zombie.pid}").exists()
        gone = [_partial(tmp_path, "dead.h5", dead),
                _partial(tmp_path, "zombie.h5", zombie.pid),
                # the pid now names a process that started after the partial's last write: reused
                _partial(tmp_path, "reused.h5", live.pid, when=time.time() - 3600)]
        with outputs.claim_output(tmp_path / "other.h5", "directions"):
            assert [p for p in kept if not p.exists()] == []
            assert [p for p in gone if p.exists()] == []
    finally:
        for proc in (live, zombie, holder):
            proc.kill()
            proc.wait()
    assert writer_alive(os.getpid(), kept[1]) and not writer_alive(_dead_pid(), kept[0])
    # once the lock holder is gone, its outputs' partials go too
    assert sorted(remove_dead_partials(tmp_path)) == sorted(kept[2:] + [kept[0]])


def test_a_claim_is_not_refused_for_a_cleanup_looking_at_its_lock(tmp_path):
    import fcntl
    import threading

    out = tmp_path / "x.h5"
    side = outputs.lock_path(out)
    side.write_bytes(b"")
    look = open(side, "rb")  # what partials._held does in another run, for an instant
    fcntl.flock(look.fileno(), fcntl.LOCK_SH)
    letting_go = threading.Timer(0.05, look.close)
    letting_go.start()
    try:
        with outputs.claim_output(out, "directions"):
            assert side.read_text().startswith(f"{os.getpid()} ")
    finally:
        letting_go.join()


# ----------------------------------------------------------------------------- real kills, then a rerun
def _kill_while_partial(args, folder, target, limit=240):
    """Run ``args``; the moment its partial file of ``target`` exists, SIGKILL it there. Returns the partial."""
    proc = subprocess.Popen(_cmd(*args), cwd=folder, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pattern, deadline = f".{target}.partial-{proc.pid}", time.time() + limit
    try:
        while time.time() < deadline and proc.poll() is None:
            if any(folder.glob(pattern)):
                proc.send_signal(signal.SIGSTOP)  # frozen: the partial cannot be moved into place now
                found = list(folder.glob(pattern))
                if found:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return found[0]
                proc.send_signal(signal.SIGCONT)
            time.sleep(0.0005)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    raise AssertionError(f"{args} never left a partial file (exit {proc.returncode}: {proc.stderr.read()[-2000:]})")


def _big_surface(path, nx=200, ny=150):
    xs, ys = np.linspace(-1, 1, nx), np.linspace(-1, 1, ny)
    with h5py.File(path, "w") as handle:
        handle["xcoordinates"], handle["ycoordinates"] = xs, ys
        handle["train_loss"] = np.add.outer(ys ** 2, xs ** 2) + 1.0
        handle["train_acc"] = np.zeros((ny, nx))
        handle.attrs["format"] = "landscape-surface"
    return path


CASES = {
    # a direction file is written tensor by tensor into its partial file
    "directions": (["directions", "--dims", 2, "--out", "D.h5"], "D.h5"),
    # a checkpoint after every batch of the embedded model (about 15 MB each)
    "fisher checkpoint": (["fisher", "--max-samples", 32, "--seq-len", 32, "--batch-size", 1, "--checkpoint-every", 0,
                           "--quiet", "--out", "F.safetensors"], "F.safetensors.ckpt"),
    # a PDF is drawn into its partial file
    "plot": (["plot", "big.h5", "--kind", "surface3d", "--out", "big.pdf"], "big.pdf"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.slow  # a real kill of a real run: about 5-20 s
def test_a_killed_writers_partial_file_is_removed_by_the_next_run(case, tmp_path):
    args, target = CASES[case]
    _big_surface(tmp_path / "big.h5")
    partial = _kill_while_partial(args, tmp_path, target)
    done = subprocess.run(_cmd(*args), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not partial.exists(), f"{partial.name} was left behind"
    assert list(tmp_path.glob(".*.partial-*")) == []
