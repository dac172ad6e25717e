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

Where each part lives:

  runner.py   run_python, Limits, RunResult: namespaces, launching the child, waiting, reading its report
  cleanup.py  killing every process of a run and waiting for them; removing the work directory
  child.py    the child's bootstrap (limits, Landlock, audit hook, harness), run as a script
              (`python -I child.py`): it reads its settings from stdin and imports only the standard library
"""
from unierase.evaluation.sandbox.cleanup import MARKER_VAR, remove_tree
from unierase.evaluation.sandbox.runner import Limits, RunResult, namespace_prefix, run_python

__all__ = ["MARKER_VAR", "Limits", "RunResult", "namespace_prefix", "remove_tree", "run_python"]
