"""The `python` tool: run model-written code in a sandbox and return what it printed.

Model-written code is untrusted, so every limit below is enforced by the kernel, for a separate process; none is a
Python-level patch that the code could undo (with ctypes, say). The layers (1-4 are set up by the child between fork
and exec, as root, see _ChildSetup):

1. Namespaces. A private mount namespace (the filesystem changes below are invisible to the host), a private network
   namespace (only a loopback device, and it is down: every connect fails, 127.0.0.1 included, so the caller's local
   services are unreachable too), a private IPC namespace (SysV shared memory and message queues cannot reach, or
   outlive into, the host's).
2. A read-only filesystem. One `mount_setattr(2)` call makes every mount read-only, recursively; then a fresh tmpfs
   (its size capped by `memory_mb`) is mounted on the working directory, the only writable place. World-writable
   directories (/tmp, /dev/shm, ...) are therefore not writable either. /proc is remounted with `hidepid=2`: the code
   sees only its own processes, not the caller's command lines. If the interpreter lives below a directory other
   users may not enter (pyenv under /root, as on our CI), that directory is covered by an empty tmpfs and only the
   interpreter's directories are bound back, so the code can run Python without seeing the rest.
3. A throw-away user. The child drops from root to a fresh random uid (no groups, no capabilities, `no_new_privs`):
   it owns no file, cannot signal or trace any other process, cannot read /proc/<pid>/environ of the caller. A fresh
   uid rather than `nobody` because RLIMIT_NPROC counts per uid: every run gets its whole budget, a concurrent run
   (or a daemon running as nobody) cannot eat it, and cleanup can kill "everything of this uid" without touching
   anything else. The uids come from 0x70000000-0x70FFFFFF, which systemd's table of UID ranges marks unused.
4. Resource limits (setrlimit): RLIMIT_AS (`memory_mb`; an oversized allocation raises MemoryError), RLIMIT_NPROC
   (`max_processes` processes and threads of that uid: a fork bomb stops there), RLIMIT_CPU (a backstop one second
   beyond the wall-clock limit), RLIMIT_FSIZE (16 MiB per file, so the output files below cannot fill the caller's
   memory) and RLIMIT_CORE 0.
5. A minimal process: `python -I -S main.py` (no user site, no PYTHON* variables, no site-packages, so no exit()
   either: sys.exit() works), an environment of PATH, HOME, TMPDIR and LANG only (the caller's variables never reach
   it), stdin /dev/null, its own session. The code is written to main.py in the working directory, so that
   tracebacks quote its lines.
6. The clock and the cleanup. The caller waits `seconds` of wall-clock time, then kills the process group; then,
   whatever happened, it stops every process of the sandbox's uid until all are stopped, and kills them (`_kill_all`,
   from the caller, as root), so neither a fork bomb nor a process that left the group with setsid() escapes, and
   the call returns only when they are gone. No process of the sandbox's uid ever runs outside the namespaces: the
   code could stop or trace it (same uid) and act through it.

Output goes to two memfds (never a pipe the caller would have to drain while the code runs), read afterwards: stdout,
then stderr, each cut to `max_output_chars` in the middle (the start of the output and the final traceback line both
survive). A limit that was hit adds a last line such as "error: time limit of 5 s exceeded".

Root is required: dropping to another uid and building the namespaces need it (CI and containers run as root).
Without root the code could only run as the caller's own user, which can read the caller's files, signal its
processes, read their environment and talk to its agents (ssh-agent, the session bus); user namespaces change none of
that short of building a whole private root filesystem. So without root `run_python` refuses, in one line.

Known gaps:
- RLIMIT_AS is a limit per process: code that forks can hold up to `memory_mb` in each of `max_processes`
  processes (16 x 256 MB), until the time limit. A memory cgroup for the whole sandbox would close this too
  (cgroup v1 and v2 differ, and neither is always writable, so it is not done here).
- RLIMIT_AS bounds the address space, not memory held through file descriptors: memfds (16 MiB each, by RLIMIT_FSIZE),
  SysV shared memory, pipe buffers. Code that sets out to hoard memory that way can hold more than `memory_mb` until
  the time limit; a memory cgroup would close this.
- The code may create user namespaces. It gains nothing inside them (the read-only mounts are locked, there is no
  network device), but they are kernel attack surface; a seccomp filter would close this.
- If the caller itself is SIGKILLed mid-run, the main process dies with it (parent-death signal) but processes the
  code forked survive until their CPU limit (or, if they only sleep, indefinitely).
- World-readable files stay readable, and Unix sockets with world-writable permissions on the host filesystem stay
  connectable (a network namespace does not cover path-based Unix sockets).
"""

