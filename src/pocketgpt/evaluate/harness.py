"""Score a model on a task: accuracy with a confidence interval, and every example's verdict.

A base model only continues documents, so it is asked through a few-shot "fake document":

    Q: What is the capital of Velmora?
    A: Tarsin

    Q: What is the capital of Githes?
    A:                                  <- the model completes this line

An assistant (a chat checkpoint) is asked through the chat format, optionally with solved examples
as earlier turns. Either way the model's text goes to the task's exact verifier.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..chat import ChatTemplate
from ..common import PocketError, atomic_write_text, console, provenance, wilson_interval
from ..context import fit_shots_to_context, fit_to_context
from ..data.shards import encode_documents
from ..data.tasks import Task, default_world
from ..data.tasks.prompts import chat_messages, fewshot_text
from ..data.tasks.tools import task_tools
from ..engine import Engine, SamplingParams
from ..model import GPT
from ..toolloop import generate_with_tools

MODES = ("auto", "fewshot", "chat")


@dataclass
class EvalResult:
    task: str
    split: str
    mode: str
    style: str
    shots: int
    n: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    fewer_shots: int = 0  # prompts that fit the context only with fewer solved examples than `shots`

    def line(self) -> str:
        return (f"{self.task:>18} {self.split:>10}  {self.accuracy:6.1%}  "
                f"[{self.ci_low:.1%}, {self.ci_high:.1%}]  n={self.n}  ({self.mode}, {self.shots}-shot, {self.style})"
                + (f"  {self.fewer_shots} with fewer shots to fit" if self.fewer_shots else ""))


def evaluate_task(model: GPT, chat: ChatTemplate, task: Task, split: str = "test", n: int | None = None,
                  shots: int = 3, mode: str = "fewshot", style: str = "direct", batch_size: int = 128,
                  max_tokens: int | None = None, out_path: str | Path | None = None,
                  show_progress: bool = True, compile: bool = False) -> EvalResult:
    """Greedy-decode every example, verify, and (optionally) write one JSON line per example.
    `compile`: with the compiled decode step that reads the weights as inputs (Engine's `fold_weights=False`),
    compiled once per process for every checkpoint of the same shape and dtype.

    `batch_size` rows decode together: the speedrun's SFT model answered the whole suite's test split
    (300 questions a task, compiled) in 32.7 s at 128 rows against 46-51 s at 32, every answer the same;
    100 questions a task, as the speedrun asks, in 12.4-13.4 s against 16.9."""
    if mode not in ("fewshot", "chat"):
        raise PocketError(f"unknown eval mode {mode!r}; use fewshot (base models) or chat (assistants)")
    task.check_style(style)
    examples = task.examples(split)[:n] if n else task.examples(split)
    if not examples:
        raise PocketError(f"task {task.name!r} has no {split} examples")
    engine = Engine(model, chat.tokenizer, max_batch=batch_size, compile=compile, fold_weights=False)
    pool = len(task.examples("train"))
    if shots > pool:
        console.print(f"[yellow]{task.name}: {shots} shots asked, its train split holds {pool}: {pool} shots[/]")
        shots = pool
    if mode == "fewshot":
        build = lambda i, k: chat.document(fewshot_text(task, examples[i], k))  # noqa: E731
        params = SamplingParams(max_tokens=max_tokens or 64, temperature=0, stop_tokens=chat.document_stops,
                                stop_strings=("\n\n", "\nQ:"))
    else:
        build = lambda i, k: chat.prompt(chat_messages(task, examples[i], k, style))  # noqa: E731
        params = SamplingParams(max_tokens=max_tokens or (256 if style == "cot" else 64), temperature=0,
                                stop_tokens=chat.stop_ids)
    prompts, fewer, fewest = fit_shots_to_context(model, [build(i, shots) for i in range(len(examples))], params,
                                                  build, shots)
    if fewer:
        console.print(f"[yellow]{task.name}: {fewer} of {len(examples)} prompts fit the model's "
                      f"{model.cfg.max_seq_len}-token context only with fewer shots (as few as {fewest} of {shots})[/]")
    tools = task_tools(getattr(task, "world", None) or default_world())

    rows = []
    progress = Progress(TextColumn(f"[bold]eval {task.name}"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), disable=not show_progress or not console.is_terminal, transient=True,
                        console=console)
    with progress:
        bar = progress.add_task("eval", total=len(examples))
        # Every question at once: the engine keeps `batch_size` rows decoding and starts the next
        # question as soon as a row finishes.
        if mode == "chat":  # an assistant's tool calls are executed; the verdict is on its answer
            done = generate_with_tools(engine, chat, prompts, params, tools, on_done=lambda: progress.advance(bar))
        else:
            done = engine.generate(prompts, params, on_done=lambda: progress.advance(bar))
    correct = 0
    for i, e in enumerate(examples):
        c = done[i]
        text, finish, calls = c.text.strip(), c.finish_reason, (c.calls if mode == "chat" else [])
        ok = task.verify(e, text)
        correct += ok
        rows.append({"index": i, "question": e.question, "answer": e.answer, "output": text, "tool_calls": calls,
                     "correct": ok, "finish_reason": finish, "meta": e.meta})
    lo, hi = wilson_interval(correct, len(examples))
    result = EvalResult(task.name, split, mode, style, shots, len(examples), correct, correct / len(examples), lo, hi,
                        fewer)
    if out_path:
        atomic_write_text(out_path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))
    return result


def model_mode(meta: dict) -> str:
    """Base checkpoints are prompted with few-shot documents, post-trained ones through chat."""
    return "fewshot" if meta.get("meta", {}).get("stage", "base") == "base" else "chat"


@torch.no_grad()
def bits_per_byte(model: GPT, chat: ChatTemplate, docs: list[str | list[dict]], seq_len: int = 256,
                  batch_size: int = 8, max_batches: int = 50) -> float:
    """Bits per byte of `docs` (texts, and conversations as lists of messages, which the world's and the
    chat source's documents include), packed as pretraining packs them: comparable across tokenizers."""
    from ..data.mixture import MixtureLoader
    from ..train.pretrain import evaluate_lm

    stream = np.fromiter((t for ids in encode_documents(chat, docs) for t in ids), dtype=np.int64)
    seq_len = min(seq_len, model.cfg.max_seq_len, len(stream) - 1)
    loader = MixtureLoader({"text": stream}, {"text": 1.0}, batch_size, seq_len)
    batches = max(1, min(max_batches, (len(stream) - 1) // (seq_len * batch_size)))
    device = model.lm_head.weight.device
    token_bytes = torch.tensor(chat.tokenizer.byte_lengths(), device=device)
    return evaluate_lm(model, loader, batches, token_bytes, device, "float32")["val_bpb"]



# The report card's rows: each task with the rendering an assistant is trained on (see train/sft.py).
SUITE: dict[str, str] = {
    "factqa_head": "direct", "factqa_tail": "direct", "factqa_unseen": "direct",
    "arithmetic": "cot", "compare_decimals": "cot", "count_letter": "cot", "spell": "direct",
    "game24": "cot", "multihop": "cot", "structured": "direct",
}


def evaluate_suite(model: GPT, chat: ChatTemplate, out_dir: str | Path, tasks: dict[str, str],
                   mode: str, split: str = "test", n: int | None = None, shots: int | None = None,
                   batch_size: int = 128, log=print, compile: bool = False) -> dict:
    """Evaluate several tasks; per-example JSONL + a results.json (merged with earlier results) in out_dir.
    results.json holds one measurement per task, which the report card reads: a task measured there on
    another split, mode, style or number of shots is refused (it was replaced, and the card went on calling
    the figure a test-split one). Each entry names its answers' file within out_dir, so a run moved or
    copied, or evaluated from another working directory, still reads its own."""
    from dataclasses import asdict

    from ..data.tasks import get_task

    out_dir = Path(out_dir)
    summary_path = out_dir / "results.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    shots = (3 if mode == "fewshot" else 0) if shots is None else shots
    styles = {name: style if style in get_task(name).styles else "direct" for name, style in tasks.items()}
    for name, style in styles.items():
        asked = {"split": split, "mode": mode, "style": style, "shots": shots}
        earlier = summary.get(name)
        held = {key: earlier.get(key) for key in asked} if isinstance(earlier, dict) else asked
        if held != asked:
            raise PocketError(f"{summary_path} holds {name} measured with {held}, where this evaluation asks for "
                              f"{asked}: the report card reads one measurement per task; give another --out")
    for name, style in styles.items():
        rows = f"{name}_{split}.jsonl"
        result = evaluate_task(model, chat, get_task(name), split, n, shots, mode, style, batch_size,
                               out_path=out_dir / rows, compile=compile)
        log(result.line())
        summary[name] = {**asdict(result), "rows": rows}
    summary["measured"] = provenance(next(model.parameters()).device)  # where and when this (last) run measured
    atomic_write_text(summary_path, json.dumps(summary, indent=2) + "\n")
    return summary


@torch.no_grad()
def diversity(model: GPT, chat: ChatTemplate, mode: str, n_prompts: int = 16, samples: int = 4,
              max_tokens: int = 48, seed: int = 0) -> dict:
    """How varied a model's samples are ("invent more names like these", temperature 1):
    mean per-token entropy of its next-token distributions, and distinct names over all names."""
    from ..data.tasks import get_task
    from ..data.tasks.names import distinct_ratio
    from ..train.rl_math import entropy_from_logits

    task = get_task("names")
    examples = task.examples("test")[:n_prompts]
    if mode == "fewshot":
        prompts = [chat.document(fewshot_text(task, e, 2)) for e in examples]
        stops, stop_strings = chat.document_stops, ("\n\n", "\nQ:")
    else:
        prompts = [chat.prompt([{"role": "user", "content": e.question}]) for e in examples]
        stops, stop_strings = chat.stop_ids, ()
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0, n=samples, seed=seed,
                            stop_tokens=stops, stop_strings=stop_strings)
    prompts = fit_to_context(model, prompts, params)
    outs = Engine(model, chat.tokenizer).generate(prompts, params)
    entropies = []
    for c in outs:
        if not c.tokens:
            continue
        ids = torch.tensor([prompts[c.prompt_index] + c.tokens], device=model.lm_head.weight.device)
        logits = model(ids)[0, len(prompts[c.prompt_index]) - 1:-1].float()
        entropies.append(entropy_from_logits(logits).mean().item())
    return {"entropy": sum(entropies) / max(1, len(entropies)),
            "distinct_names": distinct_ratio([c.text for c in outs]),
            "names_per_answer": sum(len(c.text.split(",")) for c in outs) / len(outs)}


def copy_probes(n: int = 60, seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """(prompt, expected continuation) pairs that only copying answers:
    - "expression" and "result", from calculator drills (mathtext.py) with random operands: type the
      line's sum ("98 + 13: type" -> "98+13"), copy the calculator's answer ("... shows 111, so 98 + 13
      =" -> "111"): the format pretraining drills, so a small model may learn it by position;
    - "list": a list of invented words, then the list again, cut off ("List: kalo, vesin, tefis\nAgain:
      kalo, vesin," -> "tefis"): a format no training set holds, which only a model that looks a word up in
      its context and copies what followed (an induction head, Olsson et al. 2022) continues. Answering
      from retrieved passages rests on that."""
    from ..data.mathtext import calculator_drill
    from ..data.world import make_names

    rng = random.Random(f"copy-probe:{seed}")
    list_rng = random.Random(f"copy-probe-list:{seed}")  # its own draws: the calculator probes stay as they were
    probes: dict[str, list[tuple[str, str]]] = {"expression": [], "result": [], "list": []}
    for _ in range(n):
        *earlier, line = calculator_drill(rng, lines=3).splitlines()
        context = "\n".join(earlier) + "\n"
        question, rest = line.split(": type ")
        typed, shown = rest.split(", the calculator shows ")
        result = shown.split(",")[0]
        probes["expression"].append((f"{context}{question}: type", typed))
        probes["result"].append((f"{context}{question}: type {typed}, the calculator shows {result}, so {question} =",
                                 result))
        words = [w.lower() for w in make_names(list_rng, list_rng.randint(6, 12))]
        k = list_rng.randint(2, len(words) - 1)
        probes["list"].append((f"List: {', '.join(words)}\nAgain: {', '.join(words[:k])},", words[k]))
    return probes


@torch.no_grad()
def copying(model: GPT, chat: ChatTemplate, n: int = 60, seed: int = 0) -> dict:
    """In-context copying, the skill tool use and retrieval rest on: the share of each kind of copy_probes
    answered exactly. Memorising cannot help (random operands and words); a model that fails here gets
    arithmetic wrong even with a calculator, because it cannot carry the question's numbers into the call,
    and cannot answer from passages it is shown."""
    engine = Engine(model, chat.tokenizer)
    params = SamplingParams(max_tokens=8, temperature=0, stop_strings=(",", "."), stop_tokens=chat.document_stops)
    out = {}
    for name, pairs in copy_probes(n, seed).items():
        prompts = fit_to_context(model, [chat.document(p) for p, _ in pairs], params)
        completions = engine.generate(prompts, params)
        out[name] = sum(c.text.strip() == want for c, (_, want) in zip(completions, pairs)) / len(pairs)
    return out
