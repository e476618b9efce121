"""A corpus several times larger than a memory cap: pre-tokenized into token shards and trained on,
with the process's memory staying under the cap.

    python bench/bench_shards.py [--corpus-mb 1536] [--cap-mb 512] [--workers 2] [--steps 10]

A corpus of random words (Zipf-distributed, in sentences, documents of 5-40 sentences) is written as
JSONL files to --corpus-dir (kept between runs) and a BPE tokenizer (4,096 tokens) is trained on a
sample of it. Then a fresh process prepares the mixture (`prepare_mixture`, the pretraining stage's
own call, on --workers processes) and pretrains the `tiny` model for --steps steps on the shards.
Measured: that process's peak resident memory (ru_maxrss), the largest pool worker's, and the
proportional set size (PSS: shared pages split between the processes sharing them) of the whole
process tree, sampled every 0.2 s with psutil. The same process on a 1 MiB corpus is the baseline:
PyTorch and a few training steps of even the tiny model take ~400-500 MiB on their own, which sets
the floor of any cap; the difference is what the corpus costs.

Resident memory is what the cap is on. An address-space limit (RLIMIT_AS) would not measure it: the
shards are memory-mapped whole by design, and thread stacks and allocator arenas reserve address
space that is never touched, so the process's address space is larger than the corpus's tokens
while the memory it uses is not.

Writes shards.json and shards_memory.png into --out (bench/out/) (memory over time against the cap);
exits with status 1 if a process went over the cap. Run on an idle machine for the throughput.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------- the corpus


def write_corpus(directory: Path, megabytes: float, seed: int = 0, file_mb: int = 64) -> dict:
    """Random-word documents as JSONL files of ~file_mb MB; reused if the same corpus is already there."""
    recipe = {"megabytes": megabytes, "seed": seed, "file_mb": file_mb}
    marker = directory / "corpus.json"
    if marker.exists() and json.loads(marker.read_text())["recipe"] == recipe:
        return json.loads(marker.read_text())
    for old in directory.glob("part_*.jsonl"):
        old.unlink()
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, n)) for n in rng.integers(2, 10, 20_000)]
    zipf = 1.0 / np.arange(1, len(words) + 1) ** 1.1
    sentence_words = rng.choice(len(words), size=(100_000, 12), p=zipf / zipf.sum())
    sentences = [" ".join(words[i] for i in row[:n]).capitalize() + "."
                 for row, n in zip(sentence_words, rng.integers(4, 13, len(sentence_words)))]
    written, documents, part, f = 0, 0, 0, None
    t0 = time.time()
    while written < megabytes * 2**20:
        if f is None or f.tell() >= file_mb * 2**20:
            if f:
                f.close()
            f = open(directory / f"part_{part:04d}.jsonl", "w", encoding="utf-8")
            part += 1
        for n in rng.integers(5, 41, 1000):
            line = json.dumps({"text": " ".join(sentences[i] for i in rng.integers(0, len(sentences), n))}) + "\n"
            f.write(line)
            written += len(line)
            documents += 1
    f.close()
    info = {"recipe": recipe, "bytes": written, "documents": documents, "files": part,
            "seconds": time.time() - t0}
    marker.write_text(json.dumps(info))
    return info


# ----------------------------------------------------------------------------- the measured process


def child(args) -> None:
    """Prepare the mixture, then pretrain a few steps; print what it measured as one JSON line."""
    import torch

    from pocketgpt.chat import ChatTemplate
    from pocketgpt.data.mixture import prepare_mixture
    from pocketgpt.tokenizer import Tokenizer
    from pocketgpt.train.loop import TrainConfig
    from pocketgpt.train.pretrain import PretrainConfig, pretrain

    torch.set_num_threads(args.threads)
    run = Path(args.run)
    cfg = PretrainConfig(preset="tiny", sources={"corpus": {"kind": "jsonl", "path": str(args.corpus_dir)}},
                         shard_tokens=args.shard_tokens,
                         train=TrainConfig(steps=args.steps, batch_size=args.batch, seq_len=256, warmup_steps=2,
                                           eval_every=args.steps, eval_batches=2, sample_every=10**9,
                                           save_every=10**9, log_every=1, threads=args.threads))
    chat = ChatTemplate.from_spec(Tokenizer.load(run / "tokenizer"), None)
    started = time.time()
    manifest = prepare_mixture(cfg.source_specs(), chat, run / "data", cfg.val_fraction, cfg.train.seed,
                               workers=args.workers, shard_tokens=args.shard_tokens)
    prepared = time.time()
    after_prepare_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest pool worker
    summary = pretrain(cfg, run)
    print(json.dumps({
        "started": started, "prepared": prepared, "finished": time.time(),
        "prepare_seconds": prepared - started, "train_seconds": time.time() - prepared,
        "tokens": manifest["sources"]["corpus"]["train_tokens"] + manifest["sources"]["corpus"]["val_tokens"],
        "documents": manifest["sources"]["corpus"]["documents"], "shards": manifest["sources"]["corpus"]["shards"],
        "dtype": manifest["dtype"], "train_loss": summary["loss"], "val_loss": summary.get("val_loss"),
        "peak_rss_mb_after_prepare": after_prepare_mb, "peak_rss_mb_worker": workers_mb,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure(args, run: Path, corpus_dir: Path) -> tuple[dict, list[tuple]]:
    """Run the child, sampling the memory of it and its pool workers; its figures and the samples."""
    import psutil

    cmd = [sys.executable, __file__, "--child", "--run", str(run), "--corpus-dir", str(corpus_dir),
           "--workers", str(args.workers), "--threads", str(args.threads), "--steps", str(args.steps),
           "--batch", str(args.batch), "--shard-tokens", str(args.shard_tokens)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    main = psutil.Process(proc.pid)
    samples = []  # (time, main RSS, largest worker RSS, PSS of the tree), MiB
    while proc.poll() is None:
        try:
            tree = [main, *main.children(recursive=True)]
            rss = [p.memory_info().rss / 2**20 for p in tree]
            pss = sum(p.memory_full_info().pss for p in tree) / 2**20
            samples.append((time.time(), rss[0], max(rss[1:], default=0.0), pss))
        except psutil.Error:  # a worker ended between listing and reading it
            pass
        time.sleep(0.2)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"the measured process failed (exit {proc.returncode})")
    return json.loads(out.strip().splitlines()[-1]), samples


def plot_memory(samples: list[tuple], figures: dict, cap_mb: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.array([s[0] for s in samples]) - figures["started"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(t, [s[1] for s in samples], label="main process RSS")
    ax.plot(t, [s[2] for s in samples], label="largest worker RSS")
    ax.plot(t, [s[3] for s in samples], label="whole tree PSS")
    ax.axhline(cap_mb, color="red", linestyle="--", label=f"cap {cap_mb:.0f} MiB")
    ax.axvline(figures["prepared"] - figures["started"], color="gray", linestyle=":")
    ax.text(figures["prepared"] - figures["started"], cap_mb * 0.05, " training", color="gray")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax.set_title(f"{figures['corpus_mb']:.0f} MiB of text -> {figures['tokens'] / 1e6:.0f}M tokens in "
                 f"{figures['shards']} shard(s)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=4, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus-mb", type=float, default=1536)
    p.add_argument("--cap-mb", type=float, default=512)
    p.add_argument("--corpus-dir", type=Path, default=Path("/tmp/pocketgpt-bench-shards/corpus"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--shard-tokens", type=int, default=16 * 2**20)
    p.add_argument("--run", type=Path, default=Path("/tmp/pocketgpt-bench-shards/run"))
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    import shutil

    from rich.console import Console
    from rich.table import Table

    from pocketgpt.data.sources import SourceSpec
    from pocketgpt.train.bpe import train_tokenizer

    corpus = write_corpus(args.corpus_dir, args.corpus_mb)
    baseline_corpus = args.corpus_dir.with_name(args.corpus_dir.name + "-baseline")
    write_corpus(baseline_corpus, 1)
    baseline_run = args.run.with_name(args.run.name + "-baseline")
    for run in (args.run, baseline_run):
        shutil.rmtree(run, ignore_errors=True)
    sample = SourceSpec("corpus", "jsonl", path=str(args.corpus_dir / "part_0000.jsonl"))
    train_tokenizer([sample], args.run / "tokenizer", vocab_size=4096, max_chars=4_000_000)
    shutil.copytree(args.run / "tokenizer", baseline_run / "tokenizer")
    baseline, _ = measure(args, baseline_run, baseline_corpus)
    figures, samples = measure(args, args.run, args.corpus_dir)
    figures.update(corpus_mb=corpus["bytes"] / 2**20, corpus_files=corpus["files"], cap_mb=args.cap_mb,
                   workers=args.workers, threads=args.threads, steps=args.steps,
                   prepare_tokens_per_s=figures["tokens"] / figures["prepare_seconds"],
                   prepare_mb_per_s=corpus["bytes"] / 2**20 / figures["prepare_seconds"],
                   shards_mb=sum(f.stat().st_size for f in (args.run / "data").rglob("shard_*.bin")) / 2**20,
                   sampled_peak_rss_mb_main=max(s[1] for s in samples),
                   sampled_peak_rss_mb_worker=max(s[2] for s in samples),
                   sampled_peak_pss_mb_tree=max(s[3] for s in samples))
    figures["corpus_over_cap"] = figures["corpus_mb"] / args.cap_mb
    figures["baseline_1mb_corpus"] = {k: baseline[k] for k in ("tokens", "peak_rss_mb_after_prepare", "peak_rss_mb",
                                                                 "peak_rss_mb_worker")}
    figures["corpus_cost_mb"] = figures["peak_rss_mb"] - baseline["peak_rss_mb"]
    peaks = [figures["peak_rss_mb"], figures["peak_rss_mb_worker"], figures["sampled_peak_pss_mb_tree"]]
    figures["under_cap"] = max(peaks) < args.cap_mb
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shards.json").write_text(json.dumps(figures, indent=2))
    plot_memory(samples, figures, args.cap_mb, args.out / "shards_memory.png")

    table = Table(title=f"{figures['corpus_mb']:.0f} MiB corpus, memory cap {args.cap_mb:.0f} MiB "
                        f"({figures['corpus_over_cap']:.1f}x)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, value in [
        ("documents", f"{figures['documents']:,}"), ("tokens", f"{figures['tokens']:,} ({figures['dtype']})"),
        ("shards", f"{figures['shards']} ({figures['shards_mb']:.0f} MiB)"),
        ("pre-tokenization", f"{figures['prepare_seconds']:.0f} s, {figures['prepare_tokens_per_s'] / 1e6:.2f}M "
                             f"tokens/s, {figures['prepare_mb_per_s']:.1f} MiB/s ({args.workers} workers)"),
        ("training", f"{args.steps} steps in {figures['train_seconds']:.0f} s, loss {figures['train_loss']:.2f}"),
        ("peak RSS, main process", f"{figures['peak_rss_mb']:.0f} MiB "
                                   f"({figures['peak_rss_mb_after_prepare']:.0f} after pre-tokenizing)"),
        ("same on a 1 MiB corpus", f"{baseline['peak_rss_mb']:.0f} MiB "
                                   f"({baseline['peak_rss_mb_after_prepare']:.0f} after pre-tokenizing)"),
        ("peak RSS, largest worker", f"{figures['peak_rss_mb_worker']:.0f} MiB"),
        ("peak PSS, whole tree (sampled)", f"{figures['sampled_peak_pss_mb_tree']:.0f} MiB"),
        ("under the cap", "yes" if figures["under_cap"] else "NO")]:
        table.add_row(name, value)
    Console().print(table)
    print(f"wrote {args.out / 'shards.json'} and {args.out / 'shards_memory.png'}")
    if not figures["under_cap"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
