"""Process hygiene after a run: SIGKILL every process of the run (its session, its process group, every
process carrying the run's marker in its environment), wait until they are dead, then remove the work
directory without ever raising.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# Environment variable that tags every process of one run (the value is random per run).
MARKER_VAR = "UNIERASE_SANDBOX"


def _proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, process group, session, start time in ticks) of `pid`, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0].decode(), int(fields[2]), int(fields[3]), int(fields[19])


def _has_marker(pid: int, marker: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return f"{MARKER_VAR}={marker}".encode() in fh.read().split(b"\0")
    except OSError:
        return False


def _sandbox_pids(leader: int, marker: str, since: int) -> dict[int, int]:
    """Live processes of this run, pid -> start time: the leader's session or group, or the marker."""
    found: dict[int, int] = {}
    if not os.path.isdir("/proc"):  # not Linux: the process group kill is all there is
        return found
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        stat = _proc_stat(int(name))
        # Only processes started after the leader can be its descendants; zombies can do nothing.
        if stat is None or stat[3] < since or stat[0] in "ZX":
            continue
        if leader in (stat[1], stat[2]) or _has_marker(int(name), marker):
            found[int(name)] = stat[3]
    return found


def _kill_sandbox(leader: int, marker: str, since: int) -> None:
    """SIGKILL every process of the run (double-forked setsid grandchildren included) and wait for them."""
    try:
        os.killpg(leader, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # group already gone
        pass
    killed: dict[int, int] = {}
    for _ in range(20):  # repeat: a process may fork between our scan and our kill
        found = _sandbox_pids(leader, marker, since)
        if not found:
            break
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        killed.update(found)
    # SIGKILL is asynchronous: wait until they are dead, so none writes into the work directory later.
    deadline = time.monotonic() + 5.0
    for pid, start in killed.items():
        while time.monotonic() < deadline:
            stat = _proc_stat(pid)
            if stat is None or stat[3] != start or stat[0] in "ZX":
                break
            time.sleep(0.005)
        else:
            log.warning("sandbox: process %d survived SIGKILL for 5 s", pid)


def remove_tree(path: str) -> None:
    """Remove `path` recursively, making read-only directories writable on the way; never raises."""

    def retry(func: Callable[[str], object], failed: str, _exc: object) -> None:
        try:
            os.chmod(os.path.dirname(failed), 0o700)
            if os.path.isdir(failed) and not os.path.islink(failed):
                os.chmod(failed, 0o700)
            func(failed)
        except OSError:
            pass

    try:
        shutil.rmtree(path, onerror=retry)
    except Exception:  # noqa: BLE001 - cleanup must never take the evaluation down
        pass
    if os.path.lexists(path):
        log.warning("sandbox: could not remove %s", path)
