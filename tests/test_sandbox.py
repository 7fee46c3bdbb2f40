"""The sandbox for generated code: each threat is run for real and shown to be contained.

Where a kernel layer is only available to root (a dedicated user id, which makes RLIMIT_NPROC bite and closes
other users' files) or where the kernel refuses a network namespace, the tests that bypass the Python guard check
``Result.isolation`` and skip; the guard-level tests run everywhere.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from smore.evaluation import humaneval_program, run_untrusted
from smore.evaluation import sandbox as sandbox_module

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox needs POSIX resource limits")

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


def sandbox_processes() -> list[str]:
    """Command lines of live processes started by the sandbox (their bootstrap names a smore-sandbox folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "smore-sandbox-" in cmdline and "-I -c" in cmdline:
                found.append(f"{entry.name}: {cmdline[:80]}")
    return found


def processes_of(uid: int) -> list[int]:
    return sandbox_module._processes_of(uid)


@pytest.fixture
def kernel_nproc():
    """Skip unless RLIMIT_NPROC really bounds the child (a dedicated user as root, or any non-root user): a fork bomb
    that bypasses the Python guard is only safe to run then."""
    probe = run_untrusted("pass", timeout=5)
    if ROOT and not probe.isolation.get("dedicated_user"):
        pytest.skip("root without an interpreter the dedicated user can run: RLIMIT_NPROC would not bite")
    return probe


def test_a_correct_solution_passes_and_a_wrong_one_fails():
    prompt = 'def add(a, b):\n    """Sum of a and b."""\n'
    test = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
    right = run_untrusted(humaneval_program(prompt, "    return a + b\n", test, "add"))
    wrong = run_untrusted(humaneval_program(prompt, "    return a - b\n", test, "add"))
    assert right.passed and right.status == "passed" and right.returncode == 0
    assert not wrong.passed and wrong.status == "failed" and "AssertionError" in wrong.stderr


def test_output_and_files_inside_the_working_directory_work():
    result = run_untrusted("open('note.txt', 'w').write('hi')\nprint(open('note.txt').read(), flush=True)")
    assert result.passed, result.stderr
    assert result.stdout == "hi\n"


def test_an_infinite_loop_times_out():
    start = time.monotonic()
    result = run_untrusted("while True:\n    pass\n", timeout=1.0)
    assert result.status == "timeout" and not result.passed
    assert time.monotonic() - start < 5
    assert sandbox_processes() == []


def test_a_memory_bomb_hits_the_memory_limit():
    result = run_untrusted("blocks = []\nwhile True:\n    blocks.append(bytearray(10**7))\n", timeout=10, memory_mb=256)
    assert not result.passed
    assert result.status == "memory", result.stderr
    assert result.duration < 10  # stopped by the limit, not by the clock


def test_a_fork_bomb_is_stopped_by_the_guard():
    result = run_untrusted("import os\nwhile True:\n    os.fork()\n", timeout=5)
    assert result.status == "failed" and "os.fork is not allowed" in result.stderr
    assert sandbox_processes() == []


def test_a_fork_bomb_past_the_guard_is_bounded_and_cleaned_up(kernel_nproc):
    # posix.fork is the raw system call wrapper the guard does not patch: only RLIMIT_NPROC stops it.
    bomb = "import posix\nwhile True:\n    try:\n        posix.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    result = run_untrusted(bomb, timeout=2.0, max_processes=8)
    assert result.status == "timeout" and not result.passed
    assert time.monotonic() - start < 10
    assert sandbox_processes() == []
    if result.isolation["dedicated_user"]:
        assert processes_of(result.isolation["uid"]) == []


def test_a_process_that_leaves_its_session_is_killed_at_the_end(kernel_nproc):
    if not kernel_nproc.isolation["dedicated_user"]:
        pytest.skip("only a dedicated user id lets the sandbox find processes that left the process group")
    daemon = "import posix, time\nif posix.fork() == 0:\n    posix.setsid()\n    time.sleep(60)\n"
    result = run_untrusted(daemon, timeout=5)
    assert result.passed  # the program itself ended normally
    assert processes_of(result.isolation["uid"]) == []
    assert sandbox_processes() == []


def test_writing_outside_the_working_directory_is_refused(tmp_path):
    target = tmp_path / "outside.txt"
    result = run_untrusted(f"open({str(target)!r}, 'w').write('escaped')")
    assert not result.passed and "PermissionError" in result.stderr
    assert not target.exists()
    for call in (f"import os\nos.remove({str(tmp_path)!r})", f"import os\nos.mkdir({str(tmp_path / 'd')!r})"):
        assert "not allowed" in run_untrusted(call).stderr
    assert list(tmp_path.iterdir()) == []


def test_writing_outside_past_the_guard_is_refused_by_the_kernel(tmp_path):
    probe = run_untrusted("pass")
    if not probe.isolation["dedicated_user"]:
        pytest.skip("the evaluator's own user may write its own folders; only a dedicated user id stops this")
    target = tmp_path / "outside.txt"
    bypass = f"import posix\nposix.open({str(target)!r}, posix.O_WRONLY | posix.O_CREAT)"
    result = run_untrusted(bypass)
    assert not result.passed and "Permission denied" in result.stderr
    assert not target.exists()


def test_the_environment_holds_no_secrets(monkeypatch):
    monkeypatch.setenv("SECRET", "hunter2")
    assert os.environ["SECRET"] == "hunter2"
    result = run_untrusted("import os\nprint(sorted(os.environ))\nassert os.environ.get('SECRET') is None")
    assert result.passed, result.stderr
    assert "SECRET" not in result.stdout and "hunter2" not in result.stdout
    if result.isolation["dedicated_user"]:  # and the parent's environment cannot be read through /proc
        peek = run_untrusted("import os\nprint(open(f'/proc/{os.getppid()}/environ', 'rb').read())")
        assert not peek.passed and "Permission denied" in peek.stderr and "hunter2" not in peek.stdout


def test_the_network_is_blocked():
    result = run_untrusted("import socket\nsocket.create_connection(('127.0.0.1', 9))")
    assert not result.passed and "network access is not allowed" in result.stderr
    result = run_untrusted("import socket\nsocket.socket()")
    assert not result.passed and "network access is not allowed" in result.stderr


def test_the_network_namespace_stops_raw_sockets():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        code = f"import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))"
        result = run_untrusted(code, timeout=5)
    if result.isolation["network"] != "namespace":
        pytest.skip("the kernel refused a network namespace here: only the Python guard blocks sockets")
    assert not result.passed and "OSError" in result.stderr


def test_an_early_exit_is_not_a_pass():
    for code in ("import sys\nsys.exit(0)\nassert False", "import os\nos._exit(0)\nassert False", "exit()\n"):
        result = run_untrusted(code)
        assert result.status == "failed" and not result.passed, code
    assert run_untrusted("import sys\nsys.exit(3)").returncode == 3


def test_output_floods_are_capped():
    result = run_untrusted("while True:\n    print('x' * 1000)\n", timeout=10, file_mb=1)
    assert not result.passed and result.status in ("failed", "killed")
    assert len(result.stdout) <= sandbox_module.OUTPUT_LIMIT + 100


def test_without_a_dedicated_user_the_process_group_is_still_killed(monkeypatch):
    # The evaluator's own user (what a non-root evaluator, or root without a readable interpreter, gets).
    monkeypatch.setattr(sandbox_module, "_interpreter_for", lambda uid: None)
    assert run_untrusted("print('ok')").isolation["dedicated_user"] is False
    assert run_untrusted("assert 2 + 2 == 4").passed
    result = run_untrusted("while True:\n    pass\n", timeout=1.0)
    assert result.status == "timeout"
    assert sandbox_processes() == []


def test_setup_errors_are_raised_not_scored():
    with pytest.raises(RuntimeError, match="before the program started"):
        run_untrusted("print(1)", memory_mb=1)
    with pytest.raises(ValueError, match="timeout"):
        run_untrusted("print(1)", timeout=0)
