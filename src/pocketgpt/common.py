"""Small utilities every stage shares: devices, threads, distributed setup, atomic files, printing."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime
import json
import math
import os
import platform
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console

from .errors import PocketError  # noqa: F401  (re-exported: most modules import it from here)

# Progress and logs go to stderr, so stdout stays clean for what a command outputs.
console = Console(stderr=True)


# ----------------------------------------------------------------------------- devices


def pick_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then MPS, then CPU; anything else is passed to torch.device, if this machine and
    this build of PyTorch have it."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise PocketError(f"unknown device {name!r}: auto, cpu, cuda, cuda:N or mps") from None
        present = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
        if not present.get(device.type, True):
            raise PocketError(f"device {name!r} is not available here (this PyTorch sees no {device.type.upper()})")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def set_threads(threads: int | None) -> None:
    """Intra-op threads for CPU work (0 or None: PyTorch's default). Under load from another process, fewer
    threads can be faster."""
    if threads is not None and threads < 0:  # torch's own error is a RuntimeError traceback
        raise PocketError(f"threads must be at least 1 (0 leaves PyTorch's default), not {threads}")
    if threads:
        torch.set_num_threads(threads)


# glibc's mallopt() parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Have the C library's malloc keep the memory a training step frees, for the next step to reuse.

    A step allocates and frees the same activations every time. By default glibc serves a large block with
    a fresh mmap() and unmaps it when freed (above a threshold that adapts between 128 KiB and 32 MiB), and
    gives free memory at the top of its heap back to the kernel, so the next step writes to new pages,
    each one a page fault. Measured on the `small` model's compiled bf16 step (16 x 256 tokens, 2 threads,
    this VM): ~50,000 page faults a step, the step's matrix products taking 1.5-2x their time on warm
    buffers, 352 ms a step. Served from the heap and kept (blocks up to 32 MiB, glibc's largest threshold;
    up to 1 GiB of free memory kept before any goes back), the same step took 285 ms, with no page faults.
    Peak memory is unchanged: what a process has used stays resident instead of being handed back. Returns
    whether the settings took (glibc; with another C library this does nothing)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    settings = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20))
    return all([mallopt(parameter, value) == 1 for parameter, value in settings])  # a list: every setting is made


def bf16_is_native(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware: tensor cores (CUDA from Ampere on), AMX or
    AVX512-BF16 on a CPU. Elsewhere PyTorch emulates bf16, at a cost: on an AVX2-only EPYC here a bf16
    matmul ran at 1.3 GFLOP/s against 175 for fp32, and the small model trained 38x slower under bf16
    autocast than in fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return False  # MPS: autocast stays off there (see `autocast`)


def warn_if_bf16_is_slow(device: torch.device) -> None:
    """Said when a user asks for bf16 where the hardware does not make it faster: it still works, only slower."""
    if not bf16_is_native(device):
        console.print(f"[yellow]bf16 is emulated on this {device.type} (no AMX, AVX512-BF16 or tensor cores): "
                      "it will run slower than float32[/]")
    elif not bf16_is_faster(device):
        console.print(f"[yellow]this {device.type} has bf16 instructions but no matrix unit for them (AMX): "
                      "bf16 may run slower than float32[/]")


def bf16_is_faster(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices faster than fp32 ones: tensor cores (CUDA from Ampere on) or a
    CPU's matrix unit (AMX). AVX512-BF16 alone is native but not faster: on an Intel Xeon with it and without
    AMX (2 cores), a bf16 matmul of the small model's shapes ran at 139-164 GFLOP/s against 160-307 for fp32,
    and the compiled training step of the small model took 1.30 s in bf16 against 0.87 in fp32 (with AMX bf16
    is ~10x fp32)."""
    if device.type == "cuda":
        return bf16_is_native(device)
    return device.type == "cpu" and torch.cpu._is_amx_tile_supported()


def compute_dtype(dtype: str, device: torch.device) -> str:
    """A training dtype setting made concrete: "auto" is bfloat16 where the device multiplies it faster than
    float32 (`bf16_is_faster`), else float32; anything else is itself, but on MPS, where this code does not
    autocast (untested there), float32: so that what a stage reports is what it computed."""
    if device.type == "mps":
        return "float32"
    if dtype != "auto":
        return dtype
    return "bfloat16" if bf16_is_faster(device) else "float32"


def autocast(device: torch.device, dtype: str):
    """bf16 autocast on CPU and CUDA (training's matmuls run on bf16 units: AMX, tensor cores); a no-op for fp32.
    `dtype` may be "auto" (`compute_dtype`)."""
    dtype = compute_dtype(dtype, device)
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


# ----------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


# How long a process waits in a collective. The default (30 min on gloo, 10 on nccl) ended a run whose first
# process was still tokenizing a large corpus while the others waited at the barrier after it; a process that
# dies is caught by torchrun, which ends the others, so a long wait costs nothing there.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=24)


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    return info



def shutdown_distributed() -> None:
    """Leave the process group cleanly: every rank waits for the others, then gloo's threads are joined.
    Exiting with the group alive lets one rank tear down the store under the other (SIGABRT at exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def local_device(device: torch.device, info: DistInfo) -> torch.device:
    """Each torchrun process on a GPU machine drives its own GPU."""
    if device.type == "cuda" and info.enabled:
        return torch.device("cuda", info.local_rank)
    return device


# ----------------------------------------------------------------------------- files


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# The permissions a file or folder is created with here (0o644 and 0o755 under the usual umask 022): the
# temporary ones files are built in are private (0o600, 0o700), and a model or run renamed into place from
# them would stay unreadable to anyone else (another user, a container serving it).
UMASK = _umask()


def temp_dir(parent: Path, prefix: str) -> Path:
    """A new hidden directory in `parent` to build something in before it is renamed into place, with
    the permissions of a directory made the usual way."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    tmp.chmod(0o777 & ~UMASK)
    return tmp


def usual_file_mode(path: Path) -> None:
    """Give a file the permissions of one made the usual way (safetensors writes its files 0o600)."""
    path.chmod(0o666 & ~UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename: readers never see half a file."""
    path = Path(path)
    if path.is_dir():
        raise PocketError(f"{path} is a directory; give the name of the file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def append_jsonl(path: str | Path, record: dict) -> None:
    """Metrics are append-only JSON lines: a crash loses at most the line being written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():  # a line a kill cut short gets its own line, not the start of this one
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))


