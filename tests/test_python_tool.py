"""The `python` tool's sandbox: ordinary code runs, and every escape attempt is stopped with a clear result.

CI runs as root, where the sandbox is complete. As any other user the tool refuses every call (see the module's
docstring for why), so each test has two explicit outcomes: the sandboxed result as root, the refusal otherwise.
The time bounds below are hang checks with seconds of slack, not speed measurements.
"""

import ast
import os
import secrets
import socket
import time
from pathlib import Path

import pytest

from pocketgpt.errors import PocketError
from pocketgpt.tools import python as sandbox
from pocketgpt.tools.python import NEEDS_ROOT, SandboxLimits, python_tool, run_python

AS_ROOT = os.geteuid() == 0


def skip_if_refused(result: str) -> None:
    """As root the sandbox runs and the test goes on; as another user every call must be refused with
    NEEDS_ROOT, and the rest of the test is skipped (CI runs as root, so there nothing is skipped)."""
    assert AS_ROOT or result == NEEDS_ROOT
    if not AS_ROOT:
        pytest.skip("the sandbox needs root (the refusal was checked)")


def live_processes(uid: int) -> int:
    return sandbox._live_uids().get(uid, 0)


def test_ordinary_code_prints_exact_digits():
    result = python_tool("print(2**100)")
    skip_if_refused(result)
    assert result == "1267650600228229401496703205376\n"


def test_exception_returns_its_traceback():
    result = run_python("x = 1\nprint('before')\nx / 0")
    skip_if_refused(result)
    assert result.startswith("before\nTraceback (most recent call last):")
    assert result.endswith("ZeroDivisionError: division by zero\n")  # no "error:" verdict: no limit was hit


def test_output_is_truncated_in_the_middle():
    code = "import sys\nprint('a' * 10_000)\nprint('b' * 10_000, file=sys.stderr)\nraise KeyError('last words')"
    result = run_python(code, SandboxLimits(max_output_chars=100))
    skip_if_refused(result)
    stdout, _, stderr = result.partition("\nb")
    assert stdout == "a" * 50 + "\n... (truncated 9901 characters) ...\n" + "a" * 49  # + its newline
    assert "... (truncated " in stderr
    assert result.endswith("KeyError: 'last words'\n")  # the end of stderr survives the cut
    assert len(result) < 400


def test_working_directory_is_writable_and_removed(monkeypatch):
    made = []
    mkdtemp = sandbox.tempfile.mkdtemp
    monkeypatch.setattr(sandbox.tempfile, "mkdtemp", lambda **kw: made.append(mkdtemp(**kw)) or made[-1])
    code = ("import os, tempfile\nopen('notes.txt', 'w').write('kept')\nprint(open('notes.txt').read())\n"
            "print(tempfile.mkstemp()[1].startswith(os.getcwd()))\nprint(sorted(os.listdir('.')))")
    result = run_python(code)
    skip_if_refused(result)
    assert result.startswith("kept\nTrue\n['main.py', 'notes.txt', 'tmp")  # mkstemp's file, named tmp...
    assert made and not os.path.exists(made[0])


def test_infinite_loop_hits_the_time_limit():
    start = time.monotonic()
    result = run_python("while True:\n    pass", SandboxLimits(seconds=1))
    skip_if_refused(result)
    assert result == "error: time limit of 1 s exceeded"
    assert time.monotonic() - start < 1 + 3


def test_what_was_printed_before_the_time_limit_is_kept():
    """Block-buffered, the code's output died with it: the model read only the time limit."""
    result = run_python("print('partial result: 41')\nwhile True:\n    pass", SandboxLimits(seconds=1))
    skip_if_refused(result)
    assert result == "partial result: 41\nerror: time limit of 1 s exceeded"


@pytest.mark.parametrize("allocation", ["x = bytearray(10**10)", "x = [0] * 10**10",
                                        "x = ['y' * 10**6 for _ in range(10**4)]"])
def test_huge_allocation_hits_the_memory_limit(allocation):
    result = run_python(allocation)
    skip_if_refused(result)
    assert result.endswith("MemoryError\nerror: memory limit of 256 MB exceeded")


