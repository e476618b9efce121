"""The report card: one Markdown page and a few plots that say what a run did and how good it got.

    pocketgpt report runs/speedrun   ->  runs/speedrun/report.md, runs/speedrun/plots/*.png
    pocketgpt report runs/speedrun --publish reports/speedrun   (the card, its images and timings, to commit)

Tables: the stages (time, steps, tokens, losses), the data mixture as realised, task accuracy with
one column per checkpoint (base few-shot, SFT, ...), and hallucination with and without the
mitigation. Plots: loss curves per stage, and whatever else the metrics hold (reward, KL, entropy).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..checkpoint import latest_training_state
from ..common import (
    PocketError,
    atomic_write_bytes,
    atomic_write_text,
    human,
    markdown_table,
    provenance_line,
    read_jsonl,
)
from ..data.tasks.base import is_refusal
from ..data.world import read_run_world
from ..stages import POLICIES, RL_STAGES, STAGES

# The checkpoints that answer, in the order a run makes them, with the card's names for them.
CHECKPOINTS = [(s.name, s.label) for s in POLICIES]


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def stage_rows(run: Path) -> list[list[str]]:
    """time, steps, tokens, speed (the median step's tokens/s and MFU against the machine's measured
    bf16 matmul peak) and results of every stage."""
    rows = []
    tok = _load(run / "tokenizer" / "report.json")
    if tok:
        rows.append(["tokenizer", f"{tok['train_seconds']:.0f}s", "", f"{human(tok['train_chars'])} chars", "",
                     f"vocab {tok['vocab_size']}"])
    for stage in (s.name for s in STAGES):
        cfg = _load(run / stage / "config.json")
        if not cfg:
            state = latest_training_state(run / stage)
            if state is not None:  # still training, or stopped: said, not left out without a word
                rows.append([stage, "", state.name.removeprefix("step_").lstrip("0") or "0", "", "",
                             "not finished: a training checkpoint, no model yet"])
            continue
        s = cfg.get("meta", {}).get("summary", {})
        if cfg.get("meta", {}).get("stage") == "imported":  # not trained here: where it came from instead
            rows.append([stage, "", "", "", "", f"imported from {Path(s.get('source', '?')).name}"])
            continue
        result = ", ".join(f"{k} {s[k]:.3f}" for k in ("loss", "val_loss", "val_bpb", "pair_accuracy",
                                                       "val_pair_accuracy", "reward", "kl")
                           if isinstance(s.get(k), (int, float)))
        speed = f"{human(s['tokens_per_s'])} tok/s" if s.get("tokens_per_s") else ""
        if speed and s.get("dtype"):  # "auto" settled per machine: bf16 where faster, else fp32
            speed += f" in {s['dtype']}"
        if s.get("mfu"):
            speed += f", MFU {s['mfu']:.0%} of {s['peak_flops'] / 1e9:.0f} GFLOP/s"
        rows.append([stage, f"{s.get('time_s', 0):.0f}s", str(s.get("steps", "")), human(s.get("tokens", 0)),
                     speed, result])
    return rows


def test_results(path: Path) -> dict:
    """A results.json's task entries measured on the test split, the only ones the card shows as such."""
    res = _load(path) or {}
    return {t: r for t, r in res.items() if isinstance(r, dict) and "accuracy" in r and r.get("split") == "test"}


def accuracy_table(run: Path) -> tuple[list[str], list[list[str]]]:
    columns = [(stage, label, test_results(run / stage / "eval" / "results.json")) for stage, label in CHECKPOINTS]
    columns = [c for c in columns if c[2]]
    tasks = []
    for _, _, res in columns:
        tasks += [t for t in res if t not in tasks]
    header = ["task"] + [label for _, label, _ in columns]
    rows = []
    for t in tasks:
        row = [t]
        for _, _, res in columns:
            r = res.get(t)
            row.append(accuracy_cell(r) if r else "")
        rows.append(row)
    return header, rows


def accuracy_cell(r: dict) -> str:
    """An accuracy with half its 95% (Wilson) interval; at 0% or 100%, where the interval is one-sided, its
    bound instead (0 right of 10 is "0.0% (95%: up to 28%)", not "±14%")."""
    if r["accuracy"] in (0, 1):
        return f"{r['accuracy']:.1%} (95%: {'up to' if r['accuracy'] == 0 else 'from'} " \
               f"{r['ci_high'] if r['accuracy'] == 0 else r['ci_low']:.0%})"
    return f"{r['accuracy']:.1%} ±{(r['ci_high'] - r['ci_low']) / 2:.0%}"