from __future__ import annotations

import ctypes
import math
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from ..errors import PocketError
from . import clip


@dataclass(frozen=True)  # frozen: one instance is the shared default of run_python, nobody may change it
class SandboxLimits:
    seconds: float = 5.0  # wall-clock limit
    memory_mb: int = 256  # address-space limit (RLIMIT_AS); also the size of the working directory's tmpfs
    max_processes: int = 16  # processes and threads the code may have at once (RLIMIT_NPROC of its uid)
    max_output_chars: int = 4000  # of stdout and of stderr each; the middle is cut with a marker
    network: bool = False  # True: share the host's network (the code still runs as a throw-away uid)

    def __post_init__(self):
        if not (isinstance(self.seconds, (int, float)) and 0 < self.seconds < math.inf):
            raise PocketError(f"sandbox seconds must be a positive number, got {self.seconds!r}")
        # The interpreter with a few stdlib modules peaks at ~15 MB of address space; below 32 it may not start.
        for name, least in (("memory_mb", 32), ("max_processes", 1), ("max_output_chars", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise PocketError(f"sandbox {name} must be an integer >= {least}, got {value!r}")


NEEDS_ROOT = ("error: the Python sandbox needs root here (it runs the code as a throw-away user in private "
              "namespaces; without root it could only run it as your own user)")
_UIDS = range(0x7000_0000, 0x7100_0000)
_MAX_FILE_BYTES = 16 << 20

# Linux constants (<sched.h>, <sys/mount.h>, <linux/mount.h>, <linux/prctl.h>); identical on x86-64 and arm64.
_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWNET = 0x0002_0000, 0x0800_0000, 0x4000_0000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_BIND, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x8, 0x1000, 0x4000, 0x4_0000
_SYS_MOUNT_SETATTR, _AT_FDCWD, _AT_RECURSIVE, _MOUNT_ATTR_RDONLY = 442, -100, 0x8000, 0x1
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38


class _MountAttr(ctypes.Structure):  # struct mount_attr, the argument of mount_setattr(2)
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def run_python(code: str, limits: SandboxLimits = SandboxLimits()) -> str:
    """Run code in a separate, limited process; return what it printed (stdout, then stderr), with a last line
    "error: ..." when a limit stopped it, or a one-line refusal. Never raises for anything the code does, never
    waits much longer than `limits.seconds`."""
    if not isinstance(code, str):
        return f"error: the code must be a string, not {type(code).__name__}"
    if sys.platform != "linux":
        return "error: the Python sandbox needs Linux (namespaces, mount_setattr)"
    if os.geteuid() != 0:
        return NEEDS_ROOT
    uid = _fresh_uid()
    workdir = tempfile.mkdtemp(prefix="pocketgpt-python-")
    try:
        return _run(code, limits, uid, workdir)
    finally:
        # Only an empty mount point on the host: the code's files lived in the sandbox's own tmpfs.
        shutil.rmtree(workdir, ignore_errors=True)


SPEC = {"type": "function", "function": {
    "name": "python", "description": "Run Python code in a sandbox (no network, 5 s, 256 MB a process) and read what it printed.",
    "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}}}


def python_tool(code: str) -> str:
    """The `python` tool: the model sends {"code": "..."} and reads back what the code printed."""
    return run_python(code)


def _run(code: str, limits: SandboxLimits, uid: int, workdir: str) -> str:
    with ExitStack() as stack:
        out, err = os.memfd_create("pocketgpt-stdout"), os.memfd_create("pocketgpt-stderr")
        report_r, report_w = os.pipe()  # the child's reason, should its setup fail before exec
        for fd in (out, err, report_r):
            stack.callback(os.close, fd)
        setup = _ChildSetup(code, limits, uid, workdir, report_w)
        try:
            proc = subprocess.Popen(
                # -u: what the code prints reaches the file at once, so a run killed at its time limit
                # keeps what it printed before (block-buffered, up to 8 KB of it was lost)
                [sys.executable, "-I", "-S", "-u", "main.py"], stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                env={"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"},
                start_new_session=True, umask=0o022, preexec_fn=setup)
        except subprocess.SubprocessError:  # raised in the child by _ChildSetup, which wrote why
            os.close(report_w)
            return f"error: the sandbox cannot isolate the code here ({os.read(report_r, 1000).decode(errors='replace')})"
        except OSError as e:  # exec itself failed
            os.close(report_w)
            return f"error: the sandbox cannot start Python ({e.strerror}: {sys.executable})"
        os.close(report_w)

        timed_out = False
        try:
            proc.wait(timeout=limits.seconds)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # also when the caller is interrupted meanwhile
            if proc.returncode is None:
                # Not reaped yet, so its group id cannot have passed to an unrelated process group.
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            _kill_all(uid)
        stdout, stderr = _read(out), _read(err)
        # Python ignores the short write at the file-size limit when unbuffered (-u): no error to read, only the size
        full = any(os.fstat(fd).st_size >= _MAX_FILE_BYTES for fd in (out, err))

    limit = limits.max_output_chars
    return _lines(clip(stdout, limit), clip(stderr, limit),
                  _verdict(limits, proc.returncode, timed_out, stderr, full))


class _ChildSetup:
    """What the child does between fork and exec, as root: namespaces, mounts, then the drop to `uid` and the
    limits. Everything is prepared here, in the caller: the child, a copy of a possibly multi-threaded caller, runs
    only thin wrappers around system calls, never anything (an import, a dlsym) that needs a lock another thread
    might have held at fork time."""

    def __init__(self, code: str, limits: SandboxLimits, uid: int, workdir: str, report_fd: int):
        libc = ctypes.CDLL(None, use_errno=True)
        self.unshare, self.mount, self.syscall, self.prctl = libc.unshare, libc.mount, libc.syscall, libc.prctl
        self.code = code.encode("utf-8", "surrogatepass")  # a lone surrogate becomes Python's own SyntaxError
        self.limits, self.uid, self.workdir, self.report_fd = limits, uid, workdir, report_fd
        self.clone_flags = _CLONE_NEWNS | _CLONE_NEWIPC | (0 if limits.network else _CLONE_NEWNET)
        # Recursively read-only, and private: nothing mounted in the sandbox propagates back to the host.
        self.read_only = _MountAttr(attr_set=_MOUNT_ATTR_RDONLY, propagation=_MS_PRIVATE)
        self.tmpfs_options = f"size={limits.memory_mb}m,mode=0700,uid={uid},gid={uid}".encode()
        self.hidden, self.exposed = _exposure([workdir], _interpreter_dirs())
        self.step = ""

    def __call__(self):
        try:
            self._enter()
        except (OSError, ValueError) as e:  # ValueError: setrlimit above a hard limit the caller already had
            os.write(self.report_fd, f"{self.step}: {e}".encode())
            raise

    def _enter(self):
        self.step = "unshare"
        self._check(self.unshare(self.clone_flags))
        self.step = "mount_setattr"  # Linux >= 5.12
        self._check(self.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_long(_AT_FDCWD), ctypes.c_char_p(b"/"),
                                 ctypes.c_long(_AT_RECURSIVE), ctypes.byref(self.read_only),
                                 ctypes.c_long(ctypes.sizeof(self.read_only))))
        # Opened in the new namespace (a bind source must be a mount of this namespace), before the hiding.
        exposed = [(os.open(path, os.O_PATH | os.O_DIRECTORY), path) for path in self.exposed]
        for directory in self.hidden:
            self._mount(b"tmpfs", directory, b"tmpfs", _MS_NOSUID | _MS_NODEV, b"mode=0755,size=1m")
        for fd, path in exposed:
            os.makedirs(path, 0o755, exist_ok=True)
            self._mount(f"/proc/self/fd/{fd}", path, None, _MS_BIND | _MS_REC, None)
        os.makedirs(self.workdir, 0o755, exist_ok=True)
        self._mount(b"tmpfs", self.workdir, b"tmpfs", _MS_NOSUID | _MS_NODEV, self.tmpfs_options)
        self._mount(b"proc", "/proc", b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, b"hidepid=2")
        os.chdir(self.workdir)  # the tmpfs, not the host directory under it
        self.step = "main.py"
        fd = os.open("main.py", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        view = memoryview(self.code)
        while view:
            view = view[os.write(fd, view):]
        os.close(fd)

        self.step = "drop privileges"
        os.setgroups([])
        os.setgid(self.uid)
        os.setuid(self.uid)
        self._check(self.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))  # setuid binaries cannot give root back
        self._check(self.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0))  # after setuid, which clears it
        self.step = "setrlimit"
        cpu = math.ceil(self.limits.seconds) + 1
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_FSIZE, (_MAX_FILE_BYTES, _MAX_FILE_BYTES))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_NPROC, (self.limits.max_processes, self.limits.max_processes))
        memory = self.limits.memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))  # last: this copy of the caller is far bigger

    def _mount(self, source, target, fstype, flags, options):
        self.step = f"mount {os.fsdecode(target)}"
        self._check(self.mount(_bytes(source), _bytes(target), fstype, flags, options))

    @staticmethod
    def _check(result: int):
        if result != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))


