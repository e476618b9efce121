"""Grokking: a small transformer memorises a table of modular division long before it understands it.

Power et al. (2022) trained a 2-layer transformer on half of the table x / y (mod 97): training accuracy
reaches ~100% within a thousand steps, while validation accuracy stays at chance for much longer and then
jumps to ~100%. Weight decay shortens the wait; without it the plateau lasts ~10^4-10^5 steps. Grokfast
(Lee et al. 2024) amplifies the slow component of the gradients and generalises many times sooner.

    pocketgpt lab grokking OUT        # weight decay 1; none; none + Grokfast; the Grokfast run without its filter

Grokfast's runs follow the reference implementation's command for this task: the EMA filter plus a small
weight decay applied the way its Adam applies it (an L2 term in the gradient, 0.005). The filter alone
(`--grokfast-l2 0`, lambda 2) did not generalise on our network within 5,100 steps; the L2 term alone is its
own run (`l2_only`), so that the summary shows what the filter adds.

Running the same command again continues an interrupted run and reads finished ones back.

Each run is the shared Trainer with a four-token objective: "x op y =" and the loss on the answer only.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..argtypes import fraction, integer, names, non_negative, positive
from ..common import PocketError, provenance_line
from ..train.loop import DrawCounter
from . import finished_run, publish

OPERATIONS = {
    "div": lambda x, y, p: x * pow(y, -1, p) % p,  # x / y: y ranges over 1..p-1
    "add": lambda x, y, p: (x + y) % p,
    "sub": lambda x, y, p: (x - y) % p,
    "mul": lambda x, y, p: x * y % p,
    "x2+y2": lambda x, y, p: (x * x + y * y) % p,
}

# The runs of the experiment: name -> what it changes in the settings given on the command line
RUNS = {
    "weight_decay": "the paper's setting: AdamW with the given weight decay (1 by default)",
    "no_weight_decay": "the same without weight decay: the long plateau",
    "grokfast": "no weight decay, Grokfast's EMA gradient filter and its reference's small L2 term (Adam)",
    "l2_only": "the grokfast run without the filter: what the L2 term does alone",
}


@dataclass
class Settings:
    operation: str = "div"
    prime: int = 97
    train_frac: float = 0.5
    weight_decay: float = 1.0
    optimizer: str = "adamw"
    lr: float = 1e-3
    batch_size: int = 512
    steps: int = 50_000  # at most, per run; a run stops once validation accuracy reaches `stop_at`
    stop_at: float = 0.99
    eval_every: int = 10  # up to 1,000 steps; then every 100 up to 10,000, and so on (log-spaced)
    seed: int = 0
    grokfast_alpha: float = 0.98
    grokfast_lambda: float = 5.0  # the reference's EMA command uses 2 (its MA command 5); 5 is what we measured
    grokfast_l2: float = 0.005  # the reference's command: Adam's weight_decay (an L2 term), not AdamW's


def table(operation: str, p: int) -> list[tuple[int, int, int]]:
    """Every equation (x, y, x op y) of the operation mod p."""
    if operation not in OPERATIONS:
        raise PocketError(f"unknown operation {operation!r}: {', '.join(OPERATIONS)}")
    if p < 3 or any(p % d == 0 for d in range(2, int(p ** 0.5) + 1)):
        raise PocketError(f"--prime must be a prime >= 3, got {p}")
    f = OPERATIONS[operation]
    ys = range(1, p) if operation == "div" else range(p)
    return [(x, y, f(x, y, p)) for x in range(p) for y in ys]


def split_table(rows: list[tuple[int, int, int]], train_frac: float, seed: int):
    """A seeded random split of the table into training and validation equations."""
    if not 0.0 < train_frac < 1.0:
        raise PocketError(f"--train-frac must be in (0, 1), got {train_frac}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    cut = round(train_frac * len(rows))
    return [rows[i] for i in sorted(order[:cut])], [rows[i] for i in sorted(order[cut:])]


def encode(rows: list[tuple[int, int, int]], p: int):
    """Token ids (N, 4) of "x op y =" (numbers are tokens 0..p-1, op is p, '=' is p+1) and answers (N,)."""
    import torch

    data = torch.tensor(rows, dtype=torch.long)
    n = len(rows)
    inputs = torch.stack([data[:, 0], torch.full((n,), p), data[:, 1], torch.full((n,), p + 1)], dim=1)
    return inputs, data[:, 2]


def answer_targets(answers):
    """Targets for the model's loss: -1 (ignored) everywhere but the last position, which must say the answer."""
    import torch

    targets = torch.full((len(answers), 4), -1, dtype=torch.long)
    targets[:, -1] = answers
    return targets


