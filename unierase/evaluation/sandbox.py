"""Run untrusted Python (model-generated HumanEval code) in a throw-away sandbox.

`run_python(source)` runs `source` in a fresh child interpreter and reports whether it ran to its end.
Each layer below stops the issue's canaries on its own where it exists; together they give the
human-eval/evalplus isolation and more, as far as Linux allows without root:

1. Namespaces (`unshare --user --net --pid`, where user namespaces are allowed): no network interface
   but a down loopback; a PID namespace whose init is the child, so the kernel kills every process the
   code left behind the moment the child ends; no capabilities (it runs as uid 65534 inside).
2. Landlock (Linux >= 5.13, unprivileged): writes, deletes and renames only beneath the work
   directory, no execve of any file, and from ABI 4 no TCP connect/bind, from ABI 6 no signals to
   processes outside the sandbox.
3. Resource limits in the child: address space, CPU seconds, file size, processes, open files, no cores.
4. In-process guards: an audit hook refuses fork/exec/spawn/system/kill, sockets, ctypes, writes
   outside the work directory and reads of /proc. A tripwire rather than a wall (Python code can
   tamper with the modules the hook relies on), which is why the kernel layers exist.
5. Process hygiene in the parent: the child leads its own session; afterwards everything in that
   session or process group, and every process carrying this run's marker in its environment, is
   SIGKILLed and waited for before the work directory is removed, and removal never raises.

A run counts as completed only when the harness writes this run's random nonce to a private pipe after
`source` returned; `os._exit(0)` or `sys.exit(0)` before that is a failure whatever the exit code.
The nonce stops early exits, not code that reads the interpreter's memory for it.

This file is also the child's entry point (`python -I sandbox.py`): the child reads its settings from
stdin, so it imports nothing beyond what is imported below.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# Environment variable that tags every process of one run (the value is random per run).
MARKER_VAR = "UNIERASE_SANDBOX"


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


# ------------------------------------------------------------------------------ parent side

_WARNED: set[str] = set()
_NAMESPACE_PREFIX: list[str] | None = None


def namespace_prefix() -> list[str]:
    """The `unshare` command line that puts the child in fresh user/net/pid namespaces; [] if unavailable.

    Probed once per process by running a child that must see itself as PID 1.
    """
    global _NAMESPACE_PREFIX
    if _NAMESPACE_PREFIX is None:
        import subprocess  # parent only, see _child_main

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
    import secrets
    import subprocess  # parent only, see _child_main

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
            [*prefix, sys.executable, "-I", os.path.abspath(__file__)],
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


# ------------------------------------------------------------------------------- child side

# Landlock constants (include/uapi/linux/landlock.h); the syscall numbers are the same on all
# architectures that have Landlock's generic syscall table entries (x86_64, aarch64, ...).
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_FS_EXECUTE, _FS_WRITE_FILE = 1 << 0, 1 << 1
_FS_WRITE_DIR = sum(1 << bit for bit in range(4, 13))  # remove dir/file, make char/dir/reg/sock/fifo/block/sym
_FS_REFER, _FS_TRUNCATE = 1 << 13, 1 << 14
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX, _SCOPE_SIGNAL = 1 << 0, 1 << 1

_DENIED_EVENTS = frozenset({
    "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "os.kill", "os.killpg",
    "subprocess.Popen", "pty.spawn", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
})
_DENIED_PREFIXES = ("socket.", "ctypes.")
# Modules that fork or call C without audit events; the bootstrap never loads them.
_DENIED_IMPORTS = frozenset({"_posixsubprocess", "cffi", "_cffi_backend"})
# Audit events that change the file system: positions of their path arguments.
_PATH_EVENTS = {
    "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.link": (0, 1),
    "os.symlink": (1,), "os.chmod": (0,), "os.chown": (0,), "os.utime": (0,), "os.truncate": (0,),
    "os.chdir": (0,), "os.mkfifo": (0,), "os.mknod": (0,), "os.setxattr": (0,), "os.removexattr": (0,),
    "shutil.rmtree": (0,),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _set_limits(limits: dict[str, int], cpu_s: int) -> list[str]:
    """Apply the resource limits to this process and its descendants; names of those that took."""
    import resource

    wanted = {
        "RLIMIT_AS": limits["memory_bytes"], "RLIMIT_CPU": cpu_s, "RLIMIT_FSIZE": limits["file_bytes"],
        "RLIMIT_NPROC": limits["processes"], "RLIMIT_NOFILE": limits["open_files"], "RLIMIT_CORE": 0,
    }
    applied = []
    for name, value in wanted.items():
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
            applied.append(name)
        except (AttributeError, ValueError, OSError):
            pass
    return applied


def _landlock(workdir: str) -> int:
    """Restrict this process and its descendants with Landlock; the ABI version applied, 0 if none."""
    if not sys.platform.startswith("linux"):
        return 0
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(ctypes.c_long(_SYS_CREATE_RULESET), None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return 0
    fs = _FS_EXECUTE | _FS_WRITE_FILE | _FS_WRITE_DIR | (_FS_REFER if abi >= 2 else 0)
    fs |= _FS_TRUNCATE if abi >= 3 else 0
    net = _NET_BIND_TCP | _NET_CONNECT_TCP if abi >= 4 else 0
    scoped = _SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL if abi >= 6 else 0

    class RulesetAttr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    # Older kernels reject fields they do not know, so pass only the prefix this ABI has.
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    attr = RulesetAttr(fs, net, scoped)
    ruleset = libc.syscall(ctypes.c_long(_SYS_CREATE_RULESET), ctypes.byref(attr), ctypes.c_size_t(size),
                           ctypes.c_uint32(0))
    if ruleset < 0:
        return 0
    try:
        # Everything handled is denied except: writing beneath the work dir, and writing /dev/null.
        for path, allowed in ((workdir, fs & ~_FS_EXECUTE), ("/dev/null", _FS_WRITE_FILE | (fs & _FS_TRUNCATE))):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            rule = PathBeneath(allowed, fd)
            rc = libc.syscall(ctypes.c_long(_SYS_ADD_RULE), ctypes.c_long(ruleset), ctypes.c_long(1),
                              ctypes.byref(rule), ctypes.c_uint32(0))
            os.close(fd)
            if rc < 0:
                return 0
        # Required to restrict oneself without CAP_SYS_ADMIN; also stops setuid binaries gaining rights.
        if libc.prctl(ctypes.c_int(38), ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0),
                      ctypes.c_ulong(0)) != 0:  # PR_SET_NO_NEW_PRIVS
            return 0
        if libc.syscall(ctypes.c_long(_SYS_RESTRICT_SELF), ctypes.c_long(ruleset), ctypes.c_uint32(0)) < 0:
            return 0
    finally:
        os.close(ruleset)
    return abi


def _install_guards(workdir: str) -> None:
    """Audit hook refusing process creation, network, ctypes, /proc and writes outside `workdir`."""
    realpath, fspath, sep = os.path.realpath, os.fspath, os.sep  # bound now: later monkeypatching cannot swap them

    def resolve(path: object) -> str | None:
        if isinstance(path, int):  # an already open descriptor
            return None
        path = fspath(path)
        return realpath(path.decode(errors="surrogateescape") if isinstance(path, bytes) else path)

    def inside(path: object) -> bool:
        resolved = resolve(path)
        return resolved is None or resolved == workdir or resolved.startswith(workdir + sep)

    def hook(event: str, args: tuple) -> None:
        if event in _DENIED_EVENTS or event.startswith(_DENIED_PREFIXES):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0].partition(".")[0] in _DENIED_IMPORTS:
            raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
        if event == "open":
            path, mode, flags = args
            resolved = resolve(path)
            if resolved is not None and (resolved == "/proc" or resolved.startswith("/proc/")):
                raise PermissionError("sandbox: /proc is not readable")
            writes = flags & _WRITE_FLAGS if isinstance(flags, int) else any(c in (mode or "") for c in "wax+")
            if writes and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} is not allowed")
        for index in _PATH_EVENTS.get(event, ()):
            if not inside(args[index]):
                raise PermissionError(f"sandbox: {event} on {args[index]!r} is not allowed")

    # Loaded before the hook (importing it runs dlopen) so that numpy and co. can import it; every
    # ctypes call into C raises a ctypes.* event and is refused.
    import ctypes  # noqa: F401

    sys.addaudithook(hook)


def _child_main() -> None:
    """Bootstrap: read settings, lock down, run the program, report the nonce only if it returned."""
    raw = b""
    while chunk := os.read(0, 65536):
        raw += chunk
    settings = json.loads(raw)
    del raw
    nonce, result_fd, workdir = settings.pop("nonce"), settings["result_fd"], settings["workdir"]
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # the code must not find the settings on stdin
    os.close(devnull)
    try:
        landlock = _landlock(workdir)
    except OSError:  # reported as missing (and warned about) rather than failing every run
        landlock = 0
    layers = {"rlimits": _set_limits(settings["limits"], settings["cpu_s"]), "landlock": landlock,
              "audit_hook": bool(settings["guards"])}
    os.write(result_fd, json.dumps(layers).encode() + b"\n")
    with open(settings["program"], encoding="utf-8") as fh:
        code = compile(fh.read(), settings["program"], "exec")
    if settings["guards"]:
        _install_guards(workdir)
    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except BaseException:  # noqa: BLE001 - any exception, SystemExit(0) included, is a failure
        os._exit(1)
    os.write(result_fd, b"\n" + nonce.encode() + b"\n")
    # Exit at once: atexit handlers and threads the code registered get no chance to run.
    os._exit(0)


if __name__ == "__main__":
    _child_main()
