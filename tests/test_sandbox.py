"""Canaries for the HumanEval sandbox (issue #19): each escape is contained and scored as a failure.

Most canaries run twice: with the in-process audit hook (the normal case) and without it
(`guards=False`), so that the kernel layers (namespaces, Landlock, rlimits, process sweep) are shown
to contain the escape on their own wherever this machine has them.
"""

from __future__ import annotations

import functools
import http.server
import os
import threading
import time
from pathlib import Path

import pytest

from unierase.evaluation import sandbox
from unierase.evaluation import utility_metrics as um
from unierase.evaluation.sandbox import cleanup, runner

ADD_TEST = "def check(candidate):\n    assert candidate(1, 2) == 3\n"
GOOD = "def add(a, b):\n    return a + b\n"


def program(code: str) -> str:
    """What humaneval_passes runs: completion, test, check call."""
    return f"{code}\n\n{ADD_TEST}\n\ncheck(add)\n"


def survivors(marker: str) -> list[int]:
    """Live processes tagged with this run's marker."""
    tag = f"{sandbox.MARKER_VAR}={marker}".encode()
    pids = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/environ", "rb") as fh:
                tagged = tag in fh.read().split(b"\0")
            with open(f"/proc/{name}/stat", "rb") as fh:
                alive = fh.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
        except OSError:
            continue
        if tagged and alive:
            pids.append(int(name))
    return pids


@functools.cache
def layers() -> dict[str, object]:
    """The layers this machine gives the sandbox."""
    return sandbox.run_python("pass").layers


@pytest.fixture(params=[True, False], ids=["guards", "kernel-only"])
def guards(request: pytest.FixtureRequest) -> bool:
    return request.param


def need_kernel_layer(guards: bool, available: bool, what: str) -> None:
    if not guards and not available:
        pytest.skip(f"no kernel layer against {what} on this machine")


