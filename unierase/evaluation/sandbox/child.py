"""The child's bootstrap: run as a script (`python -I child.py`) in the sandboxed child interpreter.

It reads its settings from stdin, applies the resource limits and Landlock, writes the layers it got to
the result pipe, installs the audit hook, runs the program and writes the run's nonce only if the
program returned. It is never imported from the unierase package and imports nothing beyond the standard
library modules below (and `resource` and `ctypes` where it needs them): whatever it loads, the code
under test finds already loaded.
"""
from __future__ import annotations

import json
import os
import sys

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