def iter_jsonl(path: str | Path, torn_lines: bool = False) -> Iterator[tuple[int, Any]]:
    """(line number, record) for each non-blank line; a missing file, a line that is not UTF-8 or not
    JSON is one error naming the file and the line. `torn_lines`: a file this package appends to (metrics),
    where a line that is not JSON is what a kill while writing left: skipped, and said once."""
    if not Path(path).is_file():
        raise PocketError(f"{path} does not exist" if not Path(path).exists() else f"{path} is not a file")
    torn = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PocketError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except RecursionError:
                raise PocketError(f"{path}:{lineno}: JSON nested too deeply") from None
            except json.JSONDecodeError as e:
                if not torn_lines:
                    raise PocketError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
                torn += 1
    if torn:
        console.print(f"[yellow]{path}: {torn} line(s) cut short by an interrupted write, skipped[/]", soft_wrap=True)


def read_jsonl(path: str | Path, torn_lines: bool = False) -> list:
    """Every record of a JSON-lines file (see iter_jsonl)."""
    return [record for _, record in iter_jsonl(path, torn_lines)]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% confidence interval of a proportion (Wilson: sane at 0% and 100%, unlike p +- 2 sigma)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def human(n: float) -> str:
    """A count: 1234567 -> '1.23M', 999999 -> '1M' (B is billions: for bytes, use `human_bytes`)."""
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 999.5:  # what rounds to 1000 at 3 digits belongs to the next unit
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def human_bytes(n: float) -> str:
    """A size in binary units, as `du -h` counts: 1234567890 -> '1.1 GiB'."""
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1023.95:  # what rounds to 1024.0 belongs to the next unit
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} PiB"


def provenance(device: torch.device | None = None) -> dict:
    """Where and with what a measurement was taken: the code's commit (and whether it had uncommitted
    changes), the machine's processor and cores, the accelerator, torch, and the date. Figures copied
    into documentation name this, so a reader can tell which code and hardware produced them."""
    import datetime
    import platform
    import subprocess

    from . import __version__

    source = Path(__file__).resolve().parent
    commit, dirty = None, None
    try:
        git = ["git", "-C", str(source)]
        commit = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, check=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):  # an installed package, or no git: the version says enough
        pass
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    accelerator = None
    if device is not None and device.type == "cuda":
        accelerator = torch.cuda.get_device_name(device)
    elif device is not None and device.type == "mps":
        accelerator = "Apple MPS"
    # Two machines both called "AMD EPYC" here differed 100-fold in bf16 matmuls: the vector ISA and
    # whether bf16 is native say which kind a figure came from.
    return {"pocketgpt": __version__, "commit": commit, "uncommitted_changes": dirty, "cpu": cpu,
            "cpu_isa": torch.backends.cpu.get_cpu_capability(),
            "bf16_native": bf16_is_native(device or torch.device("cpu")),
            "cores": os.cpu_count(), "accelerator": accelerator, "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def provenance_line(p: dict) -> str:
    """provenance() as one sentence for a report."""
    code = f"commit {p['commit']}" + (" with uncommitted changes" if p.get("uncommitted_changes") else "") \
        if p.get("commit") else f"pocketgpt {p['pocketgpt']}"
    kind = f", {p['cpu_isa']}, bf16 {'native' if p['bf16_native'] else 'emulated'}" if "cpu_isa" in p else ""
    where = f"{p['cpu']} ({p['cores']} cores{kind})" + (f", {p['accelerator']}" if p.get("accelerator") else "")
    return f"Measured at {code} on {where}, torch {p['torch']}, {p['date']}."