@pytest.fixture(params=[True, False], ids=["namespaces", "no-namespaces"])
def namespaces(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Run with the probed namespaces, and again as if `unshare --user` were unavailable."""
    if request.param and not sandbox.namespace_prefix():
        pytest.skip("user namespaces unavailable here")
    if not request.param:
        monkeypatch.setattr(runner, "_NAMESPACE_PREFIX", [])
    return request.param


def test_correct_passes_wrong_fails_and_layers_reported():
    result = sandbox.run_python(program(GOOD))
    assert result.completed and result.started and result.returncode == 0
    assert result.layers["audit_hook"] is True and "RLIMIT_AS" in result.layers["rlimits"]
    assert not os.path.exists(result.workdir)
    assert not sandbox.run_python(program("def add(a, b):\n    return a - b\n")).completed
    assert um.humaneval_passes(GOOD, ADD_TEST, "add")
    assert not um.humaneval_passes("def add(a, b):\n    return a - b\n", ADD_TEST, "add")


def test_child_bootstrap_is_self_contained():
    # child.py runs by path (`python -I`): it must load nothing of the package, and nothing that forks.
    code = ("import sys\nloaded = {name.partition('.')[0] for name in sys.modules}\n"
            "assert not loaded & {'unierase', 'subprocess', '_posixsubprocess'}, loaded\n" + GOOD)
    assert sandbox.run_python(program(code)).completed
    assert not sandbox.run_python(program("import sys\nassert 'unierase' in sys.modules\n" + GOOD)).completed


def test_ordinary_solutions_still_work():
    # typing/namedtuple use sys._getframe, numpy imports ctypes: the guards must not break them.
    code = ("from typing import List\nimport collections, math, re, hashlib, itertools\n"
            "P = collections.namedtuple('P', 'x')\nimport numpy as np\n"
            "with open('scratch.txt', 'w') as fh:\n    fh.write('work dir is writable')\n" + GOOD)
    assert sandbox.run_python(program(code)).completed


@pytest.mark.parametrize("exit_call", ["import os\nos._exit(0)", "import sys\nsys.exit(0)", "raise SystemExit"])
def test_exit_zero_before_the_harness_reports_is_a_failure(exit_call: str):
    result = sandbox.run_python(program(GOOD + exit_call))
    assert not result.completed and result.started
    assert not um.humaneval_passes(GOOD + exit_call, ADD_TEST, "add")


def test_write_outside_the_work_dir_is_contained(guards: bool, tmp_path: Path):
    need_kernel_layer(guards, bool(layers().get("landlock")), "writes")
    targets = [tmp_path / "escaped.txt", Path.cwd() / f"canary_{os.getpid()}.txt",
               Path(os.path.expanduser("~")) / f"canary_{os.getpid()}.txt"]
    try:
        for target in targets:  # one canary per target: the first refusal must not hide the others
            result = sandbox.run_python(program(f"open({str(target)!r}, 'w').write('escaped')\n" + GOOD),
                                        guards=guards)
            assert not result.completed and result.started
            assert not target.exists()
    finally:
        for target in targets:
            target.unlink(missing_ok=True)


def test_network_is_contained(guards: bool):
    need_kernel_layer(guards, bool(layers()["namespaces"]) or layers().get("landlock", 0) >= 4, "network")
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/canary"
        code = f"import urllib.request\nurllib.request.urlopen({url!r}, timeout=2).read()\n" + GOOD
        result = sandbox.run_python(program(code), timeout_s=5.0, guards=guards)
        assert not result.completed and result.started
        assert hits == []
    finally:
        server.shutdown()
        server.server_close()


def test_fork_bomb_is_refused():
    start = time.monotonic()
    result = sandbox.run_python(program("import os\nwhile True:\n    os.fork()\n" + GOOD), timeout_s=2.0)
    assert not result.completed and not result.timed_out  # the first fork already raised
    assert time.monotonic() - start < 5
    assert survivors(result.marker) == []


def test_forked_processes_are_bounded_and_killed(namespaces: bool):
    # Without the hook, so the forks happen; capped at 30, since real root ignores RLIMIT_NPROC.
    code = ("import os, time\nfor _ in range(30):\n    try:\n        pid = os.fork()\n    except OSError:\n"
            "        break\n    if pid == 0:\n        time.sleep(60)\n        os._exit(0)\ntime.sleep(60)\n")
    start = time.monotonic()
    result = sandbox.run_python(code, timeout_s=1.0, guards=False)
    assert not result.completed and result.timed_out
    assert time.monotonic() - start < 8
    assert survivors(result.marker) == []


@pytest.mark.parametrize("parent", ["hangs", "returns"])
def test_setsid_grandchild_is_killed_and_cleanup_survives(namespaces: bool, parent: str, tmp_path: Path):
    # The crash: a double-forked setsid grandchild outlives the timeout kill and writes
    # into the temp dir 6 s later while the parent removes it. Here it waits 1 s.
    late = tmp_path / "late.txt"
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            "        time.sleep(1.0)\n        open('late.txt', 'w').write('x')\n"
            f"        open({str(late)!r}, 'w').write('x')\n        os._exit(0)\n    os._exit(0)\n"
            + ("time.sleep(60)\n" if parent == "hangs" else GOOD))
    result = sandbox.run_python(code if parent == "hangs" else program(code), timeout_s=1.0, guards=False)
    assert result.started and result.timed_out is (parent == "hangs")
    assert survivors(result.marker) == []
    time.sleep(1.5)  # past the moment the grandchild would have written
    assert not os.path.exists(result.workdir) and not late.exists()


def test_grandchild_is_refused_with_guards():
    code = "import os\nif os.fork() == 0:\n    os.setsid()\n    os._exit(0)\n" + GOOD
    assert not sandbox.run_python(program(code)).completed


HOGS = {"at-once": "x = bytearray(8 << 30)\n", "growing": "x = []\nwhile True:\n    x.append(bytearray(200 << 20))\n"}


@pytest.mark.parametrize("hog", HOGS.values(), ids=HOGS.keys())
def test_memory_hog_fails(guards: bool, hog: str):
    start = time.monotonic()
    result = sandbox.run_python(program(hog + GOOD), timeout_s=5.0, guards=guards)
    assert not result.completed and not result.timed_out  # MemoryError at the address-space limit
    assert time.monotonic() - start < 5


def test_large_file_fails():
    code = "open('big.bin', 'wb').write(b'x' * (64 << 20))\n" + GOOD
    assert not sandbox.run_python(program(code), limits=sandbox.Limits(file_bytes=1 << 20)).completed


def test_cleanup_never_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    def broken_rmtree(*args: object, **kwargs: object) -> None:
        raise OSError(39, "Directory not empty")  # what a late writer caused in the issue

    monkeypatch.setattr(cleanup.shutil, "rmtree", broken_rmtree)
    sandbox.remove_tree(str(tmp_path))  # no exception, a logged warning
    result = sandbox.run_python(program(GOOD))
    assert result.completed  # the run itself is unaffected
    monkeypatch.undo()
    sandbox.remove_tree(result.workdir)
    assert not os.path.exists(result.workdir)
