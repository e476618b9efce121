"""The strategy matrix: task x strategy, each cell an accuracy with its 95% interval and its cost.

    pocketgpt eval runs/speedrun --matrix                  # our checkpoint, through the engine
    pocketgpt eval --server http://127.0.0.1:8000/v1 --matrix --shots 2 --out runs/smollm2/matrix

The rows are the comparisons "State of GPT" makes: on the Game of 24, input-output vs chain of
thought vs self-consistency (a vote over ten chains; the paper's over 100) vs Tree of Thoughts (the
paper's ordering; chains and search alike with a calculator for the moves' results, and rows with the
model's own arithmetic); on arithmetic, direct vs
chain of thought vs a calculator, and a vote on top of each (five chains; five calculator paths,
which outvote a slip only where slips differ from path to path); the vote again on 9.11 vs 9.9, where a small
model's single chain of thought is right often enough for a vote to have something to gather; on
multi-hop questions, closed book vs ReAct; on JSON extraction, unconstrained vs constrained decoding;
reflection where the model can check itself; and facts closed book vs retrieved passages (RAG), with
each retriever's recall. Every vote is also compared with one of its own samples, drawn alone (the
self-consistency paper's first point), beside the greedy chain of thought it is listed with. The result
is `matrix.json` (every cell, and the talk's orderings compared question by question with a paired
interval) plus one JSONL of answers and traces per cell; the run's report card shows both tables
(evaluate/report.py reads `RUN/matrix/matrix.json`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from ..common import PocketError, atomic_write_text, console, provenance
from ..data.tasks import get_task
from .lm import LM
from .strategies import Settings, evaluate_strategy, one_sample


@dataclass(frozen=True)
class Cell:
    task: str
    label: str  # the row's name in the table
    strategy: str
    overrides: dict = field(default_factory=dict)  # Settings fields that differ from the matrix's


# Direct cells show two solved examples in the direct rendering and chain-of-thought cells one worked
# example, so that each asks the way its name says whatever the model would do unprompted. The Game of
# 24's worked chain searches (a move or two taken back at each table) and is too long for that: one
# example and the chain would outgrow the `small` model's 256-token context, so its chains ask zero-shot.
# Its vote is over ten chains (the paper's over 100): one sampled chain finds a path about one time in
# twenty, so five rarely hold a right one for the vote to gather.
IO, WORKED, SEARCHING = {"shots": 2}, {"shots": 1}, {"shots": 0}
MATRIX: list[Cell] = [
    Cell("game24", "IO", "direct", IO),
    Cell("game24", "CoT", "cot", SEARCHING),
    Cell("game24", "CoT-SC", "self_consistency", {**SEARCHING, "k": 10}),
    Cell("game24", "CoT, own arithmetic", "cot", {**SEARCHING, "move_arithmetic": "claimed"}),
    Cell("game24", "ToT b=1", "tot", {"beam": 1}),
    Cell("game24", "ToT b=5", "tot", {"beam": 5}),
    Cell("game24", "ToT b=5, own arithmetic", "tot", {"beam": 5, "move_arithmetic": "checked"}),
    Cell("game24", "ToT b=5, oracle values (ablation)", "tot", {"beam": 5, "oracle": True}),
    Cell("arithmetic", "direct", "direct", IO),
    Cell("arithmetic", "CoT", "cot", WORKED),
    Cell("arithmetic", "calculator", "react", {"tools": ("calculator",)}),
    Cell("arithmetic", "calculator-SC", "react", {"tools": ("calculator",), "paths": 5}),
    Cell("arithmetic", "CoT-SC", "self_consistency", WORKED),
    Cell("arithmetic", "reflection", "reflection", WORKED),
    Cell("compare_decimals", "CoT", "cot", WORKED),
    Cell("compare_decimals", "CoT-SC", "self_consistency", WORKED),
    Cell("compare_decimals", "reflection", "reflection", WORKED),
    Cell("multihop", "closed book", "cot", WORKED),
    Cell("multihop", "ReAct", "react", {"tools": ("search", "calculator")}),
    Cell("structured", "unconstrained", "direct"),
    Cell("structured", "constrained", "constrained"),
    Cell("factqa_head", "closed book", "direct"),
    Cell("factqa_head", "RAG", "rag"),
    Cell("factqa_head", "RAG, quoting", "rag", {"quote": True}),
    Cell("factqa_tail", "closed book", "direct"),
    Cell("factqa_tail", "RAG", "rag"),
    Cell("factqa_tail", "RAG, quoting", "rag", {"quote": True}),
    Cell("factqa_unseen", "closed book", "direct"),
    Cell("factqa_unseen", "RAG (BM25)", "rag", {"retriever": "bm25"}),
    Cell("factqa_unseen", "RAG (embeddings)", "rag", {"retriever": "dense"}),
    Cell("factqa_unseen", "RAG", "rag"),
    Cell("factqa_unseen", "RAG, quoting", "rag", {"quote": True}),
]
# The talk's orderings, each compared question by question (the same questions in both rows): the row
# said to do better, then the row below it. A paired comparison sees what two overlapping intervals hide.
ORDERINGS = [("game24", "ToT b=5", "CoT-SC"), ("game24", "CoT-SC", "CoT"), ("game24", "CoT", "IO"),
             ("arithmetic", "calculator", "CoT"), ("arithmetic", "CoT", "direct"), ("arithmetic", "CoT-SC", "CoT"),
             ("arithmetic", "calculator-SC", "calculator"),
             ("compare_decimals", "CoT-SC", "CoT"), ("multihop", "ReAct", "closed book"),
             ("structured", "constrained", "unconstrained"), ("factqa_unseen", "RAG, quoting", "closed book")]
SIZES = {"game24": 100, "arithmetic": 100, "compare_decimals": 100, "multihop": 100, "structured": 100,
         "factqa_head": 100, "factqa_tail": 100, "factqa_unseen": 100}


def run_matrix(lm: LM, out_dir: str | Path, settings: Settings = Settings(), n: int | None = None,
               cells: list[Cell] = MATRIX, split: str = "test", log=console.print) -> dict:
    """Evaluate every cell; write each cell's answers as it finishes and `matrix.json` after every cell.

    A matrix run again into the same directory, for the same model, split, settings and n, keeps the
    cells already measured there: an interrupted matrix continues where it stopped, and cells asked for
    in several runs (`--cells`) gather in one matrix.json. A matrix measured there otherwise is refused
    (its cells would be dropped), not started over."""
    out_dir = Path(out_dir)
    results = {"model": lm.name, "split": split, "settings": asdict(settings), "n": n, "cells": [],
               "measured": provenance()}  # where and when this (last) run measured
    measured = _measured_cells(out_dir / "matrix.json", results)
    progress = Progress(TextColumn("[bold]matrix {task.description}"), BarColumn(), MofNCompleteColumn(),
                        console=console, disable=not console.is_terminal, transient=True)
    with progress:
        bar = progress.add_task("", total=len(cells))
        for cell in cells:
            progress.update(bar, description=f"{cell.task}: {cell.label}")
            earlier = measured.pop((cell.task, cell.label), None)
            if earlier is not None:
                log(f"{cell.task:>18} {cell.label:>18}  measured before: {earlier['accuracy']:.1%}", highlight=False)
                results["cells"].append(earlier)
                progress.advance(bar)
                continue
            start = time.perf_counter()
            try:
                result, rows = evaluate_strategy(lm, get_task(cell.task), cell.strategy, split,
                                                 n or SIZES.get(cell.task), replace(settings, **cell.overrides),
                                                 label=cell.label)
            except PocketError as e:  # a cell this model cannot take (its prompts outgrow the context): say so
                log(f"{cell.task:>18} {cell.label:>18}  skipped: {e}", highlight=False)
                results["cells"].append({"task": cell.task, "label": cell.label, "strategy": cell.strategy,
                                         "error": str(e)})
                progress.advance(bar)
                continue
            seconds = time.perf_counter() - start
            log(f"{result.line()}  {seconds:.0f}s", highlight=False)
            atomic_write_text(cell_path(out_dir, cell.task, cell.label),
                              "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))
            results["cells"].append({**result.to_dict(), "seconds": seconds, "measured": results["measured"]})
            _write(out_dir, results, measured)
            progress.advance(bar)
    return _write(out_dir, results, measured)  # with what earlier runs measured and this one did not ask for


def cell_path(out_dir: Path, task: str, label: str) -> Path:
    """Where a cell's answers and traces go: one JSON line per question."""
    name = f"{task}__{label}".replace(" ", "_").replace("/", "_").replace(",", "").replace("=", "")
    return Path(out_dir) / "cells" / f"{name}.jsonl"


