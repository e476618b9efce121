"""The speedrun: every stage of the pipeline, in order, in one run directory.

    tokenizer -> pretrain -> (post-training stages as they land) -> report

A stage whose output is already complete is skipped and a half-finished one resumes from its last
checkpoint, so re-running the same command after an interruption continues where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from .common import atomic_write_json, human
from .train.bpe import train_tokenizer
from .train.loop import TrainConfig, console
from .train.pretrain import PretrainConfig, pretrain


@dataclass
class TokenizerConfig:
    vocab_size: int = 4096
    max_chars: int = 10_000_000


@dataclass
class RunConfig:
    """Everything a run needs; `--config run.toml` fills it with [tokenizer], [pretrain], ... tables."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


def quick(cfg: RunConfig) -> RunConfig:
    """A smoke-test version of the run: a tiny model, little data, a few dozen steps."""
    cfg.tokenizer = TokenizerConfig(vocab_size=1024, max_chars=1_000_000)
    for s in cfg.pretrain.sources.values():
        s["max_bytes"] = min(s.get("max_bytes") or 500_000, 500_000)
    cfg.pretrain.preset = "tiny"
    cfg.pretrain.train = TrainConfig(steps=60, batch_size=8, seq_len=128, lr=3e-3, warmup_steps=10,
                                     eval_every=20, eval_batches=4, sample_every=30, save_every=30,
                                     log_every=10, threads=cfg.pretrain.train.threads)
    return cfg


def stage_done(model_dir: Path, steps: int) -> bool:
    cfg_path = model_dir / "config.json"
    if not cfg_path.exists():
        return False
    summary = json.loads(cfg_path.read_text()).get("meta", {}).get("summary", {})
    return summary.get("steps") == steps and not summary.get("interrupted")


def run_tokenizer(cfg: RunConfig, run_dir: Path) -> dict:
    return train_tokenizer(cfg.pretrain.source_specs(), run_dir / "tokenizer", cfg.tokenizer.vocab_size,
                           cfg.tokenizer.max_chars)


def speedrun(cfg: RunConfig, run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    results, t_start = {}, time.time()

    console.rule("[bold]1. tokenizer")
    if (run_dir / "tokenizer" / "tokenizer.json").exists():
        console.print("tokenizer: already trained, skipped")
        results["tokenizer"] = json.loads((run_dir / "tokenizer" / "report.json").read_text())
    else:
        results["tokenizer"] = run_tokenizer(cfg, run_dir)
    console.print(f"vocab {results['tokenizer']['vocab_size']}, trained in "
                  f"{results['tokenizer']['train_seconds']:.1f}s")

    console.rule("[bold]2. pretrain")
    if stage_done(run_dir / "base", cfg.pretrain.train.steps):
        console.print("pretrain: already finished, skipped")
        results["pretrain"] = json.loads((run_dir / "base" / "config.json").read_text())["meta"]["summary"]
    else:
        results["pretrain"] = pretrain(cfg.pretrain, run_dir, resume=True)

    results["total_seconds"] = time.time() - t_start
    atomic_write_json(run_dir / "speedrun.json", results)
    print_summary(results, run_dir)
    return results


def print_summary(results: dict, run_dir: Path) -> None:
    table = Table(title=f"speedrun: {run_dir}")
    for col in ("stage", "time", "tokens", "result"):
        table.add_column(col)
    tok = results["tokenizer"]
    table.add_row("tokenizer", f"{tok['train_seconds']:.0f}s", human(tok["train_chars"]) + " chars",
                  f"vocab {tok['vocab_size']}")
    pre = results["pretrain"]
    table.add_row("pretrain", f"{pre['time_s']:.0f}s", human(pre["tokens"]),
                  f"val loss {pre.get('val_loss', float('nan')):.3f}, {pre.get('val_bpb', float('nan')):.3f} bpb")
    console.print(table)
    console.print(f"total {results['total_seconds']:.0f}s; everything is in {run_dir}")