class TableObjective(DrawCounter):
    """Minibatches drawn from the training equations (resumed exactly: see DrawCounter)."""

    def __init__(self, inputs, answers, batch_size: int, seed: int):
        self.inputs, self.targets = inputs, answer_targets(answers)
        self.batch_size, self.seed = batch_size, seed

    def loss(self, model):
        import torch

        g = torch.Generator().manual_seed(self.next_draw(self.seed))
        rows = torch.randint(len(self.inputs), (self.batch_size,), generator=g)
        return model(self.inputs[rows], self.targets[rows]), {}

    def tokens_per_micro_step(self) -> int:
        return self.batch_size * 4


def measure(model, inputs, answers) -> tuple[float, float]:
    """(accuracy, loss) of the model's answers at the last position."""
    import torch
    import torch.nn.functional as F

    model.eval()
    with torch.no_grad():
        logits = model(inputs)[:, -1].float()
    model.train()
    return (logits.argmax(-1) == answers).float().mean().item(), F.cross_entropy(logits, answers).item()


def run_settings(name: str, s: Settings) -> Settings:
    """The settings one run trains with: the command's, changed where the run's definition says."""
    if name == "weight_decay":
        return s
    if name == "no_weight_decay":
        return replace(s, weight_decay=0.0)
    if name in ("grokfast", "l2_only"):
        return replace(s, weight_decay=s.grokfast_l2, optimizer="adam" if s.grokfast_l2 else s.optimizer)
    raise PocketError(f"unknown run {name!r}: {', '.join(RUNS)}")


def train_run(name: str, s: Settings, out: Path, compile: bool = False) -> dict:
    """Train one run into out/name, or continue it if it was interrupted; a finished run is read back.
    Returns its summary (steps to 99% train and 95% validation accuracy, the curves). `compile`
    (torch.compile of the training step) changes the speed, not the settings a result is kept under."""
    import torch

    from ..common import atomic_write_json, read_jsonl
    from ..model import GPT, GPTConfig
    from ..train.loop import TrainConfig, Trainer, stage_setup

    s = run_settings(name, s)
    finished = finished_run(out, name, asdict(s))
    if finished is not None:
        return finished
    rows = table(s.operation, s.prime)
    train_rows, val_rows = split_table(rows, s.train_frac, s.seed)
    train_x, train_y = encode(train_rows, s.prime)
    val_x, val_y = encode(val_rows, s.prime)
    tc = TrainConfig(steps=s.steps, batch_size=s.batch_size, seq_len=4, lr=s.lr, warmup_steps=10,
                     schedule="constant", weight_decay=s.weight_decay, beta1=0.9, beta2=0.98,
                     grad_clip=float("inf"), dtype="float32", optimizer=s.optimizer,
                     grad_filter="grokfast" if name == "grokfast" else "none",
                     grokfast_alpha=s.grokfast_alpha, grokfast_lambda=s.grokfast_lambda,
                     eval_every=s.eval_every, eval_log_spaced=True, log_every=s.eval_every, save_every=max(1000, s.eval_every),
                     sample_every=10 ** 9, seed=s.seed, device="cpu", compile=compile)
    resume = (out / name / "checkpoints").exists()
    device, info, out_dir = stage_setup(tc, out, name, resume)
    torch.manual_seed(s.seed)
    # Power et al.'s network: 2 layers, width 128, 4 heads; a token per number and per symbol.
    model = GPT(GPTConfig(vocab_size=s.prime + 2, n_layer=2, n_head=4, n_kv_head=4, d_model=128, d_ff=512,
                          max_seq_len=4, tie_embeddings=False)).to(device)
    # ...and its initialisation: PyTorch's defaults (embeddings ~ N(0, 1), linear layers ~ U(+-1/sqrt(fan_in))),
    # far larger than a language model's 0.02. A large initial weight norm is what makes the network
    # memorise first; weight decay then slowly shrinks it towards the generalising solution (Liu et al. 2023).
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()

    def evaluate(m) -> dict:
        train_acc, train_loss = measure(m, train_x, train_y)
        val_acc, val_loss = measure(m, val_x, val_y)
        return {"train_acc": train_acc, "train_loss": train_loss, "val_acc": val_acc, "val_loss": val_loss}

    metrics_path = out_dir / "metrics.jsonl"
    trainer = Trainer(model, TableObjective(train_x, train_y, s.batch_size, s.seed), tc, out_dir, name,
                      metrics_path, device, info, evaluate=evaluate, until=lambda ev: ev["val_acc"] >= s.stop_at)
    if resume:
        trainer.resume()
    t0 = time.time()
    trainer.run()
    curve = [r for r in read_jsonl(metrics_path, torn_lines=True) if "val_acc" in r]
    result = {"run": name, "description": RUNS[name], "settings": asdict(s), "weight_decay": s.weight_decay,
              "steps": trainer.step, "time_s": round(time.time() - t0, 1),
            "steps_to_train_99": first_step(curve, "train_acc", 0.99),
            "steps_to_val_95": first_step(curve, "val_acc", 0.95),
            "final_train_acc": curve[-1]["train_acc"] if curve else None,
            "final_val_acc": curve[-1]["val_acc"] if curve else None, "curve": curve}
    atomic_write_json(out / name / "result.json", result)
    return result


