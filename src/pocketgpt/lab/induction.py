"""Induction heads: copying from the context, learnt after a plateau, or at once with smeared keys.

An induction head finds where the current token stood before and predicts what came after it (Olsson
et al. 2022): the mechanism of in-context copying, which tool calls, retrieval and column arithmetic
rest on. In a plain transformer it takes two heads in two layers (one copies the previous token into
each position, the next one's query looks for it), and models learn the pair after a plateau whose
length grows with the batch (Aoyama et al. 2025 put it at ~10^5.7 x sqrt(batch x context) tokens).
A smeared key mixes each key with the one before it, so that one head suffices.

The cleanest test: sequences of random tokens, each repeated to fill its row, so that everything
after the first copy is predictable from the context alone and nothing can be memorised. Two runs of
the same model, data and schedule, one with plain keys and one with smeared keys:

    pocketgpt lab induction OUT                # the speedrun's `small` model, batch and learning rate

Running the same command again continues an interrupted run and reads finished ones back.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..argtypes import integer, names, positive
from ..common import PocketError, provenance_line
from ..train.loop import DrawCounter
from . import finished_run, publish

RUNS = {
    "plain": "Llama's attention: every key is its own position's",
    "smeared": "each key mixes in the previous position's key by a learned share per head (model.smear_keys)",
}


@dataclass
class Settings:
    preset: str = "small"
    vocab_size: int = 4096
    batch_size: int = 16  # the speedrun's pretraining batch: 16 rows of 256 tokens
    seq_len: int = 256
    lr: float = 3e-3
    steps: int = 300
    min_segment: int = 8  # each row repeats one random segment of min_segment..max_segment tokens
    max_segment: int = 64
    eval_every: int = 25
    seed: int = 0


def repeated_rows(s: Settings, rows: int, seed: int):
    """(inputs, targets): `rows` rows of one random segment each, repeated (data.repeats.repeated_token_rows)."""
    import torch

    from ..data.repeats import repeated_token_rows

    return repeated_token_rows(rows, s.seq_len, torch.arange(s.vocab_size), s.min_segment, s.max_segment, seed)


class RepeatObjective(DrawCounter):
    """Fresh repeated rows every step (resumed exactly: see DrawCounter)."""

    def __init__(self, s: Settings):
        self.s = s

    def loss(self, model):
        inputs, targets = repeated_rows(self.s, self.s.batch_size, seed=self.next_draw(self.s.seed))
        return model(inputs, targets), {}

    def tokens_per_micro_step(self) -> int:
        return self.s.batch_size * self.s.seq_len


def train_run(name: str, s: Settings, out: Path, compile: bool = False) -> dict:
    """Train one run into out/name, or continue it; a finished run is read back. Returns its summary."""
    import torch

    from ..common import atomic_write_json, read_jsonl
    from ..model import GPT, preset
    from ..train.loop import TrainConfig, Trainer, stage_setup
    from ..train.pretrain import measure_copying

    if name not in RUNS:
        raise PocketError(f"unknown run {name!r}: {', '.join(RUNS)}")
    finished = finished_run(out, name, asdict(s))
    if finished is not None:
        return finished
    tc = TrainConfig(steps=s.steps, batch_size=s.batch_size, seq_len=s.seq_len, lr=s.lr, dtype="float32",
                     eval_every=s.eval_every, log_every=s.eval_every, save_every=max(100, s.eval_every),
                     sample_every=10 ** 9, seed=s.seed, device="cpu", compile=compile)
    resume = (out / name / "checkpoints").exists()
    device, info, out_dir = stage_setup(tc, out, name, resume)
    torch.manual_seed(s.seed)  # both runs start from the same weights (the shares aside)
    model = GPT(preset(s.preset, vocab_size=s.vocab_size, max_seq_len=s.seq_len, smear_keys=name == "smeared"))
    held_out = repeated_rows(s, 32, seed=-1 - s.seed)  # never a training draw (those seeds are >= 0)

    def evaluate(m) -> dict:
        return measure_copying(m, *held_out)

    metrics_path = out_dir / "metrics.jsonl"
    trainer = Trainer(model, RepeatObjective(s), tc, out_dir, name, metrics_path, device, info, evaluate=evaluate)
    if resume:
        trainer.resume()
    t0 = time.time()
    trainer.run()
    curve = [{"step": r["step"], "copy_acc": r["copy_acc"], "copy_loss": r["copy_loss"]}
             for r in read_jsonl(metrics_path, torn_lines=True) if "copy_acc" in r]
    result = {"run": name, "description": RUNS[name], "settings": asdict(s), "steps": trainer.step,
              "time_s": round(time.time() - t0, 1), "steps_to_copy_50": first_step(curve, 0.5),
              "steps_to_copy_90": first_step(curve, 0.9), "final_copy_acc": curve[-1]["copy_acc"],
              "final_copy_loss": curve[-1]["copy_loss"], "curve": curve}
    if name == "smeared":  # how much of its own key each head kept, layer by layer
        result["own_key_share"] = [[round(v, 3) for v in torch.sigmoid(b.self_attn.key_smear).tolist()]
                                   for b in model.model.layers]
    atomic_write_json(out / name / "result.json", result)
    return result


def first_step(curve: list[dict], level: float) -> int | None:
    """The first evaluated step at which copy accuracy reached `level` (None if it never did)."""
    return next((r["step"] for r in curve if r["copy_acc"] >= level), None)


def plot(results: list[dict], s: Settings, path: Path) -> Path:
    from . import pyplot, save_figure

    plt = pyplot()
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, r in enumerate(results):
        steps = [c["step"] for c in r["curve"]]
        acc_ax.plot(steps, [c["copy_acc"] for c in r["curve"]], color=f"C{i}", label=r["run"])
        loss_ax.plot(steps, [c["copy_loss"] for c in r["curve"]], color=f"C{i}", label=r["run"])
    acc_ax.set(xlabel="optimization steps", ylabel="repeated tokens predicted", ylim=(0, 1.02),
               title=f"`{s.preset}` model, {s.batch_size} x {s.seq_len} tokens a step")
    loss_ax.axhline(math.log(s.vocab_size), color="gray", ls=":", label="guessing: ln(vocab)")
    loss_ax.set(xlabel="optimization steps", ylabel="loss on the repeats (nats)")
    acc_ax.legend(fontsize=8)
    loss_ax.legend(fontsize=8)
    return save_figure(fig, path)


def summary_markdown(results: list[dict], s: Settings, measured: dict) -> str:
    lines = [f"# Induction heads: random segments of {s.min_segment}-{s.max_segment} tokens, repeated",
             "",
             f"The `{s.preset}` model from scratch, {s.batch_size} rows of {s.seq_len} tokens a step, AdamW at "
             f"{s.lr:g} with warmup and cosine decay, fp32. Copy accuracy: the greedy next token on the held-out "
             f"rows' repeats; guessing scores 1/{s.vocab_size} (loss ln {s.vocab_size} = "
             f"{math.log(s.vocab_size):.2f} nats).",
             "",
             "| run | keys | steps run | 50% copied at step | 90% copied at step | final copy accuracy | "
             "final loss | wall time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['run']} | {r['description']} | {r['steps']} | {r['steps_to_copy_50'] or 'never'} | "
                     f"{r['steps_to_copy_90'] or 'never'} | {r['final_copy_acc']:.1%} | {r['final_copy_loss']:.2f} | "
                     f"{r['time_s'] / 60:.1f} min |")
    smeared = next((r for r in results if r["run"] == "smeared"), None)
    if smeared and "own_key_share" in smeared:
        shares = ", ".join("/".join(f"{v:.2f}" for v in layer) for layer in smeared["own_key_share"])
        lines += ["", f"Share of its own key each head of the smeared run kept, layer by layer: {shares}."]
    lines += ["", "Wall time is the run's last invocation. " + provenance_line(measured)]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- command


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = Settings()
    p.add_argument("out", help="output directory (one folder per run, plus induction.json/.png and summary.md)")
    p.add_argument("--runs", type=names(RUNS), default=list(RUNS), help=f"comma-separated runs (default: {','.join(RUNS)})")
    p.add_argument("--preset", default=d.preset, help="model preset (default: the speedrun's `small`)")
    p.add_argument("--vocab-size", type=integer(2), default=d.vocab_size, help="random tokens are drawn from this many")
    p.add_argument("--batch-size", type=integer(1), default=d.batch_size)
    p.add_argument("--seq-len", type=integer(2), default=d.seq_len)
    p.add_argument("--lr", type=positive, default=d.lr)
    p.add_argument("--steps", type=integer(1), default=d.steps, help="steps per run")
    p.add_argument("--min-segment", type=integer(1), default=d.min_segment, help="shortest repeated segment (tokens)")
    p.add_argument("--max-segment", type=integer(1), default=d.max_segment, help="longest repeated segment (tokens)")
    p.add_argument("--eval-every", type=integer(1), default=d.eval_every)
    p.add_argument("--seed", type=integer(0), default=d.seed)
    p.add_argument("--threads", type=integer(0), default=0)
    p.add_argument("--compile", action="store_true", help="torch.compile the training step")


def main(args) -> None:
    from rich.table import Table

    from ..common import console, set_threads

    set_threads(args.threads)
    s = Settings(preset=args.preset, vocab_size=args.vocab_size, batch_size=args.batch_size, seq_len=args.seq_len,
                 lr=args.lr, steps=args.steps, min_segment=args.min_segment, max_segment=args.max_segment,
                 eval_every=args.eval_every, seed=args.seed)
    repeated_rows(s, 1, 0)  # bad segment lengths fail before any training
    out = Path(args.out)
    results = [train_run(n, s, out, compile=args.compile) for n in args.runs]
    publish(out, "induction", {"settings": asdict(s), "runs": results}, lambda path: plot(results, s, path),
            lambda measured: summary_markdown(results, s, measured))
    table = Table(title=f"induction: {out}")
    for col in ("run", "steps", "50% copied @", "90% copied @", "final copy accuracy", "time"):
        table.add_column(col)
    for r in results:
        table.add_row(r["run"], str(r["steps"]), str(r["steps_to_copy_50"] or "never"),
                      str(r["steps_to_copy_90"] or "never"), f"{r['final_copy_acc']:.1%}", f"{r['time_s']:.0f} s")
    console.print(table)
    console.print(f"plot: {out / 'induction.png'}")
