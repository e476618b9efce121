"""Scaling and emergence: the same data and budget rule for a ladder of model sizes.

Kaplan et al. (2020) and Chinchilla (2022) found that a language model's loss falls as a power law of
its size and of the compute spent on it; Wei et al. (2022) that some abilities stay near zero in small
models and appear in larger ones. The ladder pretrains models from a few hundred thousand parameters up
to the speedrun's size on the run's own data mixture, each on the same number of tokens (the budget
rule: compute grows with size only), then measures:

    validation loss            against non-embedding parameters and training FLOPs, with fitted power laws
    few-shot accuracy          head and tail facts, in-context copying, arithmetic, against size

    pocketgpt lab scaling RUN                 # RUN has tokenizer/ and data/ (a speedrun's run directory)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from pathlib import Path

from ..argtypes import integer
from ..common import PocketError, provenance_line

# d_model x n_layer, smallest to the speedrun's `small` preset (256 x 6)
DEFAULT_LADDER = "64x2,128x3,192x4,256x6"
FEWSHOT_TASKS = ("factqa_head", "factqa_tail", "arithmetic")


def parse_ladder(text: str) -> list[tuple[int, int]]:
    """"64x2,128x3" -> [(64, 2), (128, 3)], sorted by size; widths must split into 64-wide heads."""
    rungs = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)x(\d+)\s*", part)
        if not m:
            raise PocketError(f"--ladder entry {part!r} is not WIDTHxLAYERS (e.g. 128x3)")
        width, layers = int(m[1]), int(m[2])
        if width % 64 or width < 64 or layers < 1:
            raise PocketError(f"--ladder entry {part!r}: width must be a positive multiple of 64 (64-wide heads)")
        rungs.append((width, layers))
    rungs = sorted(set(rungs), key=lambda r: r[0] ** 2 * r[1])
    if len(rungs) < 2:  # a power law through one point fits anything (it reported R² 1.000)
        raise PocketError("--ladder needs at least two different sizes")
    return rungs


def fit_power_law(xs: list[float], ys: list[float]) -> dict:
    """Least squares in log-log space: y = a * x^b; returns a, b and the fit's R^2 (of log y)."""
    import numpy as np

    lx, ly = np.log(np.asarray(xs, dtype=float)), np.log(np.asarray(ys, dtype=float))
    b, log_a = np.polyfit(lx, ly, 1)
    predicted = log_a + b * lx
    ss_res, ss_tot = float(((ly - predicted) ** 2).sum()), float(((ly - ly.mean()) ** 2).sum())
    return {"a": float(math.exp(log_a)), "b": float(b), "r2": 1.0 - ss_res / ss_tot if ss_tot else 1.0}


def require_pretrained(run: Path) -> None:
    missing = [part for part in ("tokenizer", "data", "base") if not (run / part).exists()]
    if missing:
        raise PocketError(f"{run} has no {'/, '.join(missing)}/: the ladder trains on a pretrained run's "
                          f"tokenizer and data with its settings (run `pocketgpt speedrun` first)")


def prepare_rung_dir(run: Path, rung_dir: Path) -> None:
    """A rung is a run directory of its own that shares the run's tokenizer and tokenized data."""
    rung_dir.mkdir(parents=True, exist_ok=True)
    for part in ("tokenizer", "data"):
        if not (rung_dir / part).exists():
            os.symlink((run / part).resolve(), rung_dir / part, target_is_directory=True)


def run_settings(run: Path) -> tuple[dict, "TrainConfig"]:  # noqa: F821
    """The run's base model config and its pretraining settings, as its config.json recorded them."""
    from dataclasses import fields

    from ..checkpoint import read_config
    from ..train.loop import TrainConfig

    config = read_config(run / "base")
    known = {f.name for f in fields(TrainConfig)}
    return config, TrainConfig(**{k: v for k, v in config["meta"]["train"].items() if k in known})