def first_step(curve: list[dict], key: str, level: float) -> int | None:
    """The first evaluated step at which `key` reached `level` (None if it never did)."""
    return next((r["step"] for r in curve if r[key] >= level), None)


def speedup(baseline: dict, filtered: dict) -> tuple[float | None, bool]:
    """How many times sooner (in steps) Grokfast reached 95% validation accuracy, and whether that is only a
    lower bound (the baseline never got there within its step budget)."""
    if filtered["steps_to_val_95"] is None:
        return None, False
    if baseline["steps_to_val_95"] is None:
        return baseline["steps"] / filtered["steps_to_val_95"], True
    return baseline["steps_to_val_95"] / filtered["steps_to_val_95"], False


def plot(results: list[dict], s: Settings, path: Path) -> Path:
    from . import pyplot, save_figure

    plt = pyplot()

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, r in enumerate(results):
        steps = [c["step"] for c in r["curve"]]
        color = f"C{i}"
        acc_ax.plot(steps, [c["train_acc"] for c in r["curve"]], color=color, ls="--", label=f"{r['run']} train")
        acc_ax.plot(steps, [c["val_acc"] for c in r["curve"]], color=color, label=f"{r['run']} validation")
        loss_ax.plot(steps, [c["train_loss"] for c in r["curve"]], color=color, ls="--")
        loss_ax.plot(steps, [c["val_loss"] for c in r["curve"]], color=color)
    symbol = {"div": "/", "add": "+", "sub": "-", "mul": "*"}.get(s.operation, s.operation)
    acc_ax.set(xscale="log", xlabel="optimization steps", ylabel="accuracy", ylim=(0, 1.02),
               title=f"x {symbol} y (mod {s.prime}), {s.train_frac:.0%} of the table for training")
    loss_ax.set(xscale="log", yscale="log", xlabel="optimization steps", ylabel="loss (dashed: train)")
    acc_ax.legend(fontsize=8)
    return save_figure(fig, path)


