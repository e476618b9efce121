"""Knowledge recall through the layers: read the answer out of every layer (logit lens), then cut the
attention paths that carry the subject to the last position, layer by layer (attention knockout).

A fact prompt ("The capital of Velmo is") ends right before its answer. The logit lens puts the
residual stream after each block through the model's own final norm and unembedding, as if the
model stopped there, and records the rank and probability of the answer's first token at the last
position: for facts a model knows, the rank falls from thousands to 0 as the layers go by. The
knockout follows Geva et al. 2023 ("Dissecting Recall of Factual Associations"): in a window of
layers around block L, the last position may no longer attend to the subject's tokens (or, as the
comparison, to the other words of the prompt); how much the answer's final probability drops says in
which layers the subject's information moves to where the answer is predicted.

On our models the prompts come from the synthetic world, phrased as its encyclopedia writes them,
for head, tail and unseen facts; on an imported model (a tokenizer that is not ours) they are a
short list of real-world facts, of which only those the model answers right are kept.

    pocketgpt lab recall runs/speedrun                  # -> runs/speedrun/lab/recall/
    pocketgpt lab recall runs/smollm2 --window 1        # an imported model: real-world facts
"""

from __future__ import annotations

import argparse
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..argtypes import integer

# Real-world facts a small model may know: (prompt, subject, answer). The subject is where the
# knockout cuts; the answer's first token, encoded after the prompt, is what the lens looks for.
REAL_FACTS: tuple[tuple[str, str, str], ...] = (
    *((f"The capital of {country} is", country, city) for country, city in (
        ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
        ("Japan", "Tokyo"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Greece", "Athens"),
        ("Canada", "Ottawa"), ("Australia", "Canberra"), ("China", "Beijing"), ("England", "London"),
        ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Poland", "Warsaw"),
        ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Turkey", "Ankara"), ("Kenya", "Nairobi"))),
    *((f"The official language of {country} is", country, language) for country, language in (
        ("Brazil", "Portuguese"), ("France", "French"), ("Mexico", "Spanish"), ("Japan", "Japanese"),
        ("Italy", "Italian"), ("the Netherlands", "Dutch"), ("Greece", "Greek"), ("Russia", "Russian"),
        ("Germany", "German"), ("Argentina", "Spanish"))),
    *((f"The currency of {country} is the", country, currency) for country, currency in (
        ("Japan", "yen"), ("the United States", "dollar"), ("India", "rupee"), ("Russia", "ruble"),
        ("China", "yuan"), ("Germany", "euro"), ("Mexico", "peso"), ("Switzerland", "franc"),
        ("South Korea", "won"), ("the United Kingdom", "pound"))),
)
CONDITIONS = ("subject", "relation")  # whose tokens the last position may no longer attend to
METHOD = ("Each prompt ends right before its answer. The rank is the number of tokens scored above the answer's "
          "first token when the residual stream after a layer goes through the model's final norm and "
          "unembedding (0: the top prediction). The knockout forbids the last position to attend to the "
          "subject's tokens (or to the prompt's other words) in a window of blocks, and measures the relative "
          "drop of the answer's output probability, on the facts the model answers right.")


@dataclass(frozen=True)
class FactPrompt:
    prompt: str   # the text the model continues, ending right before the answer
    subject: str  # the entity the fact is about, as it appears in the prompt
    answer: str   # the value; the lens follows its first token
    group: str    # head / tail / unseen for the synthetic world, known for real-world facts


@dataclass(frozen=True)
class EncodedFact:
    ids: list[int]       # the prompt as the model reads it (a base model's document start included)
    subject: list[int]   # positions of the subject's tokens
    relation: list[int]  # positions of the prompt's other words, but not the first or the last position
    answer: int          # the answer's first token, as the tokenizer encodes it after the prompt


# ----------------------------------------------------------------------------- fact prompts


def world_prompts(world, n: int, seed: int = 0) -> list[FactPrompt]:
    """Up to n facts per tier, each as the encyclopedia states it, cut before the value.

    Numeric facts are left out: a number's first token is a bare digit group (or a space), which
    says little about recall. The phrasing is the first of the attribute's statements that names
    the entity before the value with at least two other words ("{e} makes {v}" would leave no
    relation tokens to compare the subject with).
    """
    from ..data.world import ATTRIBUTE, TIERS

    rng = random.Random(seed)
    prompts = []
    for tier in TIERS:
        facts = [f for f in world.facts if f.tier == tier and not ATTRIBUTE[(f.kind, f.attribute)].numeric]
        for fact in sorted(rng.sample(facts, min(n, len(facts))), key=world.facts.index):
            head = _statement_head(ATTRIBUTE[(fact.kind, fact.attribute)].statements)
            prompts.append(FactPrompt(head.format(e=fact.entity), fact.entity, fact.value, tier))
    return prompts


def _statement_head(statements: tuple[str, ...]) -> str:
    for statement in statements:
        head = statement.split("{v}")[0].rstrip()
        if "{e}" in head and len(head.replace("{e}", "").split()) >= 2:
            return head
    raise ValueError(f"no statement names the entity before the value: {statements}")


def real_prompts(n: int) -> list[FactPrompt]:
    return [FactPrompt(p, s, a, "known") for p, s, a in REAL_FACTS[:n]]


def encode_fact(chat, fact: FactPrompt) -> EncodedFact:
    """Token ids, the subject's and the relation's positions, and the answer's first token in context."""
    from ..common import PocketError

    tok = chat.tokenizer
    start = chat.document_start
    text_ids = tok.encode(fact.prompt)
    full = tok.encode(f"{fact.prompt} {fact.answer}")
    if full[:len(text_ids)] != text_ids or len(full) == len(text_ids):
        raise PocketError(f"the tokenizer merges {fact.prompt!r} with its answer {fact.answer!r}")
    # Byte offsets of each token's end, read off the decoded prefixes: exact for byte-level BPE and
    # for tokenizers that write a leading space into the first token (SentencePiece) alike.
    ends = [len(tok.decode(text_ids[:i + 1]).encode()) for i in range(len(text_ids))]
    begins = [0, *ends[:-1]]
    # The subject's bytes, with the space before it (a small vocabulary may spell " Velmo" as " ", "Vel", "mo").
    at = fact.prompt.index(fact.subject)
    lo = len(fact.prompt[:at].rstrip(" ").encode()) if at else 0
    hi = len(fact.prompt[:at + len(fact.subject)].encode())
    offset, last = len(start), len(start) + len(text_ids) - 1
    subject = [offset + i for i, (b, e) in enumerate(zip(begins, ends)) if b < hi and e > lo]
    if last in subject:
        raise PocketError(f"{fact.prompt!r} ends with its subject: nothing is left to read it from")
    # The first position of a sequence is where heads park the attention they do not need (an
    # "attention sink": our <|bos|>, or the first word when a model has no such token); cutting it
    # would disturb every head, not just the flow of the relation, so it is never a relation token.
    relation = [p for p in range(max(offset, 1), last) if p not in subject]
    return EncodedFact(start + text_ids, subject, relation, full[len(text_ids)])


# ----------------------------------------------------------------------------- the logit lens


def rank_and_prob(logits, answer: int) -> tuple[list[int], list[float]]:
    """For each row of logits (..., V): how many tokens score strictly higher than the answer (0 = the
    top prediction) and the answer's softmax probability."""
    logits = logits.float()
    ranks = (logits > logits[..., answer:answer + 1]).sum(-1)
    probs = logits.softmax(-1)[..., answer]
    return ranks.reshape(-1).tolist(), probs.reshape(-1).tolist()


def lens_logits(model, ids: list[int]):
    """(n_layer + 1, V): the last position's residual stream after the embedding and after every block,
    through the model's own final norm and unembedding. The last row is the model's output."""
    import torch

    with torch.no_grad():
        _, stream = model.hidden_states(torch.tensor([ids], device=model.lm_head.weight.device), all_layers=True)
        last = torch.stack([x[0, -1] for x in stream])
        return model.lm_head(model.model.norm(last))


# ----------------------------------------------------------------------------- attention knockout


def window_layers(center: int, window: int, n_layer: int) -> range:
    """The blocks a knockout centred on block `center` (0-based) covers: `window` of them, clipped."""
    first = max(0, center - (window - 1) // 2)
    return range(first, min(n_layer, center + window // 2 + 1))


def knockout_drops(model, fact: EncodedFact, window: int) -> dict[str, list[float]]:
    """For each condition and each block L: the relative drop of the answer's final probability when, in
    the blocks around L, the last position may not attend to the condition's positions.

    One forward pass: row 0 is the intact model, then one row per (condition, block), each with its
    own attention mask in the blocks it cuts (every other block keeps the causal mask).
    """
    import torch

    n_layer, T = model.cfg.n_layer, len(fact.ids)
    device = model.lm_head.weight.device
    rows = 1 + len(CONDITIONS) * n_layer
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    masks = {layer: causal.repeat(rows, 1, 1, 1) for layer in range(n_layer)}
    for c, condition in enumerate(CONDITIONS):
        blocked = getattr(fact, condition)
        for center in range(n_layer):
            for layer in window_layers(center, window, n_layer):
                masks[layer][1 + c * n_layer + center, 0, T - 1, blocked] = False
    idx = torch.tensor([fact.ids], device=device).expand(rows, T)
    with torch.no_grad():
        logits = model.lm_head(model.hidden_states(idx, attn_masks=masks)[:, -1])
    _, probs = rank_and_prob(logits, fact.answer)
    intact = probs[0]
    drops = [1 - p / intact for p in probs[1:]]
    return {condition: drops[c * n_layer:(c + 1) * n_layer] for c, condition in enumerate(CONDITIONS)}


# ----------------------------------------------------------------------------- the experiment


def measure(model, chat, facts: list[FactPrompt], window: int, knockout_group: str) -> list[dict]:
    """Lens ranks and probabilities for every fact; knockout drops for the facts of `knockout_group`
    that the model answers right (rank 0 at the last layer)."""
    from rich.progress import track

    from ..common import console

    records = []
    for fact in track(facts, description="logit lens + knockout", console=console, transient=True,
                      disable=not console.is_terminal):
        encoded = encode_fact(chat, fact)
        ranks, probs = rank_and_prob(lens_logits(model, encoded.ids), encoded.answer)
        record = {"prompt": fact.prompt, "subject": fact.subject, "answer": fact.answer, "group": fact.group,
                  "answer_token": chat.tokenizer.decode([encoded.answer]), "ranks": ranks, "probs": probs}
        if fact.group == knockout_group and ranks[-1] == 0:
            record["knockout"] = knockout_drops(model, encoded, window)
        records.append(record)
    return records


def layer_stats(records: list[dict]) -> dict:
    """Per group and layer: median and quartiles of the rank, mean probability, share ranked first;
    per condition and block: the mean relative probability drop over the knocked-out facts."""
    groups = {}
    for group in dict.fromkeys(r["group"] for r in records):
        ranks = list(zip(*(r["ranks"] for r in records if r["group"] == group)))
        probs = list(zip(*(r["probs"] for r in records if r["group"] == group)))
        quartiles = [statistics.quantiles(layer, n=4, method="inclusive") if len(layer) > 1 else [layer[0]] * 3
                     for layer in ranks]
        groups[group] = {"n": len(ranks[0]), "median_rank": [statistics.median(layer) for layer in ranks],
                         "rank_q1": [q[0] for q in quartiles], "rank_q3": [q[2] for q in quartiles],
                         "mean_prob": [statistics.fmean(layer) for layer in probs],
                         "top1": [sum(rank == 0 for rank in layer) / len(layer) for layer in ranks]}
    knocked = [r["knockout"] for r in records if "knockout" in r]
    knockout = {"n": len(knocked)}
    if knocked:
        knockout |= {c: [statistics.fmean(layer) for layer in zip(*(k[c] for k in knocked))] for c in CONDITIONS}
    return {"groups": groups, "knockout": knockout}


def blocks(n: int) -> str:
    return f"{n} block" if n == 1 else f"{n} blocks"


def describe(stats: dict, n_layer: int, window: int, kept: tuple[int, int] | None) -> list[str]:
    """The trend in words, every figure computed from the numbers."""
    lines = []
    if kept:
        lines.append(f"Real-world facts: the model ranks the right answer first for {kept[0]} of {kept[1]}; "
                     "only those are kept.")
    for group, g in stats["groups"].items():
        top = next((layer for layer, rank in enumerate(g["median_rank"]) if rank == 0), None)
        reached = "it never reaches 0" if top is None else f"it first reaches 0 after block {top}"
        lines.append(f"{group} facts ({g['n']}): the median rank of the answer goes from "
                     f"{g['median_rank'][0]:g} after the embedding to {g['median_rank'][-1]:g} after the last "
                     f"block ({n_layer}); {reached}. At the end the answer is the top prediction for "
                     f"{g['top1'][-1]:.0%} of them (mean probability {g['mean_prob'][-1]:.2f}).")
    ko = stats["knockout"]
    if ko["n"]:
        parts = []
        for c in CONDITIONS:
            peak = max(range(n_layer), key=lambda i: ko[c][i])
            parts.append(f"to the {c} tokens costs most at block {peak + 1} "
                         f"({ko[c][peak]:.0%} of the answer's probability; {ko[c][-1]:.0%} at the last block)")
        lines.append(f"Attention knockout ({ko['n']} known facts, {blocks(window)} at a time): blocking the last "
                     f"position's attention " + "; blocking it ".join(parts) + ".")
    else:
        lines.append("Attention knockout: no fact of the knockout group is answered right, so nothing was cut.")
    return lines


# ----------------------------------------------------------------------------- plots and summary


def plot_ranks(stats: dict, title: str, path: Path) -> Path:
    """Median rank by layer per group (log scale, 1 = top), the interquartile range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for group, g in stats["groups"].items():
        layers = range(len(g["median_rank"]))
        line, = ax.plot(layers, [r + 1 for r in g["median_rank"]], marker="o", label=f"{group} (n={g['n']})")
        ax.fill_between(layers, [r + 1 for r in g["rank_q1"]], [r + 1 for r in g["rank_q3"]],
                        color=line.get_color(), alpha=0.15)
    ax.set_yscale("log")
    ax.set_xlabel("layer (0 = embedding, i = after block i)")
    ax.set_ylabel("answer's place in the ranking (1 = top)")
    ax.set_title(f"{title}: logit lens, median and quartiles")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_knockout(stats: dict, window: int, title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ko = stats["knockout"]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for c in CONDITIONS:
        ax.plot(range(1, len(ko[c]) + 1), [100 * d for d in ko[c]], marker="o", label=f"last -> {c} tokens")
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xlabel(f"block at the centre of the knockout window ({blocks(window)})")
    ax.set_ylabel("drop of the answer's probability (%)")
    ax.set_title(f"{title}: attention knockout ({ko['n']} known facts)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary_table(stats: dict, n_layer: int):
    from rich.table import Table

    groups, ko = stats["groups"], stats["knockout"]
    table = Table(title="knowledge recall by layer")
    table.add_column("layer", justify="right")
    for group in groups:
        table.add_column(f"{group} median rank", justify="right")
    for c in CONDITIONS if ko["n"] else ():
        table.add_column(f"{c} knockout", justify="right")
    for layer in range(n_layer + 1):
        drops = [f"{ko[c][layer - 1]:.0%}" if layer else "-" for c in CONDITIONS] if ko["n"] else []
        table.add_row("emb" if layer == 0 else str(layer),
                      *(f"{g['median_rank'][layer]:g}" for g in groups.values()), *drops)
    return table


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a run directory (ours, or an imported model's)")
    parser.add_argument("--stage", default="base", help="which stage of the run to probe (default: base)")
    parser.add_argument("--n", type=integer(1), default=60, help="facts per tier (real-world facts: at most this many)")
    parser.add_argument("--window", type=integer(1),
                        help="blocks knocked out around each block (default: a sixth of the blocks, at least 1)")
    parser.add_argument("--out", help="output directory (default: RUN/lab/recall)")
    parser.add_argument("--seed", type=integer(0), default=0, help="which facts are drawn from each tier")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=integer(1))


def run_world(run: Path):
    """The world the run was pretrained on: its `world` source's options (the base stage records its
    sources), else the default world the task suite uses."""
    from ..checkpoint import read_config
    from ..data.sources import SourceSpec
    from ..data.tasks import default_world
    from ..data.world import WorldConfig, generate_world

    base = run / "base"
    sources = read_config(base).get("meta", {}).get("sources", {}) if (base / "config.json").exists() else {}
    specs = [SourceSpec.from_dict(name, d) for name, d in sources.items() if d.get("kind") == "world"]
    return generate_world(WorldConfig(**specs[0].options)) if specs else default_world()


def main(args: argparse.Namespace) -> None:
    from ..checkpoint import load_model
    from ..common import (
        PocketError,
        atomic_write_json,
        atomic_write_text,
        console,
        markdown_table,
        pick_device,
        provenance,
        provenance_line,
        set_threads,
    )
    from ..tokenizer import BPETokenizer

    if args.n < 1:
        raise PocketError(f"--n must be at least 1, got {args.n}")
    run = Path(args.run)
    if not (run / args.stage / "config.json").exists():
        raise PocketError(f"{run} has no stage {args.stage!r} (no {run / args.stage / 'config.json'})")
    set_threads(args.threads)
    model, chat, _ = load_model(run / args.stage, pick_device(args.device), policy=True)  # not a reward model
    n_layer = model.cfg.n_layer
    window = args.window or max(1, n_layer // 6)
    if not 1 <= window <= n_layer:
        raise PocketError(f"--window must lie between 1 and the model's {n_layer} blocks, got {args.window}")

    ours = isinstance(chat.tokenizer, BPETokenizer)  # an imported model brings a Hugging Face tokenizer
    facts = world_prompts(run_world(run), args.n, args.seed) if ours else real_prompts(args.n)
    records = measure(model, chat, facts, window, knockout_group="head" if ours else "known")
    kept = None
    if not ours:  # an imported model: only the facts it knows say anything about recall
        kept = (sum(r["ranks"][-1] == 0 for r in records), len(records))
        records = [r for r in records if r["ranks"][-1] == 0]
        if not records:
            raise PocketError(f"{run / args.stage} answers none of the {len(facts)} real-world facts right")

    stats = layer_stats(records)
    title = f"{run.name}/{args.stage}"
    lines = describe(stats, n_layer, window, kept)
    out = Path(args.out) if args.out else run / "lab" / "recall"
    plots = [plot_ranks(stats, title, out / "rank_by_layer.png")]
    if stats["knockout"]["n"]:
        plots.append(plot_knockout(stats, window, title, out / "knockout.png"))
    measured = provenance(model.lm_head.weight.device)
    atomic_write_json(out / "recall.json", {
        "run": str(run), "stage": args.stage, "fact_set": "world" if ours else "real", "n_layer": n_layer,
        "window": window, "kept": kept and {"kept": kept[0], "of": kept[1]}, **stats, "facts": records,
        "measured": measured})
    header = ["layer", *(f"{g} median rank" for g in stats["groups"]), *(f"{g} top-1" for g in stats["groups"])]
    rows = [["embedding" if layer == 0 else f"block {layer}",
             *(f"{g['median_rank'][layer]:g}" for g in stats["groups"].values()),
             *(f"{g['top1'][layer]:.0%}" for g in stats["groups"].values())] for layer in range(n_layer + 1)]
    atomic_write_text(out / "summary.md", "\n\n".join([
        f"# Knowledge recall through the layers: `{title}`",
        METHOD,
        "\n".join(f"- {line}" for line in lines),
        markdown_table(header, rows),
        " ".join(f"![{p.stem}]({p.name})" for p in plots),
        provenance_line(measured)]) + "\n")

    console.print(summary_table(stats, n_layer))
    for line in lines:
        console.print(f"- {line}")
    console.print(f"-> {out}/ ({', '.join(p.name for p in plots)}, recall.json, summary.md)")