def train_rung(run: Path, out: Path, width: int, layers: int, steps: int, threads: int) -> dict:
    """Pretrain one size with the run's pretraining settings and sources (other sources would re-tokenize
    the shared data/); a rung of the run's own size and budget is the run's base model itself."""
    from dataclasses import replace

    from ..checkpoint import load_model
    from ..train.pretrain import PretrainConfig, pretrain

    name = f"d{width}x{layers}"
    config, train = run_settings(run)
    shape = {"d_model": width, "n_layer": layers, "n_head": width // 64, "n_kv_head": width // 64}
    if all(config["model"][k] == v for k, v in shape.items()) and train.steps == steps:
        model_dir = run / "base"
    else:
        rung_dir = out / name
        prepare_rung_dir(run, rung_dir)
        model_dir = rung_dir / "base"
        cfg = PretrainConfig(preset="small", sources=config["meta"]["sources"], model=shape,
                             train=replace(train, steps=steps, threads=threads or train.threads,
                                           sample_every=10 ** 9, eval_every=steps, save_every=max(100, steps // 4)))
        if (model_dir / "config.json").exists():  # trained by an earlier ladder: reused only for the same budget
            trained = json.loads((model_dir / "config.json").read_text())["meta"]["summary"].get("steps")
            if trained != steps:  # its figures were recorded as this budget's (the compute law fitted on them)
                raise PocketError(f"{model_dir} was trained for {trained} steps, where this ladder asks for {steps}: "
                                  "give another --out, or delete it to train it again")
        else:  # not trained yet, or interrupted: continue it
            pretrain(cfg, rung_dir, resume=(model_dir / "checkpoints").exists())
    model, _, meta = load_model(model_dir)
    summary = meta["meta"]["summary"]
    tokens = steps * train.batch_size * train.seq_len
    return {"name": name, "d_model": width, "n_layer": layers, "dir": str(model_dir),
            "reused": model_dir == run / "base",
            "params": model.num_params(), "non_embedding_params": model.num_params(embeddings=False),
            "tokens": tokens, "flops": model.flops_per_token(train.seq_len) * tokens,
            "val_loss": summary["val_loss"], "val_bpb": summary.get("val_bpb"),
            "train_time_s": summary.get("time_s")}


def fewshot_abilities(model_dir: str, n: int, device: str = "auto") -> dict:
    """Few-shot accuracy of a base model on facts (head, tail), arithmetic, and in-context copying, on the
    device the run trained on."""
    from ..checkpoint import load_model
    from ..common import pick_device
    from ..data.tasks import get_task
    from ..evaluate.harness import copying, evaluate_task

    model, chat, _ = load_model(model_dir, pick_device(device))
    model.eval()
    scores = {}
    for task in FEWSHOT_TASKS:
        r = evaluate_task(model, chat, get_task(task), "test", n, shots=3, mode="fewshot", show_progress=False)
        scores[task] = {"accuracy": r.accuracy, "ci_low": r.ci_low, "ci_high": r.ci_high, "n": r.n}
    copy = copying(model, chat, n=n)
    scores["copying"] = {"accuracy": (copy["expression"] + copy["result"]) / 2, "n": 2 * n}
    return scores


def plot(rungs: list[dict], fits: dict, path: Path) -> Path:
    import numpy as np

    from . import pyplot, save_figure

    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, key, label in ((axes[0], "non_embedding_params", "non-embedding parameters"),
                           (axes[1], "flops", "training compute (FLOPs)")):
        xs = [r[key] for r in rungs]
        ax.scatter(xs, [r["val_loss"] for r in rungs], color="C0", zorder=3)
        for r in rungs:
            ax.annotate(r["name"], (r[key], r["val_loss"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
        fit = fits[key]
        grid = np.geomspace(min(xs), max(xs), 50)
        ax.plot(grid, fit["a"] * grid ** fit["b"], color="C1", ls="--",
                label=f"L = {fit['a']:.3g} x^{fit['b']:.3f} (R² {fit['r2']:.3f})")
        ax.set(xscale="log", yscale="log", xlabel=label, ylabel="validation loss (nats/token)")
        ax.legend(fontsize=8)
    ax = axes[2]
    params = [r["params"] for r in rungs]
    for i, task in enumerate([*FEWSHOT_TASKS, "copying"]):
        ax.plot(params, [r["abilities"][task]["accuracy"] for r in rungs], marker="o", color=f"C{i}", label=task)
    ax.set(xscale="log", xlabel="parameters", ylabel="few-shot accuracy", ylim=(-0.02, 1.02),
           title="abilities against size")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def summary_markdown(rungs: list[dict], fits: dict, measured: dict) -> str:
    lines = ["# Scaling: one data mixture, one token budget, a ladder of sizes", "",
             "| model | params | non-embedding | tokens | FLOPs | val loss | head facts | tail facts | arithmetic "
             "| copying |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rungs:
        a = r["abilities"]
        lines.append(f"| {r['name']} | {r['params']:,} | {r['non_embedding_params']:,} | {r['tokens']:,} | "
                     f"{r['flops']:.2e} | {r['val_loss']:.3f} | " +
                     " | ".join(f"{a[t]['accuracy']:.0%}" for t in (*FEWSHOT_TASKS, "copying")) + " |")
    p, c = fits["non_embedding_params"], fits["flops"]
    lines += ["", f"Validation loss ~ N^{p['b']:.3f} in non-embedding parameters (R² {p['r2']:.3f}) and "
                  f"~ C^{c['b']:.3f} in training compute (R² {c['r2']:.3f}); Kaplan et al. report exponents of "
                  f"-0.076 and -0.050 for models trained to convergence."]
    small, large = rungs[0]["abilities"], rungs[-1]["abilities"]
    grown = [t for t in (*FEWSHOT_TASKS, "copying") if large[t]["accuracy"] - small[t]["accuracy"] >= 0.2]
    if grown:
        lines += ["", "From the smallest to the largest model: " + ", ".join(
            f"{t} {small[t]['accuracy']:.0%} -> {large[t]['accuracy']:.0%}" for t in grown) + "."]
    trained = [r for r in rungs if not r["reused"]]
    reused = [r["name"] for r in rungs if r["reused"]]
    lines += ["", f"Pretraining {', '.join(r['name'] for r in trained) or 'no rung'} took "
                  f"{sum(r['train_time_s'] for r in trained) / 60:.1f} min"
                  + (f" ({', '.join(reused)}: the run's own base model, reused)" if reused else "")
                  + f"; the few-shot evaluations {sum(r['eval_time_s'] for r in rungs) / 60:.1f} min. "
                  + provenance_line(measured)]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run directory with tokenizer/ and data/ (e.g. the speedrun's)")
    p.add_argument("--ladder", default=DEFAULT_LADDER, help=f"sizes as WIDTHxLAYERS (default {DEFAULT_LADDER})")
    p.add_argument("--steps", type=integer(1),
                   help="pretraining steps of every rung (the budget rule: the same tokens for every size); "
                        "default: the run's own, so the top rung of the default ladder is the run's base model")
    p.add_argument("--n", type=integer(1), default=100, help="test examples per few-shot task")
    p.add_argument("--out", help="output directory (default RUN/lab/scaling)")
    p.add_argument("--threads", type=integer(0), default=0)


def main(args) -> None:
    from rich.table import Table

    from ..common import atomic_write_json, atomic_write_text, console, provenance

    run = Path(args.run)
    out = Path(args.out) if args.out else run / "lab" / "scaling"
    ladder = parse_ladder(args.ladder)
    require_pretrained(run)
    steps = args.steps or run_settings(run)[1].steps
    t0 = time.time()
    rungs = []
    for width, layers in ladder:
        console.print(f"[bold]rung d{width}x{layers}[/]")
        rung = train_rung(run, out, width, layers, steps, args.threads)
        t_eval = time.time()
        rung["abilities"] = fewshot_abilities(rung["dir"], args.n, run_settings(run)[1].device)
        rung["eval_time_s"] = round(time.time() - t_eval, 1)
        rungs.append(rung)
    fits = {key: fit_power_law([r[key] for r in rungs], [r["val_loss"] for r in rungs])
            for key in ("non_embedding_params", "flops")}
    measured = provenance()
    atomic_write_json(out / "scaling.json", {"ladder": args.ladder, "steps": steps, "rungs": rungs, "fits": fits,
                                             "time_s": round(time.time() - t0, 1), "measured": measured})
    plot(rungs, fits, out / "scaling.png")
    text = summary_markdown(rungs, fits, measured)
    atomic_write_text(out / "summary.md", text)
    table = Table(title=f"scaling: {out}")
    for col in ("model", "params", "val loss", *FEWSHOT_TASKS, "copying"):
        table.add_column(col)
    for r in rungs:
        table.add_row(r["name"], f"{r['params']:,}", f"{r['val_loss']:.3f}",
                      *(f"{r['abilities'][t]['accuracy']:.0%}" for t in (*FEWSHOT_TASKS, "copying")))
    console.print(table)
    console.print(text.split("\n\n", 2)[-1].strip())
    console.print(f"plot: {out / 'scaling.png'} ({time.time() - t0:.0f} s)")