def summary_markdown(results: list[dict], s: Settings, measured: dict) -> str:
    lines = [f"# Grokking: x {s.operation} y mod {s.prime}, {s.train_frac:.0%} of the table for training", "",
             "| run | optimizer, weight decay | gradient filter | steps run | 99% train at step | "
             "95% validation at step | final validation | wall time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        rs = r["settings"]
        decay = f"{rs['optimizer']} {r['weight_decay']:g}" if r["weight_decay"] else "none"
        grad_filter = (f"Grokfast (alpha {rs['grokfast_alpha']:g}, lambda {rs['grokfast_lambda']:g})"
                       if r["run"] == "grokfast" else "-")
        lines.append(f"| {r['run']} | {decay} | {grad_filter} | {r['steps']} | {r['steps_to_train_99'] or 'never'} | "
                     f"{r['steps_to_val_95'] or 'never'} | {r['final_val_acc']:.1%} | {r['time_s'] / 60:.1f} min |")
    by_name = {r["run"]: r for r in results}
    if "weight_decay" in by_name:
        r = by_name["weight_decay"]
        if r["steps_to_train_99"] and r["steps_to_val_95"]:
            lines += ["", f"With weight decay, training accuracy reached 99% at step {r['steps_to_train_99']} and "
                          f"validation accuracy 95% at step {r['steps_to_val_95']}: "
                          f"{r['steps_to_val_95'] / r['steps_to_train_99']:.1f}x later."]
    for baseline, what in (("no_weight_decay", "the run without weight decay"),
                           ("l2_only", "the same L2 term without the filter")):
        if baseline in by_name and "grokfast" in by_name:
            factor, bound = speedup(by_name[baseline], by_name["grokfast"])
            if factor is not None:
                lines += ["", f"Grokfast reached 95% validation accuracy {'at least ' if bound else ''}{factor:.1f}x "
                              f"sooner in steps than {what}"
                              + (" (which never got there within its budget)." if bound else ".")]
    lines += ["", "Wall time is the run's last invocation (an interrupted run counts from where it went on). "
                  + provenance_line(measured)]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- command


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = Settings()
    p.add_argument("out", help="output directory (one folder per run, plus grokking.json/.png and summary.md)")
    p.add_argument("--runs", type=names(RUNS), default=list(RUNS), help=f"comma-separated runs (default: all of {', '.join(RUNS)})")
    p.add_argument("--operation", default=d.operation, choices=list(OPERATIONS))
    p.add_argument("--prime", type=integer(3), default=d.prime)
    p.add_argument("--train-frac", type=fraction, default=d.train_frac, help="share of the table used for training")
    p.add_argument("--weight-decay", type=non_negative, default=d.weight_decay, help="of the weight_decay run")
    p.add_argument("--optimizer", default=d.optimizer, choices=["adamw", "adam", "sgd"],
                   help="of the weight_decay and no_weight_decay runs (grokfast and l2_only train with Adam and an "
                        "L2 term, as Grokfast's reference runs do, unless --grokfast-l2 is 0)")
    p.add_argument("--lr", type=positive, default=d.lr)
    p.add_argument("--steps", type=integer(1), default=d.steps, help="step budget per run")
    p.add_argument("--stop-at", type=float, default=d.stop_at, help="stop a run once validation accuracy reaches this")
    p.add_argument("--eval-every", type=integer(1), default=d.eval_every)
    p.add_argument("--seed", type=integer(0), default=d.seed)
    p.add_argument("--grokfast-alpha", type=float, default=d.grokfast_alpha, help="the EMA's decay")
    p.add_argument("--grokfast-lambda", type=non_negative, default=d.grokfast_lambda, help="how much of the EMA is added")
    p.add_argument("--grokfast-l2", type=non_negative, default=d.grokfast_l2,
                   help="weight decay of the grokfast and l2_only runs, as Adam's L2 term (0: the filter alone)")
    p.add_argument("--threads", type=integer(0), default=0)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training step (about 1.3x faster here after ~40 s of compiling)")


def main(args) -> None:
    from rich.table import Table

    from ..common import console, set_threads

    set_threads(args.threads)
    s = Settings(operation=args.operation, prime=args.prime, train_frac=args.train_frac,
                 weight_decay=args.weight_decay, optimizer=args.optimizer, lr=args.lr, steps=args.steps,
                 stop_at=args.stop_at, eval_every=args.eval_every, seed=args.seed,
                 grokfast_alpha=args.grokfast_alpha, grokfast_lambda=args.grokfast_lambda, grokfast_l2=args.grokfast_l2)
    out = Path(args.out)
    results = [train_run(n, s, out, compile=args.compile) for n in args.runs]
    # the folder's other runs, finished earlier with these settings, stay in its summary (a rerun of one run
    # rewrote grokking.json, the plot and summary.md without them)
    results += [r for n in RUNS if n not in args.runs and (r := finished_run(out, n, asdict(run_settings(n, s))))]
    results.sort(key=lambda r: list(RUNS).index(r["run"]))
    text = publish(out, "grokking", {"settings": asdict(s), "runs": results}, lambda path: plot(results, s, path),
                   lambda measured: summary_markdown(results, s, measured))
    table_ = Table(title=f"grokking: {out}")
    for col in ("run", "steps", "99% train @", "95% val @", "final val", "time"):
        table_.add_column(col)
    for r in results:
        table_.add_row(r["run"], str(r["steps"]), str(r["steps_to_train_99"] or "never"),
                       str(r["steps_to_val_95"] or "never"), f"{r['final_val_acc']:.1%}", f"{r['time_s']:.0f} s")
    console.print(table_)
    console.print(text.split("\n\n", 1)[-1].strip())
    console.print(f"plot: {out / 'grokking.png'}")
