"""The shared helpers: formatting of counts and sizes, the training dtype a device gets, memory reuse."""

import platform
import subprocess
import sys

import pytest
import torch

from pocketgpt import common
from pocketgpt.common import (
    PocketError,
    atomic_write_text,
    autocast,
    compute_dtype,
    human,
    human_bytes,
    markdown_table,
    provenance,
    provenance_line,
    wilson_interval,
)


@pytest.mark.parametrize("n, text", [
    (0, "0"), (999, "999"), (999.4, "999"), (999.6, "1K"), (1000, "1K"), (1234567, "1.23M"),
    (999_999, "1M"), (5_870_000, "5.87M"), (1.13e9, "1.13B"), (-2500, "-2.5K"),
])
def test_human_counts(n, text):
    assert human(n) == text


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (1024**2 - 1, "1.0 MiB"),
    (68 * 1024**2, "68.0 MiB"), (1_130_000_000, "1.1 GiB"), (3 * 1024**4, "3.0 TiB"), (2 * 1024**5, "2.0 PiB"),
])
def test_human_bytes_has_one_unit(n, text):
    assert human_bytes(n) == text


def test_provenance_names_the_commit_machine_and_date():
    import subprocess
    from pathlib import Path

    import pocketgpt

    p = provenance()
    head = subprocess.run(["git", "-C", str(Path(pocketgpt.__file__).parent), "rev-parse", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    assert p["commit"] is not None and head.startswith(p["commit"])  # the tests run from a checkout
    assert p["cores"] >= 1 and p["cpu"] and p["torch"] and p["date"].endswith("UTC")
    assert p["cpu_isa"] == torch.backends.cpu.get_cpu_capability() and isinstance(p["bf16_native"], bool)
    line = provenance_line({**p, "commit": "abc123", "uncommitted_changes": True, "cpu": "Some CPU", "cores": 2,
                            "torch": "2.13.0", "date": "2026-12-02 10:00 UTC", "accelerator": None,
                            "cpu_isa": "AVX2", "bf16_native": False})
    assert line == ("Measured at commit abc123 with uncommitted changes on Some CPU (2 cores, AVX2, bf16 emulated), "
                    "torch 2.13.0, 2026-12-02 10:00 UTC.")
    older = {k: v for k, v in p.items() if k not in ("cpu_isa", "bf16_native")}  # reports written before the ISA
    assert provenance_line({**older, "cpu": "Some CPU", "cores": 2}).split(" on ")[1].startswith("Some CPU (2 cores),")
    assert provenance_line({**p, "commit": None, "pocketgpt": "0.1.0"}).startswith("Measured at pocketgpt 0.1.0 on ")


def test_wilson_interval():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(1 - hi) and lo == pytest.approx(0.2366, abs=1e-3)
    assert wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_markdown_table():
    assert markdown_table(["a", "b"], [["1", "2"]]) == "| a | b |\n|---|---|\n| 1 | 2 |"


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_is_bf16_only_where_the_hardware_multiplies_it_faster(monkeypatch, native):
    """Emulated bf16 trained the small model 38x slower than fp32 on an AVX2-only CPU, and AVX512-BF16 without
    AMX 1.5x slower: "auto" must avoid both."""
    monkeypatch.setattr(common, "bf16_is_faster", lambda device: native)
    cpu = torch.device("cpu")
    assert compute_dtype("auto", cpu) == ("bfloat16" if native else "float32")
    assert compute_dtype("float32", cpu) == "float32" and compute_dtype("bfloat16", cpu) == "bfloat16"
    with autocast(cpu, "auto"):
        product = torch.ones(2, 2) @ torch.ones(2, 2)
    assert product.dtype == (torch.bfloat16 if native else torch.float32)


def test_mps_computes_and_reports_float32_whatever_is_asked():
    """This code does not autocast on MPS: "bfloat16" there trained in fp32 while the stage's summary and its
    MFU peak said bf16."""
    mps = torch.device("mps")
    assert compute_dtype("bfloat16", mps) == compute_dtype("auto", mps) == "float32"


@pytest.mark.parametrize("amx,avx512_bf16,faster,native", [(True, True, True, True), (False, True, False, True),
                                                             (False, False, False, False)])
def test_bf16_is_faster_only_with_a_matrix_unit(monkeypatch, amx, avx512_bf16, faster, native):
    """AVX512-BF16 without AMX multiplies bf16 natively but no faster than fp32 (the training step 1.5x slower)."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    cpu = torch.device("cpu")
    assert common.bf16_is_faster(cpu) is faster and common.bf16_is_native(cpu) is native
    assert compute_dtype("auto", cpu) == ("bfloat16" if faster else "float32")


# Page faults of a loop that allocates and frees 192 MiB of tensors, as a training step does, before and after
# keep_freed_memory(), in a fresh process (malloc's settings are process-wide). Round 1 of each measurement
# touches the pages it will reuse.
PAGE_FAULTS = """
import resource, torch
from pocketgpt.common import keep_freed_memory

def faults(rounds):  # each round writes 24 x 8 MiB: 49,152 pages of 4 KiB
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        blocks = [torch.ones(2 << 20) for _ in range(24)]
        del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults(1)
returned = faults(5)
kept = keep_freed_memory()
faults(1)
print(returned, kept, faults(5))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_freed_memory_is_kept_for_the_next_step():
    done = subprocess.run([sys.executable, "-c", PAGE_FAULTS], capture_output=True, text=True, check=True)
    returned, kept, after = done.stdout.split()
    assert kept == "True"
    written = 5 * 24 * (8 << 20) // 4096  # pages the 5 rounds write
    assert int(returned) > written / 10  # glibc's default hands them back and faults them in again (all of them here)
    # kept: a few thousand faults (2,049-4,097 measured), not one a page
    assert int(after) < written / 20


def test_an_atomic_write_to_a_directory_says_so_and_leaves_nothing(tmp_path):
    """`tasks export --out DIR/` ended in IsADirectoryError and left a stray temp file beside DIR."""
    (tmp_path / "out").mkdir()
    with pytest.raises(PocketError, match="is a directory; give the name of the file"):
        atomic_write_text(tmp_path / "out", "x")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["out"]


@pytest.mark.parametrize("kind", ["cuda", "mps"])
def test_a_device_this_machine_lacks_is_one_error(kind):
    """`--device bogus` and `--device cuda` on a CPU-only build ended in PyTorch's RuntimeError and AssertionError."""
    from pocketgpt.common import pick_device

    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(PocketError, match="unknown device 'bogus'"):
        pick_device("bogus")
    if {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}[kind]:
        pytest.skip(f"this machine has {kind}")
    with pytest.raises(PocketError, match=f"device '{kind}' is not available here"):
        pick_device(kind)


def test_a_negative_thread_count_is_one_line():
    """`lab grokking --threads -1` and `train.threads = -3` ended in torch's RuntimeError."""
    with pytest.raises(PocketError, match="threads must be at least 1"):
        common.set_threads(-1)


def test_written_files_and_folders_have_the_usual_permissions(tmp_path, tiny_model, chat):
    """Files were written through private temporaries (0600) and models built in private folders (0700), so
    an export or an imported model stayed unreadable to another user or a container serving it."""
    import stat

    from pocketgpt.checkpoint import save_model
    from pocketgpt.common import UMASK, atomic_write_json, temp_dir
    from pocketgpt.interop.export import export_hf

    def mode(path):
        return stat.S_IMODE(path.stat().st_mode)

    atomic_write_json(tmp_path / "a.json", {})
    assert mode(tmp_path / "a.json") == 0o666 & ~UMASK and mode(temp_dir(tmp_path, ".t_")) == 0o777 & ~UMASK
    save_model(tiny_model, tmp_path / "run" / "sft", chat, {"stage": "sft"})
    out = export_hf(tmp_path / "run", tmp_path / "hf")
    assert mode(out) == 0o777 & ~UMASK and {mode(f) for f in out.iterdir()} == {0o666 & ~UMASK}
    assert {mode(f) for f in (tmp_path / "run" / "sft").iterdir()} == {0o666 & ~UMASK}  # safetensors wrote 0600


def test_a_metrics_line_cut_short_by_a_kill_is_skipped_and_the_next_one_starts_afresh(tmp_path):
    """A torn last line (a kill while writing) stopped both `--resume` and `report` ("malformed JSON"), and
    the next record was glued onto it; user files keep their one-line errors, and bytes that are not UTF-8
    are one too (a UnicodeDecodeError traceback before)."""
    from pocketgpt.common import append_jsonl, read_jsonl

    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"step": 1})
    with open(path, "a") as f:
        f.write('{"stage": "sft", "st')  # killed here
    append_jsonl(path, {"step": 2})
    assert read_jsonl(path, torn_lines=True) == [{"step": 1}, {"step": 2}]
    with pytest.raises(PocketError, match=r"metrics.jsonl:2: malformed JSON"):
        read_jsonl(path)
    path.write_bytes(b'{"a": 1}\n{"b": "\xff"}\n')
    with pytest.raises(PocketError, match=r"metrics.jsonl:2: not UTF-8 text \(byte 8 of the line\)"):
        read_jsonl(path, torn_lines=True)
