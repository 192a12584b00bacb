"""One writer per --save directory: a lock file naming the run that writes there.

`<save>/.megatron_lite.lock` is created exclusively (O_CREAT | O_EXCL) by rank 0 at start-up and
holds {"host", "pid", "pid_start", "started", "token"}; rank 0 touches it while the run lives
(`heartbeat`, at most once a minute) and removes it when the run ends. A second run finds it and
stops with one line naming the first, unless the holder is gone:
- on this host, its process no longer exists (or the pid now belongs to a process started at
  another time: `pid_start` is the kernel's start time of the process);
- on another host, the lock has not been touched for STALE_AFTER_S seconds (a job restarted on
  other nodes after a crash).
A stale lock is taken over (renamed aside, then created anew, so that of two runs taking it over
at once one wins) and the report says whose it was. The lock's `token` makes the run's
temporary names unique (`iter_0000100.tmp-<token>`, the tracker's temporary file), so that even
runs that ignore the lock never write into each other's files.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Optional, Tuple

LOCK_FILENAME = ".megatron_lite.lock"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0


def _process_start(pid: int) -> Optional[str]:
    """The kernel's start time of `pid` (field 22 of /proc/<pid>/stat), None where /proc has none."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # exists, owned by someone else
        return True
    return True


def holder_gone(holder: Optional[dict], mtime: float, now: float) -> Tuple[bool, str]:
    """(whether the lock's run is gone, why) for a lock's content and modification time."""
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
        gone = now - mtime > STALE_AFTER_S
        return gone, "an unreadable lock file" + (f" untouched for {now - mtime:.0f} s" if gone else "")
    host, pid = holder.get("host"), holder["pid"]
    if host == socket.gethostname():
        if pid == os.getpid():
            return True, "an earlier run of this process"
        if not _pid_alive(pid):
            return True, f"process {pid} on {host} has exited"
        start = holder.get("pid_start")
        if start is not None and _process_start(pid) not in (None, start):
            return True, f"process {pid} on {host} has exited (the pid is now another process's)"
        return False, ""
    idle = now - mtime
    if idle > STALE_AFTER_S:
        return True, f"its lock on {host} (pid {pid}) has not been touched for {idle:.0f} s"
    return False, ""


@dataclass
class SaveLock:
    path: str
    token: str
    took_over: Optional[str] = None   # whose stale lock this run took over, for the log
    _touched: float = 0.0

    def heartbeat(self) -> None:
        now = time.time()
        if now - self._touched >= HEARTBEAT_S:
            try:
                os.utime(self.path)
            except OSError:
                pass   # a lock removed by hand: the run goes on; the next run will not wait for it
            self._touched = now

    def release(self) -> None:
        """Remove the lock if it is still this run's."""
        try:
            with open(self.path, encoding="utf-8") as f:
                mine = json.load(f).get("token") == self.token
        except (OSError, ValueError, AttributeError):
            return
        if mine:
            try:
                os.remove(self.path)
            except OSError:
                pass   # already gone: nothing to release


class SaveDirectoryBusy(RuntimeError):
    """Another live run holds the --save directory's lock."""


def acquire(save_dir: str) -> SaveLock:
    """Rank 0, at start-up: take `save_dir`'s lock, taking over a stale one; SaveDirectoryBusy if a
    live run holds it."""
    os.makedirs(save_dir, exist_ok=True)
    path = os.path.join(save_dir, LOCK_FILENAME)
    token = uuid.uuid4().hex[:12]
    me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "token": token}
    took_over = None
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder, mtime = _read(path)
            if mtime is None:
                continue   # removed in the meantime: try again
            gone, why = holder_gone(holder, mtime, time.time())
            if not gone:
                h = holder or {}
                raise SaveDirectoryBusy(
                    f"--save {save_dir} is being written by another run (host {h.get('host')}, pid {h.get('pid')}, "
                    f"started {h.get('started')}); stop it or give this run another --save (the lock is {path}; a "
                    f"crashed run's lock is taken over by itself)")
            aside = f"{path}.stale-{token}"
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue   # another run took it over first; its new lock decides
            os.remove(aside)
            took_over = why
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        return SaveLock(path, token, took_over, time.time())
    raise SaveDirectoryBusy(f"--save {save_dir}: could not take its lock {path} (other runs keep taking it)")


def _read(path: str) -> Tuple[Optional[dict], Optional[float]]:
    try:
        mtime = os.path.getmtime(path)
        with open(path, encoding="utf-8") as f:
            return json.load(f), mtime
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError):
        try:
            return None, os.path.getmtime(path)
        except OSError:
            return None, None
