"""Diversity: do SFT and RL narrow what a model says? Base, SFT, PPO and GRPO invent names, sampled many times.

The seeds say RLHF models lose entropy and base models stay more diverse ("generate more Pokémon
names"). Every checkpoint of a run gets the same prompts of the `names` task ("Here are some names of
places in this world: Dorin, Velmo, Tasrel. Invent five more names like these."): a base model as a
few-shot document (Q/A pairs, as the harness asks it), the others through their chat template. Each
prompt is sampled n times at one temperature; each seed draws its own prompts from the test split and
its own sampling streams, and every metric gets a 95% t-interval over the seeds.

    pocketgpt lab diversity runs/speedrun                     -> runs/speedrun/lab/diversity/
    pocketgpt lab diversity RUN --stages base,sft --seeds 5 --temperature 0.7

The metrics of one seed (all of them over the seed's prompts x samples replies):
- names per reply: name-like words a reply lists (`names.extract_names`); a model that writes nothing
  scores 0 on every ratio below, so silence never looks diverse;
- distinct names: distinct names / all names (`names.distinct_ratio`);
- distinct-1, distinct-2: distinct word n-grams / all word n-grams (Li et al. 2016), pooled over the
  replies; words are the lowercase letter/digit runs of the whole reply, so a reply template repeated
  every time ("Sure! Here are five names: ...") lowers them too;
- unique samples: per prompt, distinct reply strings (whitespace-trimmed) / n, averaged over prompts;
- novelty: the share of generated names that are neither in the text the model was shown (the
  prompt's examples, and a few-shot document's demos) nor a word of a world entity's name;
- entropy: the mean, over every reply token, of the entropy (nats) of the model's own next-token
  distribution (temperature 1) where it wrote that token. The `LM` protocol returns text only, so for
  a local checkpoint the replies are re-encoded and scored by the model in one teacher-forced pass;
  through an OpenAI-compatible server this metric is left out.

Writes diversity.json (settings, per-seed numbers, means and intervals), samples.jsonl (every reply),
diversity.png (grouped bars with error bars), summary.md; `pocketgpt report RUN` shows the table and
the plot.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
from pathlib import Path

from ..argtypes import integer, names, positive
from ..common import markdown_table, provenance_line
from ..errors import PocketError
from ..stages import POLICIES, RL_STAGES

# metric -> (column label, what it measures); the order of the table and the plot
METRICS = {
    "names_per_reply": ("names / reply", "name-like words per reply"),
    "distinct_names": ("distinct names", "distinct names / all names over the seed's replies"),
    "distinct_1": ("distinct-1", "distinct words / all words over the seed's replies"),
    "distinct_2": ("distinct-2", "distinct word bigrams / all word bigrams over the seed's replies"),
    "unique_samples": ("unique samples", "distinct reply strings / samples, per prompt, averaged"),
    "novelty": ("novelty", "share of names neither shown in the prompt nor in the world"),
    "entropy": ("entropy (nats)", "mean entropy of the model's next-token distribution over reply tokens"),
}
RATIOS = ("distinct_1", "distinct_2", "distinct_names", "unique_samples", "novelty")  # the plot's [0, 1] panel
FEWSHOT_STOPS = ("\n\n", "\nQ:")  # a base model's answer line ends before the next question

# Two-sided 95% critical values of Student's t for 1..30 degrees of freedom.
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


# ----------------------------------------------------------------------------- metrics


def words(text: str) -> list[str]:
    return re.findall(r"[^\W_]+", text.lower())


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct word n-grams / all word n-grams over the texts (n-grams never cross texts); 0 without any."""
    grams = [tuple(w[i:i + n]) for w in map(words, texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def unique_fraction(samples: list[str]) -> float:
    """Distinct samples / samples, whitespace-trimmed: 1.0 when no two samples of a prompt agree."""
    return len({s.strip() for s in samples}) / len(samples)


def seed_metrics(replies: list[list[str]], shown: list[str], world_words: frozenset[str],
                 entropies: list[float] | None) -> dict[str, float | None]:
    """The metrics of one seed: replies[p] are prompt p's samples, shown[p] the text the model read for it,
    world_words the lowercase words of the world's entity names, entropies one value per reply token
    (None: not measurable through this model's interface)."""
    from ..data.tasks.names import distinct_ratio, extract_names

    texts = [r for samples in replies for r in samples]
    seen = [frozenset(n.lower() for n in extract_names(s)) | world_words for s in shown]
    names = [(p, n.lower()) for p, samples in enumerate(replies) for r in samples for n in extract_names(r)]
    novel = sum(name not in seen[p] for p, name in names)
    entropy = None
    if entropies is not None:
        entropy = sum(entropies) / len(entropies) if entropies else 0.0  # no reply tokens: nothing varied
    return {
        "names_per_reply": len(names) / len(texts),
        "distinct_names": distinct_ratio(texts),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "unique_samples": sum(map(unique_fraction, replies)) / len(replies),
        "novelty": novel / len(names) if names else 0.0,
        "entropy": entropy,
    }


def mean_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and its 95% t-interval (mean, low, high): with few seeds, t's wider tails, not the normal's."""
    if len(values) < 2:
        raise PocketError(f"an interval needs at least 2 values (seeds), got {len(values)}")
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    df = n - 1
    t = T95[df - 1] if df <= len(T95) else 1.96 + 2.4 / df  # within 0.003 of the exact quantile beyond 30
    half = t * sd / math.sqrt(n)
    return mean, mean - half, mean + half


# ----------------------------------------------------------------------------- asking a model


def ask(lm, fewshot: bool, prompts: list, samples: int, temperature: float, max_tokens: int,
        seed: int) -> list[list[str]]:
    """`samples` replies to every prompt, through the `LM` protocol (a local run or any OpenAI-compatible
    server). A few-shot prompt is a document string, a chat prompt a list of messages."""
    from ..reason.lm import Request

    if not fewshot:
        requests = [Request(messages, n=samples, temperature=temperature, max_tokens=max_tokens, seed=seed)
                    for messages in prompts]
        return [[g.text for g in gens] for gens in lm.chat_batch(requests)]
    replies: list[list[str]] = [[] for _ in prompts]
    for k in range(samples):  # one call per sample: a server gives the same prompt and seed the same text
        generations = lm.complete_batch(prompts, max_tokens, temperature, FEWSHOT_STOPS, seed * samples + k)
        for reply, g in zip(replies, generations):
            reply.append(g.text)
    return replies


def token_entropies(model, prompt: list[int], replies: list[list[int]]) -> list[list[float]]:
    """Entropy (nats) of the model's next-token distribution at each position that wrote a reply token.

    The prompt and each reply form one sequence; position len(prompt) - 1 + i predicts reply token i.
    The replies are one batch, right-padded: attention is causal, so padding never reaches them.
    """
    import torch

    from ..train.rl_math import entropy_from_logits

    room = model.cfg.max_seq_len - len(prompt)
    replies = [r[:room] for r in replies]
    longest = max(map(len, replies), default=0)
    if longest == 0:
        return [[] for _ in replies]
    device = model.lm_head.weight.device
    ids = torch.tensor([prompt + r + [0] * (longest - len(r)) for r in replies], device=device)
    with torch.inference_mode():
        hidden = model.hidden_states(ids)[:, len(prompt) - 1:-1]  # only the reply positions reach the head
        entropy = entropy_from_logits(model.lm_head(hidden)).tolist()
    return [row[:len(r)] for row, r in zip(entropy, replies)]


def reply_entropies(lm, fewshot: bool, prompts: list, replies: list[list[str]], max_tokens: int) -> list[float]:
    """Per-token entropies of every reply, from a local checkpoint's model. The prompt is tokenized as
    `LocalLM` tokenized it (a few-shot document loses its oldest tokens the same way) and each reply is
    re-encoded from its text, since the protocol returns text: the tokens read back are the canonical
    encoding of what the model wrote (a special token it wrote comes back as ordinary text)."""
    chat, context = lm.chat_template, lm.model.cfg.max_seq_len
    out = []
    for prompt, samples in zip(prompts, replies):
        ids = chat.document(prompt)[-(context - max_tokens):] if fewshot else chat.prompt(prompt)
        tokens = [chat.tokenizer.encode(r) for r in samples]
        out += [h for row in token_entropies(lm.model, ids, tokens) for h in row]
    return out


def measure_stage(lm, fewshot: bool, seeds: list[int], n_prompts: int, samples: int, temperature: float,
                  max_tokens: int, shots: int, advance=lambda: None) -> tuple[list[dict], list[dict]]:
    """Every seed's metrics for one model, and every reply (for samples.jsonl). Entropy is measured
    when `lm` is a local checkpoint (we hold its model), else it is None."""
    from ..data.tasks import get_task
    from ..data.tasks.prompts import fewshot_text
    from ..reason.lm import LocalLM

    task = get_task("names")
    pool = task.examples("test")
    if n_prompts > len(pool):
        raise PocketError(f"--prompts {n_prompts}: the names task has {len(pool)} test prompts")
    world_words = frozenset(w.lower() for e in task.world.entities() for w in e.name.split())
    local = isinstance(lm, LocalLM)
    per_seed, records = [], []
    for seed in seeds:
        examples = random.Random(f"diversity:{seed}").sample(pool, n_prompts)
        if fewshot:
            prompts = [fewshot_text(task, e, shots) for e in examples]
            shown = prompts
        else:
            prompts = [[{"role": "user", "content": e.question}] for e in examples]
            shown = [e.question for e in examples]
        replies = ask(lm, fewshot, prompts, samples, temperature, max_tokens, seed)
        entropies = reply_entropies(lm, fewshot, prompts, replies, max_tokens) if local else None
        per_seed.append({"seed": seed, **seed_metrics(replies, shown, world_words, entropies)})
        records += [{"seed": seed, "question": e.question, "replies": r} for e, r in zip(examples, replies)]
        advance()
    return per_seed, records


def summarise(per_seed: list[dict]) -> dict[str, dict | None]:
    """metric -> {"mean", "low", "high"} over the seeds (None where a metric was not measured)."""
    out = {}
    for key in METRICS:
        values = [s[key] for s in per_seed]
        if any(v is None for v in values):
            out[key] = None
            continue
        mean, low, high = mean_interval(values)
        out[key] = {"mean": mean, "low": low, "high": high}
    return out


# ----------------------------------------------------------------------------- tables, plot, verdict


def diversity_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """One row per stage: each metric as mean ± half its 95% interval (the report card shows it too)."""
    header = ["checkpoint", *(label for label, _ in METRICS.values())]
    rows = []
    for stage in results["stages"].values():
        cells = [stage["label"]]
        for key in METRICS:
            m = stage["metrics"][key]
            cells.append("n/a" if m is None else f"{m['mean']:.3f} ± {(m['high'] - m['low']) / 2:.3f}")
        rows.append(cells)
    return header, rows


def verdicts(results: dict) -> list[str]:
    """For each RL stage against the base model: which metrics are lower or higher with intervals that do
    not overlap, and which cannot be told apart at these seeds."""
    stages = results["stages"]
    if "base" not in stages:
        return []
    base = stages["base"]["metrics"]
    lines = []
    for name in (stage.name for stage in RL_STAGES):
        if name not in stages:
            continue
        lower, higher, same = [], [], []
        for key, (label, _) in METRICS.items():
            b, s = base[key], stages[name]["metrics"][key]
            if b is None or s is None:
                continue
            (lower if s["high"] < b["low"] else higher if s["low"] > b["high"] else same).append(label)
        found = [f"{word}: {', '.join(labels)}" for word, labels in
                 (("lower", lower), ("higher", higher), ("no clear difference", same)) if labels]
        lines.append(f"{stages[name]['label']} vs base: {'; '.join(found)}.")
    return lines


def plot_diversity(results: dict, path: Path) -> Path:
    """Grouped bars, one colour per stage, 95% intervals as error bars: the [0, 1] ratios in one panel,
    names per reply and entropy in panels of their own (their scales differ)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(results["stages"].values())
    panels = [list(RATIOS), ["names_per_reply"], ["entropy"]]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4), gridspec_kw={"width_ratios": [5, 1.4, 1.4]})
    width = 0.8 / len(stages)
    for ax, keys in zip(axes, panels):
        for i, stage in enumerate(stages):
            shown = [(j, stage["metrics"][k]) for j, k in enumerate(keys) if stage["metrics"][k] is not None]
            ax.bar([j + (i - (len(stages) - 1) / 2) * width for j, _ in shown], [m["mean"] for _, m in shown],
                   width, yerr=[[m["mean"] - m["low"] for _, m in shown], [m["high"] - m["mean"] for _, m in shown]],
                   capsize=3, color=f"C{i}", label=stage["label"])
        ax.set_xticks(range(len(keys)), [METRICS[k][0] for k in keys], rotation=20)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylim(0, 1.05)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(stages), frameon=False)
    s = results["settings"]
    fig.suptitle(f"names task: {s['prompts']} prompts x {s['samples']} samples, temperature {s['temperature']}, "
                 f"{len(s['seeds'])} seeds (95% t-intervals)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # room for the legend below the panels
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary_markdown(results: dict) -> str:
    s = results["settings"]
    parts = [f"# Diversity on the names task\n\n{s['prompts']} test prompts per seed, {s['samples']} samples each, "
             f"temperature {s['temperature']}, at most {s['max_tokens']} tokens, seeds {s['seeds']}; the base model "
             f"few-shot ({s['shots']} demos), the others through their chat template. Mean ± half the 95% "
             "t-interval over seeds.\n",
             markdown_table(*diversity_table(results)) + "\n",
             "\n".join(f"- {label}: {text}" for label, text in METRICS.values()) + "\n",
             f"Entropy: {results['entropy']}\n"]
    if results["skipped"]:
        parts.append("Skipped: " + "; ".join(f"{k} ({v})" for k, v in results["skipped"].items()) + "\n")
    lines = verdicts(results)
    if lines:
        parts.append("## RL against base (intervals that do not overlap)\n\n" + "\n".join(f"- {v}" for v in lines) + "\n")
    parts.append("![diversity](diversity.png)\n")
    if "measured" in results:
        parts.append(provenance_line(results["measured"]) + "\n")
    return "\n".join(parts)


def card_markdown(results: dict) -> str:
    """This experiment's section of the run's report card (`pocketgpt report` includes it as written)."""
    s = results["settings"]
    parts = ["## Diversity over seeds (`pocketgpt lab diversity`)\n",
             f"Names task, {s['prompts']} prompts x {s['samples']} samples at temperature {s['temperature']} "
             f"per seed; mean ± half the 95% t-interval over {len(s['seeds'])} seeds "
             "(definitions: lab/diversity/summary.md).\n",
             markdown_table(*diversity_table(results)) + "\n"]
    lines = verdicts(results)
    if lines:
        parts.append("\n".join(f"- {line}" for line in lines) + "\n")
    parts.append("![diversity](lab/diversity/diversity.png)\n")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run directory with stage folders (base, sft, ppo, grpo, ...)")
    p.add_argument("--stages", type=names(s.name for s in POLICIES), default=[s.name for s in POLICIES if not s.ablation], help="comma-separated stages; missing ones are skipped")
    p.add_argument("--prompts", type=integer(1), default=20, help="test prompts per seed")
    p.add_argument("--samples", type=integer(2), default=8, help="samples per prompt")
    p.add_argument("--seeds", type=integer(2), default=3, help="seeds 0..N-1 (at least 2: the intervals are over seeds)")
    p.add_argument("--temperature", type=positive, default=1.0, help="above 0: greedy decoding has no diversity to measure")
    p.add_argument("--max-tokens", type=integer(1), default=48)
    p.add_argument("--shots", type=integer(0), default=3, help="solved examples in the base model's few-shot document")
    p.add_argument("--out", help="output directory (default: RUN/lab/diversity)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=integer(0), default=0)


def main(args) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from ..common import atomic_write_json, atomic_write_text, console, pick_device, provenance, set_threads
    from ..evaluate.harness import model_mode
    from ..reason.lm import LM

    run = Path(args.run)
    if not run.is_dir():
        raise PocketError(f"{run} is not a run directory")
    set_threads(args.threads)
    wanted = args.stages
    present = [s for s in wanted if (run / s / "config.json").exists()]
    skipped = {s: f"no checkpoint at {run / s}" for s in wanted if s not in present}
    for stage, reason in skipped.items():
        console.print(f"[yellow]skipping {stage}[/]: {reason}")
    if not present:
        raise PocketError(f"none of the stages {', '.join(wanted)} is in {run}")
    out = Path(args.out) if args.out else run / "lab" / "diversity"
    seeds = list(range(args.seeds))
    labels = {s.name: s.label for s in POLICIES}

    stages, records = {}, []
    progress = Progress(TextColumn("[bold]diversity {task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal)
    with progress:
        bar = progress.add_task("", total=len(present) * len(seeds))
        for stage in present:
            progress.update(bar, description=stage)
            lm = LM.load(run / stage, args.device)
            fewshot = model_mode(lm.config) == "fewshot"
            per_seed, replies = measure_stage(lm, fewshot, seeds, args.prompts, args.samples, args.temperature,
                                              args.max_tokens, args.shots, lambda: progress.advance(bar))
            stages[stage] = {"label": labels.get(stage, stage), "mode": "fewshot" if fewshot else "chat",
                             "model": lm.name, "seeds": per_seed, "metrics": summarise(per_seed)}
            records += [{"stage": stage, **r} for r in replies]
            del lm  # one checkpoint in memory at a time

    results = {
        "task": "names", "split": "test",
        "settings": {"prompts": args.prompts, "samples": args.samples, "seeds": seeds,
                     "temperature": args.temperature, "max_tokens": args.max_tokens, "shots": args.shots},
        "metrics": {key: text for key, (_, text) in METRICS.items()},
        "entropy": "computed from the local checkpoints' full next-token distributions (temperature 1), "
                   "the replies re-encoded and scored in one teacher-forced pass",
        "stages": stages, "skipped": skipped, "measured": provenance(pick_device(args.device)),
    }
    atomic_write_json(out / "diversity.json", results)
    atomic_write_text(out / "samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    plot_diversity(results, out / "diversity.png")
    atomic_write_text(out / "summary.md", summary_markdown(results))
    atomic_write_text(out / "card.md", card_markdown(results))

    header, rows = diversity_table(results)
    table = Table(title=f"diversity: {out}")
    for col in header:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for line in verdicts(results):
        console.print(line)
    # the report card reads RUN/lab/diversity only
    card = f"; report card: pocketgpt report {run}" if out.resolve() == (run / "lab" / "diversity").resolve() else ""
    console.print(f"plot: {out / 'diversity.png'}{card}")
