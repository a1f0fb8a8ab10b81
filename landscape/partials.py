"""Partial files whose writer is dead: found and removed by the next claim in their folder.

``files.atomic_output`` writes ``.NAME.partial-PID`` next to ``NAME`` and moves it into place when
done; an exception removes it, but a SIGKILL, an out-of-memory kill or a power cut leaves it
behind, possibly gigabytes (a direction file, a Fisher checkpoint).  ``outputs.claim_output`` calls
``remove_dead_partials`` on the folder of each output it locks.

Whether the writer is dead (``writer_alive``): a partial is removed only when both

* its pid names no live writer on this machine: no such process, a zombie, or a process that
  started after the partial was last written.  A pid alone is not enough, since the kernel reuses
  pids: but a pid is never given to a new process while its holder lives, so a process that started
  after the writer's last write is another process.  The start time comes from /proc (Linux);
  where it cannot be read, a live pid keeps its partial.
* no other process holds the lock of an output whose name starts the partial's (``.NAME.lock``,
  ``.F.safetensors.lock`` for the Fisher checkpoint ``F.safetensors.ckpt``, ``.s.h5.lock`` for the
  aside file ``.s.h5.new.h5`` of a surface being replaced).  Every writer of a
  partial holds such a lock (under torchrun, rank 0 writes and locks), so this keeps the partial of
  a writer on another machine sharing the folder, whose pid means nothing here.

A live writer's partial is thus never removed; a dead writer's partial stays only when its pid was
reused within a second of its last write (the resolution of the boot time), which is harmless.
"""

import contextlib
import fcntl
import os
import re
from pathlib import Path
from typing import Collection, List, Optional

_PARTIAL = re.compile(r"^\.(?P<target>.+)\.partial-(?P<pid>[0-9]+)$")
_LOCK = re.compile(r"^\.(?P<target>.+)\.lock$")
_CLOCK_SLACK = 1.0  # seconds: /proc/stat's boot time is a whole second


def remove_dead_partials(folder, own_locks: Collection[str] = ()) -> List[Path]:
    """Remove the partial files in ``folder`` whose writer is dead (see the module docstring).

    Args:
        folder: the folder of an output being claimed.
        own_locks: the lock files (absolute paths) this process holds: locks that say nothing of
            another writer.

    Returns:
        The partial files removed.
    """
    folder = Path(folder)
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    locks = [(found["target"], folder / name) for name in names for found in [_LOCK.match(name)] if found]
    removed = []
    for name in names:
        found = _PARTIAL.match(name)
        if found is None:
            continue
        partial, target = folder / name, found["target"].lstrip(".")  # a hidden aside file: '.s.h5.new.h5'
        if writer_alive(int(found["pid"]), partial):
            continue
        if any(target.startswith(owner) and str(lock) not in own_locks and _held(lock) for owner, lock in locks):
            continue
        with contextlib.suppress(OSError):
            partial.unlink()
            removed.append(partial)
    return removed


def writer_alive(pid: int, partial) -> bool:
    """Whether process ``pid`` may still be writing ``partial`` (True when in doubt)."""
    if pid <= 0 or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    except OSError:
        return True
    state, started = _process_state(pid)
    if state is None:
        return True  # no /proc: a live pid keeps its partial
    if state in ("Z", "X"):  # killed, not yet reaped by its parent: it writes nothing
        return False
    try:
        written = Path(partial).stat().st_mtime
    except OSError:
        return True  # gone already, or unreadable: nothing to decide
    return started is None or started <= written + _CLOCK_SLACK


def _process_state(pid: int):
    """(state letter, start time in seconds since the epoch) from /proc; (None, None) where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = _boot_time()
    except (OSError, ValueError):
        return None, None
    fields = stat[stat.rfind(")") + 2:].split()  # the command name, in parentheses, may hold spaces
    try:
        ticks = int(fields[19])  # field 22 of proc(5): start time in clock ticks after boot
        started = None if boot is None else boot + ticks / os.sysconf("SC_CLK_TCK")
        return fields[0], started
    except (IndexError, ValueError, OSError):
        return None, None


def _boot_time() -> Optional[float]:
    with open("/proc/stat") as handle:
        for line in handle:
            if line.startswith("btime "):
                return float(line.split()[1])
    return None


def _held(lock: Path) -> bool:
    """Whether another open file holds ``lock`` with flock (False when it is gone).

    Looking takes the lock shared for an instant: a claim of that output meeting it then sees a
    holder without a pid and looks again (``outputs._acquire``), so it is never refused for it.
    """
    try:
        handle = open(lock, "rb")
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return True  # cannot tell: keep the partial
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return False