def _bytes(path) -> bytes:
    return path if isinstance(path, bytes) else os.fsencode(path)


def _interpreter_dirs() -> list[str]:
    """The directories the sandbox needs to start sys.executable: the venv and the installation it points to."""
    dirs = {os.path.realpath(d) for d in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
                                          os.path.dirname(os.path.realpath(sys.executable)))}
    return sorted(d for d in dirs if not any(Path(d).is_relative_to(other) and d != other for other in dirs))


def _exposure(reached: list[str], bound: list[str]) -> tuple[list[str], list[str]]:
    """Which directories to cover with an empty tmpfs, and which paths to bind back into them, so that the sandbox
    user can reach `reached` (recreated inside the tmpfs) and `bound` (bound back from the host): any directory
    other users may not enter (no o+x) above one of them is hidden."""
    hidden: set[str] = set()
    exposed = []
    for path in reached + bound:
        blocked = next((str(d) for d in reversed(Path(path).parents) if not os.stat(d).st_mode & 0o001), None)
        if blocked is None:
            continue
        hidden.add(blocked)
        if path in bound:
            exposed.append(path)
    return sorted(hidden), exposed


def _verdict(limits: SandboxLimits, returncode: int, timed_out: bool, stderr: str, output_full: bool) -> str:
    """The result's last line: the limit that stopped the code, how it died, or a silent failure's exit status.
    `output_full`: stdout or stderr reached the file-size limit."""
    if timed_out:
        return f"error: time limit of {limits.seconds:g} s exceeded"
    if returncode == -signal.SIGXCPU:
        return f"error: CPU time limit of {math.ceil(limits.seconds) + 1} s exceeded"
    if returncode < 0:
        return f"error: the code was killed by signal {-returncode} ({signal.strsignal(-returncode)})"
    last = stderr.rstrip().rpartition("\n")[2]
    if last.startswith("MemoryError"):
        return f"error: memory limit of {limits.memory_mb} MB exceeded"
    # A fork bomb's copies write their tracebacks into the same file at once: its last line may be any piece of one
    # ("BlockingIOError: BlockingIOError\n: [Errno 11] ..."), so a failed run that hit the limit anywhere says so.
    if last.startswith("BlockingIOError: [Errno 11]") or last == "RuntimeError: can't start new thread" \
            or (returncode > 0 and "[Errno 11] Resource temporarily unavailable" in stderr):
        return f"error: process limit of {limits.max_processes} exceeded"
    if output_full or last == "OSError: [Errno 27] File too large":
        return f"error: file size limit of {_MAX_FILE_BYTES >> 20} MB exceeded (output included)"
    if returncode > 0 and not stderr:
        return f"error: exit status {returncode}"
    return ""