@pytest.fixture
def listener():
    """A TCP listener on 127.0.0.1 that the sandboxed code tries to reach."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        yield server


CONNECT = """import socket
for address in [("127.0.0.1", {port}), ("1.1.1.1", 53)]:
    try:
        socket.create_connection(address, timeout=2).close()
        print(address[0], "connected")
    except OSError as e:
        print(address[0], type(e).__name__, e.errno)
"""


def test_no_network(listener):
    result = run_python(CONNECT.format(port=listener.getsockname()[1]))
    skip_if_refused(result)
    # The sandbox's network namespace has only a loopback device, and it is down.
    assert result == "127.0.0.1 OSError 101\n1.1.1.1 OSError 101\n"
    with pytest.raises(BlockingIOError):
        listener.accept()  # nothing ever arrived


def test_network_when_allowed(listener):
    """The contrast to test_no_network: the same code, allowed the host's network, reaches the listener."""
    code = CONNECT.format(port=listener.getsockname()[1]).replace(', ("1.1.1.1", 53)', "")
    result = run_python(code, SandboxLimits(network=True))
    skip_if_refused(result)
    assert result == "127.0.0.1 connected\n"
    listener.accept()[0].close()


def test_cannot_write_outside_its_directory(tmp_path):
    token = secrets.token_hex(8)
    outside = [tmp_path / "escape.txt", Path(f"/tmp/pocketgpt_escape_{token}"),
               Path(f"/dev/shm/pocketgpt_escape_{token}")]
    code = "\n".join(["import errno",
                      f"for path in {[str(p) for p in outside]!r}:",
                      "    try:",
                      "        open(path, 'w').write('out')",
                      "        print('written')",
                      "    except OSError as e:",
                      "        print(errno.errorcode[e.errno])"])
    result = run_python(code)
    skip_if_refused(result)
    in_tmp_path, in_tmp, in_shm = result.splitlines()
    assert in_tmp_path in {"EACCES", "EROFS"}  # EACCES while pytest's base directory is private to root
    assert in_tmp == in_shm == "EROFS"  # world-writable on the host, read-only in the sandbox
    assert not any(p.exists() for p in outside)


def test_caller_environment_is_not_readable(monkeypatch):
    monkeypatch.setenv("POCKETGPT_SECRET", "s3cret")
    code = ("import os\nprint(sorted(os.environ.items()))\n"
            "for pid in (os.getppid(), 1):\n"
            "    try:\n        print(open(f'/proc/{pid}/environ').read())\n"
            "    except OSError as e:\n        print(type(e).__name__)")
    result = run_python(code)
    skip_if_refused(result)
    assert "s3cret" not in result and "POCKETGPT" not in result
    keys, caller, init, _ = result.split("\n")
    assert [k for k, _ in ast.literal_eval(keys)] == ["HOME", "LANG", "PATH", "TMPDIR"]
    assert caller == init == "FileNotFoundError"  # other users' processes are hidden in /proc


BOMB = "import os\nprint(os.getuid(), flush=True)\nwhile True:\n    os.fork()\n"
# This one survives failed forks and leaves the process group, so only the per-uid sweep can stop it.
STUBBORN_BOMB = ("import os\nprint(os.getuid(), flush=True)\nwhile True:\n    try:\n        if os.fork() == 0:\n"
                 "            os.setsid()\n    except OSError:\n        pass\n")


@pytest.mark.parametrize(("code", "verdict"), [(BOMB, "error: process limit of 16 exceeded"),
                                               (STUBBORN_BOMB, "error: time limit of 2 s exceeded")],
                         ids=["bomb", "stubborn-bomb"])
def test_fork_bomb_is_contained(code, verdict):
    start = time.monotonic()
    result = run_python(code, SandboxLimits(seconds=2))
    skip_if_refused(result)
    assert time.monotonic() - start < 2 + 4
    assert result.endswith(verdict)
    uid = int(result.split("\n", 1)[0])
    assert uid in sandbox._UIDS and live_processes(uid) == 0


def test_output_cut_at_the_file_size_limit_says_so():
    """Unbuffered, Python ignores the short write at the 16 MiB limit: the output was cut without a word."""
    result = run_python("import sys\nsys.stdout.write('A' * (50 << 20))")
    skip_if_refused(result)
    assert result.startswith("AAAA") and result.endswith("\nerror: file size limit of 16 MB exceeded (output included)")