def hallucination(run: Path, stage: str) -> dict | None:
    """Closed-book fact QA: how often the assistant invents an answer it cannot know, or refuses one it knows."""
    res = test_results(run / stage / "eval" / "results.json")
    if "factqa_unseen" not in res or "factqa_head" not in res:
        return None
    def answers(entry: dict) -> list[dict]:
        """The entry's answers, in the results' own folder (earlier results named them by a path that breaks
        when the run moves, or that names another run's files when it was copied)."""
        return read_jsonl(run / stage / "eval" / Path(entry["rows"]).name)

    unseen, head = answers(res["factqa_unseen"]), answers(res["factqa_head"])
    chat_rows = [r for name in res if isinstance(res[name], dict) and "rows" in res[name] for r in answers(res[name])]
    return {
        "hallucination_rate": sum(not is_refusal(r["output"]) for r in unseen) / max(1, len(unseen)),
        "false_refusal_rate": sum(is_refusal(r["output"]) for r in head) / max(1, len(head)),
        "head_accuracy": res["factqa_head"]["accuracy"],
        "well_formed": sum(r.get("finish_reason") == "stop" and bool(r["output"]) for r in chat_rows)
        / max(1, len(chat_rows)),
    }


def matrix_provenance(results: dict) -> str:
    """Where and when the matrix's cells were measured: one line, or one per run when a matrix gathered
    cells of several runs (`--cells`, a continued run)."""
    runs: dict[str, tuple[dict, int]] = {}
    for cell in results["cells"]:
        p = cell.get("measured", results.get("measured"))
        if p:
            key = json.dumps(p, sort_keys=True)
            runs[key] = (p, runs.get(key, (p, 0))[1] + 1)
    if len(runs) <= 1:
        return "".join(provenance_line(p) + "\n" for p, _ in runs.values())
    return "".join(f"- {n} cell{'s' * (n > 1)}: {provenance_line(p)}\n" for p, n in runs.values())


def matrix_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """The strategy matrix (reason/matrix.py writes it): one line per task and strategy."""
    header = ["task", "strategy", "accuracy", "95% interval", "n", "model calls", "tokens / question", "other"]
    rows = []
    for c in results["cells"]:
        if "error" in c:
            rows.append([c["task"], c["label"], "skipped", c["error"], "", "", "", ""])
            continue
        other = ", ".join(f"{k.replace('_', ' ')} {v:.1%}" for k, v in c.get("scores", {}).items())
        if c.get("vote_curve"):  # one sample, then the vote over the first 2, 3, ... samples
            curve = " / ".join(f"{v:.0%}" for v in [c["one_sample"], *c["vote_curve"][1:]])
            other = ", ".join(filter(None, [other, f"vote of 1 / 2 / ... samples: {curve}"]))
        tokens = (c["prompt_tokens"] + c["completion_tokens"]) / max(1, c["n"])
        rows.append([c["task"], c["label"] or c["strategy"], f"{c['accuracy']:.1%}",
                     f"{c['ci_low']:.1%} - {c['ci_high']:.1%}", str(c["n"]), str(c["calls"]), f"{tokens:.0f}", other])
    return header, rows


def comparison_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """The matrix's paired comparisons (reason/matrix.py: ORDERINGS): one line per ordering of the talk."""
    # a question's count where the first did better (right where the second was wrong, or a higher chance of one
    # sample being right): "only the first right" misnamed the one-sample rows
    header = ["task", "comparison", "difference", "95% interval (paired)", "first better on", "second better on", "n"]
    rows = [[c["task"], f"{c['first']} vs {c['second']}", f"{c['difference']:+.1%}",
             f"{c['ci_low']:+.1%} - {c['ci_high']:+.1%}", str(c["wins"]), str(c["losses"]), str(c["n"])]
            for c in results.get("comparisons", [])]
    return header, rows