def paired_difference(first: list[float], second: list[float], resamples: int = 10_000, seed: int = 0) -> dict:
    """Accuracy of `first` minus accuracy of `second` on the same questions, with a 95% bootstrap interval
    (the questions resampled with replacement, seeded), and on how many questions the first did better
    (wins) or worse (losses). A question's accuracy is 1 or 0 (right or wrong), or a chance (one sample's)."""
    import numpy as np

    d = np.asarray(first, dtype=float) - np.asarray(second, dtype=float)
    means = d[np.random.default_rng(seed).integers(0, len(d), (resamples, len(d)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"difference": float(d.mean()), "ci_low": float(low), "ci_high": float(high),
            "wins": int((d > 0).sum()), "losses": int((d < 0).sum())}


def comparisons(out_dir: Path, cells: list[dict]) -> list[dict]:
    """The talk's orderings (ORDERINGS) whose two rows are among `cells` (the matrix's measured cells, whose
    answers are in `out_dir`), each paired question by question; an ordering whose rows asked different
    questions is left out."""
    measured = {(c["task"], c["label"]) for c in cells if "error" not in c}
    found = []
    for task, first, second in ORDERINGS:
        paths = cell_path(out_dir, task, first), cell_path(out_dir, task, second)
        if not {(task, first), (task, second)} <= measured or not all(p.exists() for p in paths):
            continue
        a, b = ([json.loads(line) for line in p.read_text().splitlines()] for p in paths)
        if [r["question"] for r in a] != [r["question"] for r in b] or not a:
            continue
        found.append({"task": task, "first": first, "second": second, "n": len(a),
                      **paired_difference([r["correct"] for r in a], [r["correct"] for r in b])})
    # Every self-consistency vote against one of its own samples (the paper's first point: one sampled path).
    # Reflection votes too when the model accepts none of its attempts, but its first attempt is greedy.
    for c in cells:
        path = cell_path(out_dir, c["task"], c["label"])
        if c.get("one_sample") is None or c["strategy"] == "reflection" or not path.exists():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        if rows and all("samples_correct" in r for r in rows):
            found.append({"task": c["task"], "first": c["label"], "second": f"{c['label']}, one sample",
                          "n": len(rows), **paired_difference([r["correct"] for r in rows], [one_sample(r) for r in rows])})
    return found


def _measured_cells(path: Path, results: dict) -> dict[tuple[str, str], dict]:
    """The finished cells of an earlier matrix.json made like `results` (same model, split, settings, n),
    by (task, label); none if there is no such file; a PocketError naming what differs if it was made
    otherwise. Each keeps where and when it was measured (a file from before cells recorded it: its run's
    record)."""
    if not path.exists():
        return {}
    try:
        earlier = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise PocketError(f"{path} is not valid JSON: delete it to measure the matrix again") from None
    # A setting added since that file was written counts as its default, which is what that run used.
    defaults = json.loads(json.dumps(asdict(Settings()), default=str))
    if isinstance(earlier.get("settings"), dict):
        earlier["settings"] = {**defaults, **earlier["settings"]}
    now = json.loads(json.dumps({key: results[key] for key in ("model", "split", "settings", "n")}, default=str))
    differ = [key for key in now if earlier.get(key) != now[key]]
    if "settings" in differ and isinstance(earlier.get("settings"), dict):
        differ.remove("settings")
        differ += [f"settings.{k}" for k in now["settings"] if earlier["settings"].get(k) != now["settings"][k]]
    cells = [c for c in earlier.get("cells", []) if "error" not in c]
    if differ and cells:  # its cells would be dropped from the file and the report card without a word
        was = ", ".join(f"{key} {_setting(earlier, key)!r}, now {_setting(now, key)!r}" for key in differ)
        raise PocketError(f"{path} holds {len(cells)} cells measured otherwise ({was}): give another --out, "
                          f"or delete {path} to measure the matrix again")
    run = {"measured": earlier["measured"]} if "measured" in earlier else {}
    return {(c["task"], c["label"]): {**run, **c} for c in cells}


def _setting(record: dict, key: str):
    """record["settings"]["k"] for "settings.k", else record[key]."""
    group, _, name = key.partition(".")
    return record.get(group, {}).get(name) if name else record.get(key)


def _write(out_dir: Path, results: dict, measured: dict) -> dict:
    """matrix.json: this run's cells and those measured earlier that it has not reached or not asked for,
    in the order of MATRIX (cells of no such row after them, in the order they came); returns what it wrote."""
    order = {(c.task, c.label): i for i, c in enumerate(MATRIX)}
    cells = sorted(results["cells"] + list(measured.values()), key=lambda c: order.get((c["task"], c["label"]), len(order)))
    written = json.loads(json.dumps({**results, "cells": cells, "comparisons": comparisons(out_dir, cells)}, default=str))
    atomic_write_text(out_dir / "matrix.json", json.dumps(written, indent=2) + "\n")
    return written