def test_background_process_is_killed_when_the_code_ends():
    code = "import os, time\nprint(os.getuid())\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1000)\n"
    start = time.monotonic()
    result = run_python(code, SandboxLimits(seconds=30))
    skip_if_refused(result)
    assert time.monotonic() - start < 5  # the sleeper does not hold the call until the time limit
    assert live_processes(int(result)) == 0


# A daemon that stops every process of its uid started after it, as the code's own uid may: the cleanup once sent its
# kill from a helper process of that uid in the host's namespaces, which such a daemon stopped, then traced (writing
# to the host's /tmp, connecting to 127.0.0.1 through it) and let go, living on; or kept stopped, so the call hung.
STOPPER = """import os, signal, time
print(os.getuid(), flush=True)
main = os.getpid()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        mine, last_pid = {main, os.getppid(), os.getpid()}, os.open("/proc/sys/kernel/ns_last_pid", os.O_RDONLY)
        end = time.monotonic() + 30
        while time.monotonic() < end:
            last = int(os.pread(last_pid, 16, 0))
            for pid in set(range(last - 2, last + 1)) - mine:
                try:
                    os.kill(pid, signal.SIGSTOP)
                except OSError:
                    pass
    os._exit(0)
"""


def test_a_daemon_that_stops_new_processes_of_its_uid_is_killed_too():
    """The call returns at once with nothing of the code left, run in a process of its own so that a hang fails."""
    import subprocess
    import sys

    runner = f"from pocketgpt.tools.python import run_python\nprint(run_python({STOPPER!r}), end='')"
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", runner], capture_output=True, text=True, timeout=60)
    skip_if_refused(done.stdout)
    assert time.monotonic() - start < 15 and done.returncode == 0, done.stderr
    assert live_processes(int(done.stdout)) == 0


GARBAGE = bytes(range(256)) * 4


@pytest.mark.parametrize(("code", "expected"), [
    # Binary output, then both streams closed: the print fails (stdout is unbuffered) and Python exits with 1.
    (f"import os, sys\nsys.stdout.buffer.write({GARBAGE!r})\nsys.stdout.flush()\nos.close(1)\nos.close(2)\nprint(1)",
     GARBAGE.decode("utf-8", "replace") + "\nerror: exit status 1"),
    ("import os\nos.dup2(os.open('/dev/null', os.O_WRONLY), 1)\nprint('lost')\nos.write(2, b'kept')", "kept"),
    ("import os\nprint('lost', flush=True)\nos.ftruncate(1, 0)\nos.lseek(1, 0, 0)\nprint('moved')", "moved\n"),
], ids=["binary-then-closed", "redirected", "truncated"])
def test_mangled_output_does_not_break_the_caller(code, expected):
    result = run_python(code)
    skip_if_refused(result)
    assert result == expected


def test_refuses_without_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert run_python("print(1)") == NEEDS_ROOT


def test_refuses_when_the_kernel_cannot_isolate(monkeypatch):
    """An old kernel without mount_setattr(2) (simulated with an invalid system call number): refused, not run."""
    monkeypatch.setattr(sandbox, "_SYS_MOUNT_SETATTR", -1)
    result = run_python("print(1)")
    skip_if_refused(result)
    assert result == ("error: the sandbox cannot isolate the code here "
                      "(mount_setattr: [Errno 38] Function not implemented)")


def test_bad_arguments():
    assert python_tool(42) == "error: the code must be a string, not int"
    with pytest.raises(PocketError, match="seconds"):
        SandboxLimits(seconds=0)
    with pytest.raises(PocketError, match="memory_mb"):
        SandboxLimits(memory_mb=True)


def test_a_fork_bombs_interleaved_tracebacks_still_name_the_process_limit():
    """Its copies' tracebacks interleave in the one stderr file (a fresh-clone CI run ended on
    "BlockingIOError: BlockingIOError\\n: [Errno 11] ..."), and the last line alone named no limit."""
    interleaved = ("Traceback (most recent call last):\n  File \"main.py\", line 4, in <module>\n    os.fork()\n"
                   "BlockingIOError: BlockingIOError\n: [Errno 11] Resource temporarily unavailable\n")
    assert sandbox._verdict(SandboxLimits(), 1, False, interleaved, False) == "error: process limit of 16 exceeded"
    assert sandbox._verdict(SandboxLimits(), 0, False, "", False) == ""