def plot_leaderboard(rows: list[dict], path: Path) -> Path:
    """Ratings with their 95% intervals, best at the top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(rows) + 1.2))
    y = range(len(rows))
    ax.errorbar([r["rating"] for r in rows], y, xerr=[[r["rating"] - r["ci_low"] for r in rows],
                                                       [r["ci_high"] - r["rating"] for r in rows]],
                fmt="o", capsize=4)
    ax.set_yticks(list(y), [r["model"] for r in rows])
    ax.set_xlabel("Bradley-Terry rating (95% bootstrap interval)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_metrics(run: Path) -> list[Path]:
    """One PNG per metric family: training loss, validation loss, and any RL curves present."""
    metrics_path = run / "metrics.jsonl"
    if not metrics_path.exists():
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(metrics_path, torn_lines=True)
    stages = sorted({r["stage"] for r in records}, key=[r["stage"] for r in records].index)
    out = []
    for key, title in [("loss", "training loss"), ("val_loss", "validation loss"), ("reward", "reward"),
                       ("kl", "KL to the reference"), ("entropy", "entropy")]:
        series = {s: [(r["step"], r[key]) for r in records if r["stage"] == s and key in r] for s in stages}
        series = {s: v for s, v in series.items() if v}
        if not series:
            continue
        fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.2), squeeze=False)
        for ax, (s, points) in zip(axes[0], series.items()):
            ax.plot(*zip(*points))
            ax.set_title(f"{s}: {title}")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = run / "plots" / f"{key}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        out.append(path)
    return out


def model_line(base: dict) -> str:
    """The pretrained model's shape, and what departs from Llama's architecture."""
    m, meta = base["model"], base.get("meta", {})
    params = meta.get("summary", {}).get("params")
    size = f", {human(params)} parameters" if params else ""
    extras = "; smeared keys (`model.smear_keys`)" if m.get("smear_keys") else ""
    summary = meta.get("summary", {})
    name = (f"imported {summary.get('family')} (`{Path(summary.get('source', '?')).name}`)"
            if meta.get("stage") == "imported" else f"`{meta.get('preset', 'custom')}`")
    return (f"Model: {name}{size} ({m['n_layer']} layers, d_model {m['d_model']}, "
            f"{m['n_head']} heads, vocab {m['vocab_size']}){extras}.")


def write_report(run: str | Path) -> Path:
    run = Path(run)
    if not run.is_dir():
        raise PocketError(f"{run} is a file, not a run directory" if run.exists() else f"{run} does not exist")
    if (run / "config.json").exists():
        raise PocketError(f"{run} is a model directory; a report card covers a whole run: give {run.parent}")
    if not any((run / name).exists() for name in ("speedrun.json", "metrics.jsonl", *(s for s, _ in CHECKPOINTS))):
        raise PocketError(f"{run} is not a run directory: it holds no metrics.jsonl, speedrun.json or stage "
                          f"({', '.join(stage for stage, _ in CHECKPOINTS)})")
    parts = [f"# pocketgpt report card: `{run}`\n"]
    from ..speedrun import read_timings

    timing = read_timings(run / "speedrun.json")
    if timing:
        parts.append(f"Speedrun wall time: **{timing['total_seconds'] / 60:.1f} min** "
                     f"({', '.join(f'{k} {v:.0f}s' for k, v in timing['stage_seconds'].items())}).\n")
        if "measured" in timing:
            parts.append(provenance_line(timing["measured"]) + "\n")
    world = read_run_world(run)
    if world:
        parts.append(f"World: seed **{world.seed}** ({world.n_countries} countries, {world.n_cities} cities, "
                     f"{world.n_people} people, {world.n_companies} companies; `--set world.seed=N` makes "
                     f"another).\n")
    base = _load(run / "base" / "config.json")
    if base:
        parts.append(model_line(base) + "\n")
    parts.append("## Stages\n")
    parts.append(markdown_table(["stage", "time", "steps", "tokens", "speed", "result"], stage_rows(run)) + "\n")
    summary = (base or {}).get("meta", {}).get("summary", {})
    if summary.get("realised_mixture"):
        parts.append("## Pretraining mixture (as realised)\n")
        parts.append(markdown_table(["source", "weight", "share of rows", "tokens", "epochs"], [
            [n, f"{m['weight']:.2f}", f"{m['share']:.2f}", human(m["tokens"]), f"{m['epochs']:.2f}"]
            for n, m in summary["realised_mixture"].items()]) + "\n")
        if summary.get("copy_warmup_tokens"):
            parts.append(f"Before the mixture: {human(summary['copy_warmup_tokens'])} tokens of random token "
                         f"segments, each repeated to fill its row (`pretrain.copy_warmup = "
                         f"{base['meta']['copy_warmup']}` steps).\n")
    header, rows = accuracy_table(run)
    if rows:
        parts.append("## Task accuracy (test split, ± half the 95% interval; at 0% or 100% its one bound)\n")
        parts.append(markdown_table(header, rows) + "\n")
    halluc = [(label, hallucination(run, stage)) for stage, label in CHECKPOINTS if stage != "base"]
    halluc = [(label, h) for label, h in halluc if h]
    if halluc:
        parts.append("## Hallucination (closed-book fact QA)\n")
        parts.append("Hallucination rate: share of questions about unseen entities answered with anything "
                     "but a refusal. False refusals: share of head-fact questions refused.\n")
        parts.append(markdown_table(["checkpoint", "hallucination rate", "false refusals", "head accuracy",
                                     "well-formed answers"],
                                    [[label, f"{h['hallucination_rate']:.1%}", f"{h['false_refusal_rate']:.1%}",
                                      f"{h['head_accuracy']:.1%}", f"{h['well_formed']:.1%}"]
                                     for label, h in halluc]) + "\n")
    div = [(stage, label, (_load(run / stage / "eval" / "results.json") or {}).get("diversity"))
           for stage, label in CHECKPOINTS]
    div = [(stage, label, d) for stage, label, d in div if d]
    if div:
        parts.append("## Diversity (\"invent five more names\", temperature 1)\n")
        parts.append(diversity_reading({stage: d for stage, _, d in div}) + "\n")
        parts.append(markdown_table(["checkpoint", "token entropy (nats)", "distinct names"],
                                    [[label, f"{d['entropy']:.3f}", f"{d['distinct_names']:.1%}"]
                                     for _, label, d in div]) + "\n")
    lab_diversity = run / "lab" / "diversity" / "card.md"  # the lab writes its section of the card
    if lab_diversity.exists():
        parts.append(lab_diversity.read_text())
    copy = [(label, (_load(run / stage / "eval" / "results.json") or {}).get("copying")) for stage, label in CHECKPOINTS]
    copy = [(label, c) for label, c in copy if c]
    if copy:
        parts.append("## In-context copying (random operands and words)\n")
        parts.append("Tool use needs it: type the question's numbers into the call, copy the result into the "
                     "answer (calculator drills, a format pretraining shows). Answering from retrieved passages "
                     "needs it in any format: continue a list of invented words shown once before. Random "
                     "operands and words leave nothing to memorise.\n")
        parts.append(markdown_table(["checkpoint", "types the expression", "copies the result", "continues the list"],
                                    [[label, f"{c['expression']:.1%}", f"{c['result']:.1%}",
                                      f"{c['list']:.1%}" if "list" in c else "-"] for label, c in copy]) + "\n")
    ppo_summary = _load(run / "ppo" / "ppo_summary.json")
    if ppo_summary:
        parts.append("## PPO on held-out prompts (same sampling seed before and after)\n")
        keys = ["heldout_reward", "heldout_kl", "heldout_entropy", "heldout_accuracy"]
        parts.append(markdown_table(["", *keys], [
            ["SFT (start)", *[f"{ppo_summary['before'][k]:.3f}" for k in keys]],
            ["PPO (end)", *[f"{ppo_summary['after'][k]:.3f}" for k in keys]]]) + "\n")
    grpo_summary = _load(run / "grpo" / "grpo_summary.json")
    if grpo_summary:
        parts.append("## GRPO on held-out problems\n")
        parts.append(markdown_table(["task", "before", "after"], [
            [k, f"{grpo_summary['before'][k]:.1%}", f"{grpo_summary['after'][k]:.1%}"]
            for k in grpo_summary["after"]]) + "\n")
    for stage, label in CHECKPOINTS:
        matrix = _load(run / stage / "matrix" / "matrix.json")
        if matrix:
            parts.append(f"## Reasoning strategies: {label} ({matrix['split']} split)\n")
            parts.append("Each strategy asks the same checkpoint; model calls and tokens are its cost "
                         f"(`pocketgpt eval {run}/{stage} --matrix`).\n")
            parts.append(markdown_table(*matrix_table(matrix)) + "\n")
            if matrix.get("comparisons"):
                parts.append("The talk's orderings, question by question: a difference whose interval excludes "
                             "zero is one the matrix shows.\n")
                parts.append(markdown_table(*comparison_table(matrix)) + "\n")
            parts.append(matrix_provenance(matrix))
    arena = _load(run / "arena" / "leaderboard.json")
    if arena:
        parts.append(f"## Arena ({arena['battles']} battles, judged by {arena['judge']})\n")
        parts.append("Bradley-Terry ratings (400 x log10-odds, mean 1000) with bootstrap 95% intervals; "
                     "overlapping intervals share a rank (`pocketgpt arena`).\n")
        parts.append(markdown_table(["rank", "checkpoint", "rating", "95% interval", "style-controlled", "online Elo",
                                     "battles", "win rate"],
                                    [[str(r["rank"]), r["model"], f"{r['rating']:.0f}",
                                      f"{r['ci_low']:.0f} - {r['ci_high']:.0f}", f"{r['style_controlled']:.0f}",
                                      f"{r['elo']:.0f}", str(r["battles"]), f"{r['win_rate']:.1%}"]
                                     for r in arena["rows"]]) + "\n")
        if arena.get("unsettled"):
            parts.append(f"**Not ratings yet**: {arena['unsettled']}.\n")
        if "measured" in arena:
            parts.append(provenance_line(arena["measured"]) + "\n")
        if (run / "arena" / "leaderboard.png").exists():
            parts.append("![arena](arena/leaderboard.png)\n")
    plots = plot_metrics(run)
    if plots:
        parts.append("## Curves\n")
        parts += [f"![{p.stem}](plots/{p.name})\n" for p in plots]
    path = run / "report.md"
    atomic_write_text(path, "\n".join(parts))
    return path


def diversity_reading(div: dict[str, dict]) -> str:
    """The seeds' claim, then what this run's table says of it, in words computed from the table: one draw
    per checkpoint, so a direction, not a verdict (the lab's diversity experiment has seeds and intervals)."""
    text = "The seeds say RLHF trades diversity for reward: base models stay more varied."
    base = div.get("base")
    tuned = [(stage.label, div[stage.name]) for stage in RL_STAGES if stage.name in div]
    if base and tuned:
        against = ", ".join(f"{label} {d['entropy']:.3f} ({'lower' if d['entropy'] < base['entropy'] else 'higher'})"
                            for label, d in tuned)
        text += f" In this run, one draw each: token entropy {base['entropy']:.3f} in the base model, {against}."
        sft = div.get("sft")
        if sft and base["names_per_answer"] < sft["names_per_answer"] / 2:
            text += (f" The base model writes {base['names_per_answer']:.1f} names an answer against SFT's "
                     f"{sft['names_per_answer']:.1f}: few-shot it often stops after one, so its share of distinct "
                     "names counts fewer names.")
    return text + " Over seeds, with intervals: `pocketgpt lab diversity RUN`."


def publish_report(run: str | Path, dest: str | Path) -> Path:
    """Write the run's report card, then copy it with the images it shows, the speedrun's timings and the
    strategy matrices it quotes (the SFT model's as matrix.json, another stage's as matrix-STAGE.json: their
    paired comparisons and where they were measured) into `dest`: a folder that can be committed and quoted
    (the README's figures come from one such card)."""
    run, dest = Path(run), Path(dest)
    if dest.exists() and not dest.is_dir():
        raise PocketError(f"{dest} is a file: --publish takes a folder to copy the card into")
    card = write_report(run)
    text = card.read_text()
    for rel in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        atomic_write_bytes(dest / rel, (run / rel).read_bytes())
    if (run / "speedrun.json").exists():
        atomic_write_bytes(dest / "speedrun.json", (run / "speedrun.json").read_bytes())
    if "lab/diversity/summary.md" in text:  # the lab's section points at its definitions
        atomic_write_bytes(dest / "lab/diversity/summary.md", (run / "lab/diversity/summary.md").read_bytes())
    for stage, _ in CHECKPOINTS:
        matrix = run / stage / "matrix" / "matrix.json"
        if matrix.exists():
            atomic_write_bytes(dest / ("matrix.json" if stage == "sft" else f"matrix-{stage}.json"), matrix.read_bytes())
    atomic_write_text(dest / "report.md", text)
    return dest / "report.md"
