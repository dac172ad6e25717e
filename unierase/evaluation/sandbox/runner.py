"""The parent side of a run: start the child bootstrap (child.py) in fresh namespaces where the kernel
allows, hand it its settings, wait for it up to the timeout, clean up (cleanup.py) and read its report.
"""
from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from unierase.evaluation.sandbox.cleanup import MARKER_VAR, _kill_sandbox, _proc_stat, remove_tree

log = logging.getLogger(__name__)

# The child's bootstrap, run by path as a script (`python -I child.py`), never imported.
CHILD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child.py")


@dataclass(frozen=True)
class Limits:
    """Per-run resource limits; the CPU limit follows the wall-clock timeout."""

    memory_bytes: int = 1 << 30  # RLIMIT_AS
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE, per file
    processes: int = 32  # RLIMIT_NPROC; the kernel does not apply it to real root
    open_files: int = 256  # RLIMIT_NOFILE


@dataclass(frozen=True)
class RunResult:
    completed: bool  # the harness reported that `source` ran to its end, and the child exited 0
    returncode: int | None
    timed_out: bool
    started: bool  # the child's bootstrap ran (False: the sandbox itself failed to start)
    layers: dict[str, object] = field(default_factory=dict)
    workdir: str = ""
    marker: str = ""


_WARNED: set[str] = set()
_NAMESPACE_PREFIX: list[str] | None = None


def namespace_prefix() -> list[str]:
    """The `unshare` command line that puts the child in fresh user/net/pid namespaces; [] if unavailable.

    Probed once per process by running a child that must see itself as PID 1.
    """
    global _NAMESPACE_PREFIX
    if _NAMESPACE_PREFIX is None:
        exe = shutil.which("unshare") or ""
        # --map-user: the child is uid 65534 inside, so it drops every capability at exec.
        prefix = [exe, "--user", "--map-user=65534", "--map-group=65534", "--net", "--pid", "--kill-child", "--"]
        try:
            out = subprocess.run([*prefix, sys.executable, "-I", "-c", "import os; print(os.getpid())"],
                                 capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
            ok = bool(exe) and out.returncode == 0 and out.stdout.strip() == "1"
        except (OSError, subprocess.SubprocessError):
            ok = False
        _NAMESPACE_PREFIX = prefix if ok else []
    return _NAMESPACE_PREFIX


def run_python(source: str, timeout_s: float = 3.0, limits: Limits | None = None, *, guards: bool = True) -> RunResult:
    """Run `source` as `__main__` in the sandbox; never raises for anything the code does.

    `guards=False` leaves out the in-process audit hook, so tests can check the kernel layers alone.
    """
    nonce, marker = secrets.token_hex(16), secrets.token_hex(8)
    work = os.path.realpath(tempfile.mkdtemp(prefix="unierase_sandbox_"))
    prefix = namespace_prefix()
    _warn_once("namespaces", not prefix, "user/net/pid namespaces unavailable (`unshare --user` failed): "
               "generated code runs without network or PID isolation from the kernel; the other layers remain")
    read_fd, write_fd = os.pipe()
    settings = {"nonce": nonce, "workdir": work, "program": os.path.join(work, "program.py"), "result_fd": write_fd,
                "guards": guards, "cpu_s": math.ceil(timeout_s) + 1, "limits": (limits or Limits()).__dict__}
    proc = None
    since = None
    exited = False
    try:
        with open(settings["program"], "w", encoding="utf-8") as fh:
            fh.write(source)
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", MARKER_VAR: marker,
               # One thread each: BLAS thread pools would eat the address-space and process limits.
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-I", CHILD_SCRIPT],
            cwd=work, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(write_fd,), start_new_session=True,
        )
        since = _proc_stat(proc.pid)
        try:  # a few hundred bytes fit the pipe buffer, so this cannot block
            proc.stdin.write(json.dumps(settings).encode())
            proc.stdin.close()
        except OSError:  # the child already died
            pass
        exited = _wait_exit(proc.pid, timeout_s)
    finally:
        os.close(write_fd)
        if proc is not None:
            # The exited child stays unreaped until after the sweep, so its pid (= our session and
            # group id) cannot be reused by an unrelated process while we kill by it.
            _kill_sandbox(proc.pid, marker, since[3] if since else 0)
            proc.wait()
        report = _drain(read_fd)
        os.close(read_fd)
        remove_tree(work)
    lines = report.split(b"\n")
    try:
        layers = {"namespaces": bool(prefix), **json.loads(lines[0])}
        started = True
    except ValueError:
        layers, started = {"namespaces": bool(prefix)}, False
        log.warning("sandbox child did not start (exit code %s)", proc.returncode)
    if started:
        _warn_once("landlock", not layers.get("landlock"), "Landlock unavailable: only the audit hook keeps "
                   "generated code from writing outside its work directory")
    completed = exited and proc.returncode == 0 and nonce.encode() in lines[1:]
    return RunResult(completed, proc.returncode, not exited, started, layers, work, marker)


def _warn_once(key: str, condition: bool, message: str) -> None:
    if condition and key not in _WARNED:
        _WARNED.add(key)
        log.warning("sandbox: %s", message)


def _wait_exit(pid: int, timeout_s: float) -> bool:
    """Wait up to `timeout_s` for `pid` to exit, without reaping it; True if it exited."""
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.02)


def _drain(fd: int) -> bytes:
    """Whatever the child wrote to the result pipe; never blocks (a survivor may hold the write end)."""
    os.set_blocking(fd, False)
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    return b"".join(chunks)