def _lines(*parts: str) -> str:
    """The non-empty parts, each starting on a line of its own."""
    text = ""
    for part in filter(None, parts):
        text += ("\n" if text and not text.endswith("\n") else "") + part
    return text


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)  # the code shared this file offset; it may have moved it anywhere
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def _fresh_uid() -> int:
    while (uid := _UIDS.start + secrets.randbelow(len(_UIDS))) in _live_uids():
        pass
    return uid


def _live_uids() -> dict[int, int]:
    """uid -> number of its processes that are not zombies (a zombie runs nothing; its reaper is init's business)."""
    counts: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(entry.path, "status").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if not fields.get("State", "").startswith("Z"):
            uid = int(fields["Uid"].split()[0])
            counts[uid] = counts.get(uid, 0) + 1
    return counts


def _kill_all(uid: int, grace: float = 2.0) -> None:
    """Kill every process of `uid`, from here (root), and wait (at most `grace` seconds) until none is left.

    Freeze, then kill: each process is stopped (SIGSTOP: a stopped process can neither fork nor wake another), again
    until a look at /proc finds every one stopped, and only then are all killed. Killing them one by one as found
    would race a fork bomb. No helper process of `uid` does it (as a `kill -KILL -1` of that uid did before): one
    running in the host's namespaces, as the code's own uid, could be stopped or traced by the code, which then
    wrote to the host's /tmp through it, reached 127.0.0.1, and outlived the call."""
    deadline = time.monotonic() + grace
    while (running := _running_tasks(uid)) and time.monotonic() < deadline:
        frozen = all(state in "tT" for states in running.values() for state in states)
        for pid, states in running.items():
            if frozen or any(state not in "tT" for state in states):
                _signal(pid, uid, signal.SIGKILL if frozen else signal.SIGSTOP)
        time.sleep(0.001)


def _running_tasks(uid: int) -> dict[int, list[str]]:
    """pid -> the states of its threads that have not exited, for each process of `uid` with such a thread. A
    process whose main thread exited shows as a zombie while its other threads run on: they count."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or _uid_of(entry.name) != uid:
            continue
        try:
            states = [Path(entry.path, "task", task, "stat").read_text().rpartition(")")[2].split()[0]
                      for task in os.listdir(Path(entry.path, "task"))]
        except OSError:  # gone meanwhile
            continue
        if alive := [state for state in states if state not in "ZX"]:
            found[int(entry.name)] = alive
    return found


def _uid_of(pid: int | str) -> int | None:
    try:
        status = Path("/proc", str(pid), "status").read_text()
    except OSError:
        return None
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


def _signal(pid: int, uid: int, sig: int) -> None:
    """Send `sig` to process `pid` if it still belongs to `uid`: through a pidfd, so that a pid freed and reused by
    another process between the look and the signal is never hit (root may signal anything)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # gone
        return
    try:
        if _uid_of(pid) == uid:  # the pidfd pins the process the pid names now: is it still the sandbox's?
            signal.pidfd_send_signal(fd, sig)
    except OSError:  # it exited meanwhile
        pass
    finally:
        os.close(fd)
