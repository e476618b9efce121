"""The `pocketgpt` command: one subcommand per stage, each a thin layer over the library."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import config as configlib
from .argtypes import folder_name, integer, non_negative
from .common import PocketError, human, shutdown_distributed
from .errors import Interrupted
from .reason.lm import CONCURRENCY
from .stages import OTHER_FOLDERS, STAGES, named_stages

console = Console()

EPILOG = """\
Typical run (each step writes into the run directory):
  pocketgpt speedrun                        # everything, on the built-in data, into runs/speedrun
  pocketgpt tokenizer train runs/me         # or stage by stage
  pocketgpt pretrain runs/me
  torchrun --nproc_per_node 8 -m pocketgpt.cli pretrain runs/me --preset d20   # on a GPU node
  pocketgpt sample runs/me --prompt "The "
  pocketgpt info runs/me

Configuration: --config FILE.toml with the tables `pocketgpt config` prints ([world], [tokenizer], [pretrain],
[sft], [sft_ablation], [rm], [ppo], [grpo], [eval]), and --set key=value overrides, e.g.
--set pretrain.train.lr=1e-3 --set pretrain.model.n_layer=4.
"""


def add_config_args(p: argparse.ArgumentParser, trains: bool = True) -> None:
    """--config, --set, --threads; and, for a command that trains a stage (`trains`), --keep-checkpoints."""
    p.add_argument("--config", help="TOML file of configuration tables ([pretrain], [sft], ...: `pocketgpt config` "
                                    "prints them all with their defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. pretrain.train.steps=200 (repeatable)")
    p.add_argument("--threads", type=integer(1), help="CPU threads (fewer can be faster when the machine is busy)")
    if trains:
        p.add_argument("--keep-checkpoints", action="store_true",
                       help="keep a stage's training state (optimizer included) when it finishes, to train it further "
                            "later; by default only its final model stays")


def load_run_config(args, starts_run: bool = False) -> "RunConfig":  # noqa: F821
    """The configuration a stage command runs with: defaults, --quick, --config, --set, and the run's world.
    The world is recorded in a run directory that exists, or that this command starts (`starts_run`): a
    stage refused for a run that is not there leaves nothing behind."""
    from .speedrun import RunConfig, quick, settle_world

    cfg = RunConfig()
    if getattr(args, "quick", False):
        quick(cfg)
    configlib.load(cfg, args.config, args.overrides)
    run = getattr(args, "run", None) or getattr(args, "out", None)
    if run:
        settle_world(cfg, Path(run), record=starts_run or Path(run).is_dir())
    for stage in (cfg.pretrain, cfg.sft, cfg.rm, cfg.ppo, cfg.grpo):
        if args.threads:
            stage.train.threads = args.threads
        if getattr(args, "keep_checkpoints", False):
            stage.train.keep_checkpoints = True
    return cfg


# ----------------------------------------------------------------------------- commands


def cmd_speedrun(args) -> None:
    from .speedrun import speedrun

    if args.run and args.out and args.run != args.out:
        raise PocketError(f"two run directories given: {args.run} and --out {args.out}")
    speedrun(load_run_config(args, starts_run=True), args.run or args.out or "runs/speedrun")


def cmd_tokenizer_train(args) -> None:
    from dataclasses import replace

    from .data.world import read_run_world, record_run_world
    from .speedrun import run_tokenizer

    refuse_to_retokenize(Path(args.run))
    cfg = load_run_config(args)  # a new run's world is recorded with its tokenizer: a failed start leaves nothing
    if args.vocab_size is not None:
        cfg.tokenizer = replace(cfg.tokenizer, vocab_size=args.vocab_size)  # checked as a --set would be
    report = run_tokenizer(cfg, Path(args.run))
    if read_run_world(Path(args.run)) is None:
        record_run_world(Path(args.run), cfg.world)
    console.print(f"tokenizer: vocab {report['vocab_size']}, {human(report['train_chars'])} chars in "
                  f"{report['train_seconds']:.1f}s -> {Path(args.run) / 'tokenizer' / 'tokenizer.json'}")
    for name, bpt in report["bytes_per_token"].items():
        console.print(f"  {name:>10}: {bpt:.2f} bytes/token")


def refuse_to_retokenize(run: Path) -> None:
    """A run's models read the token ids of the tokenizer they were trained with: a new one in their run
    would have every later stage (and every resume) read other ids."""
    from .checkpoint import imported_source
    from .stages import STAGES

    if source := imported_source(run / "base"):
        raise PocketError(f"{run}/base was imported (from {source}) with its own tokenizer, which every stage "
                          f"of {run} uses: train a tokenizer in a new run directory")
    trained = [s.name for s in STAGES if (run / s.name).exists()]
    if trained and (run / "tokenizer" / "tokenizer.json").exists():
        raise PocketError(f"{run}/tokenizer is the tokenizer of {run}'s {', '.join(trained)}, which would read other "
                          f"token ids after a new one: train it in a new run directory")


def cmd_tokenizer_encode(args) -> None:
    from .checkpoint import resolve_model_dir
    from .tokenizer import Tokenizer

    run = Path(args.run)  # a run's own tokenizer/, else the tokenizer of its model (an imported run)
    tok = Tokenizer.load(run / "tokenizer" if (run / "tokenizer").exists() else resolve_model_dir(run))
    ids = tok.encode(args.text)
    console.print(ids)
    console.print(" | ".join(repr(tok.decode([i])) for i in ids))


def cmd_pretrain(args) -> None:
    from .train.pretrain import pretrain

    cfg = load_run_config(args)
    if args.preset:
        cfg.pretrain.preset = args.preset
    if args.steps:
        cfg.pretrain.train.steps = args.steps
    if args.device:
        cfg.pretrain.train.device = args.device
    summary = pretrain(cfg.pretrain, args.run, resume=args.resume)
    if summary.get("stage") and _is_main():
        table = Table(title="pretrain summary", show_header=False)
        rows = [("parameters", human(summary["params"])), ("steps", str(summary["steps"])),
                ("tokens", human(summary["tokens"])), ("time", f"{summary['time_s']:.0f}s"),
                ("tokens/s", human(summary["tokens_per_s"])),
                ("train loss", f"{summary.get('loss', float('nan')):.4f}"),
                ("val loss", f"{summary.get('val_loss', float('nan')):.4f}"),
                ("val bits/byte", f"{summary.get('val_bpb', float('nan')):.4f}"),
                ("written to", summary["output"])]
        for k, v in rows:
            table.add_row(k, v)
        console.print(table)
        mix = Table(title="realised mixture")
        for col in ("source", "weight", "share of rows", "tokens", "epochs"):
            mix.add_column(col)
        for name, m in summary["realised_mixture"].items():
            mix.add_row(name, f"{m['weight']:.2f}", f"{m['share']:.2f}", human(m["tokens"]), f"{m['epochs']:.2f}")
        console.print(mix)


def cmd_sft(args) -> None:
    from .train.sft import sft

    cfg = load_run_config(args)
    if args.steps:
        cfg.sft.train.steps = args.steps
    if args.no_mitigation:
        cfg.sft.mitigate_hallucination = False
    if args.data:
        cfg.sft.data = list(cfg.sft.data) + args.data
    sft(cfg.sft, args.run, args.name, resume=args.resume)


def cmd_rl_stage(args) -> None:
    """rm, ppo and grpo: each reads its table of the run config and writes RUN/<stage>/."""
    from .train.grpo import grpo
    from .train.ppo import ppo
    from .train.reward import reward_model

    cfg = load_run_config(args)
    stage_cfg = getattr(cfg, args.command)
    if args.steps:
        stage_cfg.train.steps = args.steps
    run = {"rm": reward_model, "ppo": ppo, "grpo": grpo}[args.command]
    run(stage_cfg, args.run, resume=args.resume)


def cmd_arena(args) -> None:
    """`arena`: battles between checkpoints (or the votes people cast on the chat page), rated."""
    from .common import atomic_write_json, atomic_write_text, provenance, set_threads
    from .evaluate.arena import VoteStore, leaderboard, unsettled

    set_threads(args.threads)
    if args.votes:
        if args.models:
            raise PocketError("give checkpoints to battle, or --votes DB to rate people's votes; not both")
        if not Path(args.votes).is_file():  # VoteStore would create it
            what = "is a directory, not a votes database" if Path(args.votes).is_dir() else "does not exist"
            raise PocketError(f"{args.votes} {what} (pocketgpt serve --arena-db FILE collects votes)")
        playing = [flag for flag, value in (("--n", args.n), ("--tasks", args.tasks), ("--judge", args.judge),
                                            ("--judge-model", args.judge_model), ("--api-key", args.api_key))
                   if value is not None]
        if playing:  # they were ignored without a word
            raise PocketError(f"{', '.join(playing)} set up battles to play; --votes rates the votes people cast")
        battles = VoteStore(args.votes).battles()
        if not battles:
            raise PocketError(f"{args.votes} holds no votes yet")
        rows, note = leaderboard(battles, args.rounds, args.seed), unsettled(battles)
        _print_leaderboard(rows, f"arena: {len(battles)} votes in {args.votes}", note)
        if args.out:
            from .evaluate.report import plot_leaderboard

            # the battles' leaderboard's keys: the report card reads this file as it reads theirs (RUN/arena)
            atomic_write_json(Path(args.out) / "leaderboard.json", {
                "battles": len(battles), "judge": "people", "rows": rows, "unsettled": note, "measured": provenance()})
            plot_leaderboard(rows, Path(args.out) / "leaderboard.png")
            console.print(f"written to {args.out}")
        return
    if len(args.models) < 2:
        raise PocketError("an arena needs at least two checkpoints (or --votes DB)")
    from .checkpoint import resolve_model_dir
    from .evaluate.battles import ARENA_TASKS, Contestant, play
    from .evaluate.harness import model_mode
    from .reason import LM

    dirs = [resolve_model_dir(path).resolve() for path in args.models]
    if len(set(dirs)) < len(dirs):  # found only after every answer was generated
        raise PocketError("the same checkpoint is given twice: an arena rates different models")
    names = [d.name for d in dirs]
    if len({d.parent for d in dirs}) > 1:  # stages of different runs: named by run too
        names = [f"{d.parent.name}/{d.name}" for d in dirs]
    if len(set(names)) < len(names):  # runs of the same name in different folders: their whole paths
        names = [str(d) for d in dirs]
    contestants = []
    for name, d in zip(names, dirs):
        lm = LM.load(d, args.device)
        contestants.append(Contestant(name, lm, model_mode(lm.config)))
    judge = LM.openai(args.judge, args.api_key or "none", args.judge_model) if args.judge else None
    tasks = tuple(t.strip() for t in args.tasks.split(",")) if args.tasks else ARENA_TASKS
    n = args.n or 30
    console.print(f"arena: {', '.join(c.name for c in contestants)} on {len(tasks)} tasks x {n} prompts, "
                  f"judged by {'the ' + args.judge if judge else 'the verifiers and the rubric'}")
    battles, records = play(contestants, tasks, n, args.seed, judge)
    rows, note = leaderboard(battles, args.rounds, args.seed), unsettled(battles)
    out = Path(args.out) if args.out else dirs[0].parent / "arena"  # the first contestant's run
    atomic_write_text(out / "battles.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    atomic_write_json(out / "leaderboard.json", {"battles": len(battles), "judge": args.judge or "rubric",
                                                 "rows": rows, "unsettled": note, "measured": provenance()})
    from .evaluate.report import plot_leaderboard, write_report

    plot_leaderboard(rows, out / "leaderboard.png")
    _print_leaderboard(rows, f"arena: {len(battles)} battles -> {out}", note)
    if (out.parent / "base").is_dir():
        console.print(f"report card: {write_report(out.parent)}")


def _print_leaderboard(rows: list[dict], title: str, note: str | None) -> None:
    table = Table(title=title)
    for col in ("rank", "model", "rating (95% CI)", "style-controlled", "online Elo", "battles", "win rate"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["rank"]), r["model"], f"{r['rating']:.0f} ({r['ci_low']:.0f}-{r['ci_high']:.0f})",
                      f"{r['style_controlled']:.0f}", f"{r['elo']:.0f}", str(r["battles"]), f"{r['win_rate']:.1%}")
    console.print(table)
    if note:
        console.print(f"[yellow]{note}[/]")


def cmd_rag(args) -> None:
    """`rag index` / `rag ask`: retrieval over a folder of documents (rag/)."""
    from .rag.index import build_index, load_index, read_folder

    if args.rag_command == "index":
        if args.world and args.folder:  # the folder was ignored
            raise PocketError("give a folder of documents or --world, not both")
        if args.world:
            from .data.tasks import default_world

            docs = {p["id"]: p["text"] for p in default_world().passages()}  # as the matrix's index (rag/world.py)
        elif args.folder:
            folder, out = Path(args.folder).resolve(), Path(args.out).resolve()
            if out == folder or folder in out.parents:  # the index would replace the documents, or join them
                raise PocketError(f"--out {args.out} lies inside the documents' folder {args.folder}: put the index elsewhere")
            docs = read_folder(args.folder)
        else:
            raise PocketError("give a folder of documents, or --world for the built-in world's encyclopedia")
        if not docs:
            raise PocketError(f"{args.folder} holds no .txt, .md, .rst (or, with pypdf, .pdf) documents")
        start = time.perf_counter()
        index, stats = build_index(docs, args.out, args.chunk_size, args.overlap)
        if stats.get("damaged"):
            console.print(f"[yellow]rebuilt from scratch: {stats['damaged']}[/yellow]")
        what = (f"embedded {stats['embedded']} documents, reused {stats['reused']}" if stats["changed"]
                else "nothing changed: no work done")
        console.print(f"index {args.out}: {stats['documents']} documents, {len(index.chunks)} chunks; {what} "
                      f"({time.perf_counter() - start:.1f}s)")
        return
    from .checkpoint import resolve_model_dir
    from .rag.answer import ask
    from .reason import LM

    index = load_index(args.index)
    lm = LM.openai(args.server, args.api_key or "none", args.server_model) if args.server else \
        LM.load(resolve_model_dir(args.model), args.device)
    answer = ask(lm, index, args.question, args.k, args.retriever, quote=args.quote)
    for h in answer.hits:
        console.print(f"[{h.chunk.id}] {h.chunk.text[:160]}", style="dim", markup=False, highlight=False)
    console.print(answer.text, markup=False)
    console.print(f"cites: {', '.join(answer.cited)}" if answer.cited else "cites no passage")


def cmd_report(args) -> None:
    from .evaluate.report import publish_report, write_report

    path = publish_report(args.run, args.publish) if args.publish else write_report(args.run)
    console.print(path.read_text(), markup=False, highlight=False)
    console.print(f"written to {path}")


def cmd_sample(args) -> None:
    import torch

    from .checkpoint import load_model
    from .common import pick_device, set_threads, warn_if_bf16_is_slow
    from .engine import Engine, SamplingParams

    set_threads(args.threads)
    model, chat, _ = load_model(args.model, pick_device(args.device), blocks=True, policy=True)
    if args.bf16:
        warn_if_bf16_is_slow(model.lm_head.weight.device)
        model = model.to(torch.bfloat16)
    engine = Engine(model, chat.tokenizer)
    if args.chat:
        if not args.prompt.strip():
            raise PocketError("--chat needs the user's message: --prompt is empty")
        prompt, stops = chat.prompt([{"role": "user", "content": args.prompt}]), chat.stop_ids
    else:
        prompt, stops = chat.document(args.prompt), chat.document_stops
    room = model.cfg.max_seq_len - len(prompt)  # a prompt that leaves none is the engine's to refuse
    if args.max_tokens is not None and 0 < room < args.max_tokens:
        raise PocketError(f"--max-tokens {args.max_tokens} does not fit: the prompt takes {len(prompt)} of the "
                          f"model's {model.cfg.max_seq_len} tokens of context, which leaves {room}")
    max_tokens = args.max_tokens if args.max_tokens is not None else min(128, room)
    params = SamplingParams(max_tokens=max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, n=args.n, seed=args.seed, stop_tokens=stops)
    engine.check(prompt, params)  # before the prompt is echoed: an error is then the only output
    if args.chat:
        _sample_chat(engine, chat, prompt, params)
    elif args.n == 1:
        sys.stdout.write(args.prompt)
        for piece in engine.stream(prompt, params):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        for i, c in enumerate(engine.generate([prompt], params)):
            console.rule(f"sample {i + 1}")
            console.print(args.prompt + c.text, markup=False)


def _sample_chat(engine, chat, prompt: list[int], params) -> None:
    """An assistant's replies, its tool calls answered as in evaluation and RL (toolloop.py: the
    calculator, and search over the built-in world); each call is shown before the answer."""
    from .data.tasks import default_world
    from .data.tasks.tools import task_tools
    from .toolloop import describe_call, generate_with_tools

    for i, t in enumerate(generate_with_tools(engine, chat, [prompt], params, task_tools(default_world()))):
        if params.n > 1:
            console.rule(f"sample {i + 1}")
        for call in t.calls:
            console.print(describe_call(call), style="dim", markup=False, highlight=False)
        console.print(t.text, markup=False, highlight=False)
        if t.finish_reason != "stop":
            console.print(f"(ended by {t.finish_reason})", style="dim", highlight=False)


FACT_TIERS = "factqa_head,factqa_tail,factqa_unseen"  # what `eval` scores without --task


# The strategies that read each of eval's strategy flags (a matrix's cells read them all): any other strategy
# given one is refused, as it was ignored.
STRATEGY_FLAGS = {
    "k": ("self_consistency", "react"), "temperature": ("self_consistency", "reflection", "tot", "react"),
    "think": ("cot", "self_consistency"), "beam": ("tot",), "search": ("tot",), "oracle": ("tot",),
    "proposals": ("tot",), "move_arithmetic": ("cot", "self_consistency", "tot"), "rounds": ("reflection",),
    "max_steps": ("react",), "tools": ("react",), "paths": ("react",), "quote": ("rag",),
}


def strategy_settings(args):
    """The strategies' Settings from eval's flags, refusing a flag the chosen strategy does not read."""
    from .reason.strategies import Settings

    given = {name: getattr(args, name) for name in STRATEGY_FLAGS if getattr(args, name) not in (None, False)}
    unread = [name for name in given if not args.matrix and args.strategy not in STRATEGY_FLAGS[name]]
    if unread:
        flags = ", ".join("--" + name.replace("_", "-") for name in unread)
        raise PocketError(f"{flags}: not read by the {args.strategy} strategy (it would be ignored)")
    if "tools" in given:
        given["tools"] = tuple(dict.fromkeys(t.strip() for t in given["tools"].split(",") if t.strip()))  # each once
    settings = Settings(shots=args.shots or 0, **given)
    if args.strategy == "react" and not settings.tools:
        raise PocketError("--tools: ReAct needs at least one tool (calculator, search, python)")
    return settings


def cmd_eval_strategy(args) -> None:
    """`eval --strategy` / `eval --matrix`: reasoning strategies through the LM protocol, on a local run or
    a server."""
    from dataclasses import asdict

    from .common import atomic_write_text, provenance, set_threads
    from .data.tasks import TASKS, get_task
    from .reason import LM
    from .reason.matrix import run_matrix
    from .reason.strategies import check_suited, evaluate_strategy

    set_threads(args.threads)
    if args.matrix:  # before a compile of a minute or a server's first request
        from .reason.matrix import MATRIX

        wanted = [w.strip().lower() for w in (args.cells or "").split(",") if w.strip()]
        cells = [c for c in MATRIX if not wanted or any(w in f"{c.task}: {c.label}".lower() for w in wanted)]
        if not cells:
            raise PocketError(f"no matrix cell matches --cells {args.cells!r}")
    settings = strategy_settings(args)
    if not args.matrix:  # every task checked before the first one runs (or a model is loaded); "all": those it suits
        def suited(name: str) -> bool:
            task = get_task(name)
            try:
                check_suited(args.strategy, task, task.examples(args.split)[:args.n or None])
            except PocketError:
                if args.task != "all":
                    raise
                return False
            return True

        asked = list(TASKS) if args.task == "all" else [t.strip() for t in (args.task or FACT_TIERS).split(",") if t.strip()]
        names = [name for name in asked if suited(name)]
    model_dir = None
    if args.server:
        lm = LM.openai(args.server, args.api_key or "none", args.server_model, args.concurrency or CONCURRENCY)
    else:
        from .checkpoint import resolve_model_dir

        model_dir = resolve_model_dir(args.model)
        compile = args.matrix if args.compile is None else args.compile
        lm = LM.load(model_dir, args.device, compile=compile)
        if compile:
            console.print(f"decode step compiled in {lm.engine.warmup():.0f}s")
    if args.matrix:
        if args.out:
            out_dir = Path(args.out)
        elif model_dir is not None:
            out_dir = model_dir / "matrix"  # in the stage's directory, beside eval/: the report card shows it
        else:
            raise PocketError("--matrix against a server needs --out DIR")
        console.print(f"strategy matrix of {lm.name} on {args.split} -> {out_dir}")
        start = time.perf_counter()
        run_matrix(lm, out_dir, settings, args.n, cells, split=args.split)
        console.print(f"matrix done in {(time.perf_counter() - start) / 60:.1f} min; {lm.usage.calls} model calls, "
                      f"{lm.usage.prompt_tokens + lm.usage.completion_tokens} tokens; cells in {out_dir}")
        run = out_dir.parent.parent
        if (run / "base").is_dir():
            from .evaluate.report import write_report

            console.print(f"report card: {write_report(run)}")
        return
    out_dir = Path(args.out) if args.out else model_dir / "eval" if model_dir else None
    if out_dir is None:
        console.print("[yellow]the answers are not written: give --out DIR to keep them[/]")
    console.print(f"evaluating {lm.name} with {args.strategy} on {args.split}")
    for name in names:
        result, rows = evaluate_strategy(lm, get_task(name), args.strategy, args.split, args.n, settings)
        console.print(result.line(), highlight=False)
        if out_dir:
            atomic_write_text(out_dir / f"{name}_{args.split}_{args.strategy}.jsonl",
                              "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))
            # what was measured, so that a later run with other settings (which replaces it) is told apart
            atomic_write_text(out_dir / f"{name}_{args.split}_{args.strategy}.json", json.dumps(
                {**result.to_dict(), "model": lm.name, "settings": asdict(settings), "measured": provenance()},
                indent=2) + "\n")


def bpb_source(name: str, meta: dict, max_bytes: int = 500_000):
    """The source `eval --bpb NAME` reads: the one the model was pretrained on under that name (a run's
    world has its own seed and size), else the built-in source of that kind; at most `max_bytes` of it."""
    from .data.sources import FILE_KINDS, SourceSpec

    spec = dict(meta.get("sources", {}).get(name) or {"kind": name})
    spec["max_bytes"] = min(spec.get("max_bytes") or max_bytes, max_bytes)
    source = SourceSpec.from_dict(name, spec)
    if source.kind in FILE_KINDS and not source.path:
        raise PocketError(f"--bpb {name}: a {source.kind} source reads files; name a source the model was "
                          f"pretrained on, or a built-in one (world, docs, code, ...)")
    return source


def suite_tasks(names: str, style: str | None) -> dict[str, str]:
    """`eval --task A,B --style S`: each task and the rendering it is scored in (its trained one by default).
    An unknown task or a style it lacks fails here, not after the tasks before it have run; with "all", the
    tasks without the style answer directly."""
    from .data.tasks import TASKS, get_task
    from .evaluate.harness import SUITE

    chosen = list(TASKS) if names == "all" else [t.strip() for t in names.split(",") if t.strip()]
    styles = {name: get_task(name).styles for name in chosen}
    lacking = [name for name in chosen if style and style not in styles[name]]
    if lacking and (names != "all" or len(lacking) == len(chosen)):
        raise PocketError(f"task {lacking[0]!r} has no style {style!r}; its styles: {', '.join(styles[lacking[0]])}")
    return {name: style or SUITE.get(name, "direct") for name in chosen}


def cmd_eval(args) -> None:
    import torch

    remote = [flag for flag, given in (("--server-model", args.server_model), ("--api-key", args.api_key),
                                       ("--concurrency", args.concurrency)) if given is not None]
    if remote and not args.server:
        raise PocketError(f"{', '.join(remote)}: settings of --server, which is not given")
    if args.strategy or args.server or args.matrix:
        # Settings of the plain evaluation, which the LM protocol's strategies do not read: refused, not ignored.
        plain = [flag for flag, given in (("--bpb", args.bpb), ("--style", args.style), ("--mode", args.mode != "auto"),
                                          ("--batch-size", args.batch_size != 128), ("--bf16", args.bf16)) if given]
        if plain:
            raise PocketError(f"{', '.join(plain)}: settings of the plain evaluation; --strategy, --matrix and "
                              "--server ask through the LM protocol, which does not read them")
        if args.matrix and args.task:
            raise PocketError("--matrix evaluates its cells, not --task: choose them with --cells")
        args.strategy = args.strategy or "direct"
        return cmd_eval_strategy(args)
    if not args.model:
        raise PocketError("give a run or model directory (or --server URL)")

    from .checkpoint import load_model, resolve_model_dir
    from .common import atomic_write_json, pick_device, set_threads, warn_if_bf16_is_slow
    from .data.sources import read_documents
    from .evaluate.harness import bits_per_byte, evaluate_suite, model_mode

    set_threads(args.threads)
    model_dir = resolve_model_dir(args.model)
    model, chat, cfg = load_model(model_dir, pick_device(args.device), blocks=True, policy=True)
    if args.bf16:
        warn_if_bf16_is_slow(model.lm_head.weight.device)
        model = model.to(torch.bfloat16)
    mode = model_mode(cfg) if args.mode == "auto" else args.mode
    # checked before the tasks run, so that a misspelt source fails in a second, not after the evaluation
    bpb_names = [name.strip() for name in (args.bpb or "").split(",") if name.strip()]
    bpb_sources = [bpb_source(name, cfg.get("meta", {})) for name in bpb_names]
    tasks = suite_tasks(args.task or FACT_TIERS, args.style)
    out_dir = Path(args.out) if args.out else model_dir / "eval"
    if out_dir.exists() and not out_dir.is_dir():
        raise PocketError(f"--out {out_dir} is a file; give a directory for the verdicts and results.json")
    console.print(f"evaluating {model_dir} ({mode}) on {args.split}")
    evaluate_suite(model, chat, out_dir, tasks, mode, args.split, args.n, args.shots, args.batch_size,
                   log=lambda line: console.print(line, highlight=False, soft_wrap=True), compile=bool(args.compile))
    if bpb_sources:
        summary = json.loads((out_dir / "results.json").read_text())
        for spec in bpb_sources:
            bpb = bits_per_byte(model, chat, read_documents(spec))
            console.print(f"{spec.name:>18} bits/byte {bpb:.4f}", highlight=False)
            summary[f"bpb/{spec.name}"] = bpb
        atomic_write_json(out_dir / "results.json", summary)
    console.print(f"per-example verdicts and results.json in {out_dir}")


def cmd_tasks(args) -> None:
    from .data.tasks import TASKS, export_jsonl, get_task

    if args.tasks_command == "list":
        table = Table(title="tasks")
        for col in ("task", "renderings", "train", "validation", "test"):
            table.add_column(col)
        for name in TASKS:
            task = get_task(name)
            table.add_row(name, ", ".join(task.styles), *(str(len(task.examples(s))) for s in
                                                          ("train", "validation", "test")))
        console.print(table)
        return
    count = export_jsonl(get_task(args.name), args.split, args.style, args.out)
    console.print(f"{count} conversations ({args.name}, {args.split}, {args.style}) -> {args.out}")


def _model_line(directory: Path) -> str:
    """What `info` says of one model directory: its shape, parameters, and how it was made."""
    from .checkpoint import read_config, stored_params

    cfg = read_config(directory)
    m, s = cfg["model"], cfg.get("meta", {}).get("summary", {})
    # Counted from the weights: RL stages' summaries do not record it, and a reward model has a score head.
    what = (f"{m['n_layer']} layers, d={m['d_model']}, {human(stored_params(directory))} params"
            + (", smeared keys" if m.get("smear_keys") else "")
            + (" (with a score head)" if m.get("score_head") else ""))
    if "steps" in s:
        what += f"; {s['steps']} steps, {human(s.get('tokens', 0))} tokens"
    elif "source" in s:
        what += f"; imported from {Path(s['source']).name}" + _blocks_kept(s)
    if "val_loss" in s:
        what += f", val loss {s['val_loss']:.3f} ({s.get('val_bpb', 0):.3f} bpb)"
    return what


def cmd_info(args) -> None:
    from .checkpoint import is_model_dir
    from .common import human_bytes

    run = Path(args.run)
    if not run.exists():
        raise PocketError(f"{run} does not exist")
    if is_model_dir(run):  # one stage of a run, or an imported model
        table = Table(title=f"model {run}")
        for col in ("part", "what"):
            table.add_column(col)
        table.add_row(run.name, _model_line(run))
        table.add_row("disk", human_bytes(sum(p.stat().st_size for p in run.rglob("*") if p.is_file())))
        console.print(table)
        return
    parts = ("tokenizer", "metrics.jsonl", *(s.name for s in STAGES))
    if not any((run / part).exists() for part in parts):
        raise PocketError(f"{run} is neither a run directory nor a model directory (it holds none of "
                          f"{', '.join(parts)}, and no model's config.json)")
    table = Table(title=f"run {run}")
    for col in ("part", "what"):
        table.add_column(col)
    tok_report = run / "tokenizer" / "report.json"
    if tok_report.exists():
        r = json.loads(tok_report.read_text())
        table.add_row("tokenizer", f"vocab {r['vocab_size']}, trained on {human(r['train_chars'])} chars")
    for stage in [*(s.name for s in STAGES), *named_stages(run)]:
        ckpts = sorted((run / stage / "checkpoints").glob("step_*"))
        if (run / stage / "config.json").exists():
            table.add_row(stage, _model_line(run / stage))
        if ckpts:
            size = sum(f.stat().st_size for c in ckpts for f in c.rglob("*") if f.is_file())
            table.add_row(f"{stage} checkpoints", f"{', '.join(c.name for c in ckpts)} ({human_bytes(size)})")
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        n = sum(1 for _ in metrics.open())
        table.add_row("metrics", f"{metrics} ({n} records)")
    size = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
    table.add_row("disk", human_bytes(size))
    console.print(table)


def _blocks_kept(summary: dict) -> str:
    """An import summary's block weights (blocks.py), as a clause: ", its 4-bit (210) and 8-bit (1) weights
    kept as stored for decoding"; empty when none were kept."""
    kept = [f"{bits} ({n})" for bits, n in summary.get("block_weights", {}).items() if n]
    return f", its {' and '.join(kept)} weights kept as stored for decoding" if kept else ""


def cmd_import(args) -> None:
    from .interop.importer import import_model

    summary = import_model(args.src, args.run, args.dtype)
    table = Table(title="imported", show_header=False)
    for k in ("source", "family", "params", "dtype"):
        table.add_row(k, human(summary[k]) if k == "params" else str(summary[k]))
    table.add_row("chat template", summary["chat_template"]["name"])
    if any(summary["block_weights"].values()):
        table.add_row("for decoding", _blocks_kept(summary).removeprefix(", "))
    table.add_row("time", f"{summary['seconds']:.1f}s")
    table.add_row("written to", str(Path(args.run) / "base"))
    console.print(table)


def cmd_export(args) -> None:
    from .interop.export import export_hf, export_tiktoken

    if args.to == "hf":
        out = export_hf(args.run, args.out)
        console.print(f"exported {args.run} -> {out} (transformers: AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    else:
        from .checkpoint import resolve_model_dir
        from .tokenizer import BPETokenizer, Tokenizer

        tok = Tokenizer.load(resolve_model_dir(args.run) / "tokenizer.json")
        if not isinstance(tok, BPETokenizer):
            raise PocketError(f"{args.run}: only pocketgpt's own tokenizer exports to tiktoken's format "
                              "(an imported model's tokenizer.json is already the portable form)")
        out = export_tiktoken(tok, args.out)
        console.print(f"tokenizer -> {out} (+ {out}.json with the pattern and special tokens)")


def cmd_serve(args) -> None:
    import signal
    import threading

    import uvicorn

    from .common import pick_device, set_threads, warn_if_bf16_is_slow
    from .serve.api import create_app, load_workers
    from .serve.protocol import Limits
    from .serve.worker import run_engines

    set_threads(args.threads)
    # The engine's thread and the event loop's take turns on the GIL; by default a waiting thread gets it
    # after 5 ms, longer than a decode step, so each streamed token waited on the hand-over. 0.5 ms:
    # 1.4x the tokens/s of one client here (bench/bench_serve.py).
    sys.setswitchinterval(0.0005)
    if args.bf16 or args.bf16_prefill:
        warn_if_bf16_is_slow(pick_device(args.device))
    workers = load_workers(args.run, pick_device(args.device), args.max_batch, "bfloat16" if args.bf16 else "float32",
                           "bfloat16" if args.bf16_prefill else "float32", compile=args.compile,
                           prefix_cache_mb=args.prefix_cache)
    from .evaluate.arena import VoteStore

    votes = VoteStore(args.arena_db) if args.arena_db else None
    app = create_app(workers, Limits(max_n=args.max_n, max_tokens=args.max_tokens, max_queued=args.max_queued),
                     api_key=args.api_key, votes=votes)
    console.print(f"serving {', '.join(workers)} from {args.run} on http://{args.host}:{args.port} "
                  f"(chat page at /, OpenAI API at /v1)")
    # The engines run in this (the main) thread and the HTTP server beside it: serve/worker.py says why.
    # a few seconds for the replies ended at a stop to reach their clients (uvicorn waits forever by default)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    stop = threading.Event()

    def serve_http():
        try:
            server.run()
        finally:
            stop.set()  # the server ended (a port already in use, say): so does the engine loop

    http = threading.Thread(target=serve_http, name="http", daemon=True)
    http.start()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        run_engines(list(workers.values()), stop)
    except KeyboardInterrupt:
        pass
    finally:
        for w in workers.values():  # in this thread, where the engines step: none is mid-step
            w.end_all()
        server.should_exit = True
        http.join(timeout=10)
    if not server.started:
        raise PocketError(f"the HTTP server did not start on {args.host}:{args.port} (is the port in use?)")


def cmd_chat(args) -> None:
    from .chat_cli import chat_loop

    chat_loop(args)


def cmd_config(args) -> None:
    """Print the default (or loaded) configuration as JSON, to copy into a TOML file."""
    from dataclasses import asdict

    console.print_json(json.dumps(asdict(load_run_config(args))))


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pocketgpt", description="Build a ChatGPT-style assistant end to end.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    from .data.tasks.game24 import MOVE_ARITHMETIC
    from .reason.strategies import STRATEGIES

    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("speedrun", help="run every stage on the built-in data (resumable)",
                       description="tokenizer -> pretrain -> ... -> report, in one run directory. "
                                   "Finished stages are skipped, an interrupted one resumes.")
    # The run directory comes first, as for every other command; --out is the older spelling of it.
    p.add_argument("run", nargs="?", help="run directory (default: runs/speedrun)")
    p.add_argument("--out", help="the run directory, as an option")
    p.add_argument("--quick", action="store_true", help="a smoke-test run: tiny model, a minute or two")
    add_config_args(p)
    p.set_defaults(func=cmd_speedrun)

    p = sub.add_parser("tokenizer", help="train or try the BPE tokenizer")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="learn a BPE vocabulary from the data mixture",
                        description="Trains byte-level BPE (rustbpe) on a sample of the mixture's sources and "
                                    "writes RUN/tokenizer/tokenizer.json.")
    t.add_argument("run", help="run directory")
    t.add_argument("--vocab-size", type=integer(1), help="vocabulary size including special tokens (default 4096)")
    t.add_argument("--quick", action="store_true", help="use the --quick speedrun settings")
    add_config_args(t, trains=False)
    t.set_defaults(func=cmd_tokenizer_train)
    t = tsub.add_parser("encode", help="show how a text is split into tokens")
    t.add_argument("run", help="run directory")
    t.add_argument("text", help="the text to split (special tokens in it stay text, as user text does)")
    t.set_defaults(func=cmd_tokenizer_encode)

    p = sub.add_parser("pretrain", help="pretrain a GPT on the data mixture",
                       description="Next-token prediction on the weighted mixture; writes RUN/base/. "
                                   "Launch with torchrun for several processes (data parallel: each "
                                   "trains on its share of the batch).")
    p.add_argument("run", help="run directory (must hold a trained tokenizer)")
    p.add_argument("--preset", help="model size: tiny, small (CPU speedrun), medium, gpt2, d20, d26")
    p.add_argument("--steps", type=integer(1), help="optimizer steps")
    p.add_argument("--device", help="auto (default), cpu, cuda, mps")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in RUN/base")
    p.add_argument("--quick", action="store_true", help="use the --quick speedrun settings")
    add_config_args(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("sft", help="supervised fine-tuning: turn the base model into an assistant",
                       description="Fine-tunes RUN/base on conversations (loss on assistant tokens only): the "
                                   "task suite's renderings, fact QA with the hallucination mitigation (probe what "
                                   "the base model knows, teach 'I don't know' elsewhere), and --data files.")
    p.add_argument("run", help="run directory holding base/")
    p.add_argument("--name", type=folder_name([s.name for s in STAGES if not s.name.startswith("sft")] + list(OTHER_FOLDERS)),
                   default="sft", help="output stage directory in the run (default: sft)")
    p.add_argument("--data", action="append", default=[], metavar="JSONL",
                   help='extra conversations, one {"messages": [...]} per line (repeatable)')
    p.add_argument("--no-mitigation", action="store_true", help="train true answers even where the model "
                                                                "does not know them (the naive recipe)")
    p.add_argument("--steps", type=integer(1), help="optimizer steps")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--quick", action="store_true", help="use the --quick speedrun settings")
    add_config_args(p)
    p.set_defaults(func=cmd_sft)

    for name, help_text, description in [
        ("rm", "train the reward model from ranked comparisons",
         "Samples K completions per prompt from RUN/sft, ranks them with the written rubric (or reads "
         "your comparisons: [rm] data = [...] in the config), trains the pairwise ranking loss; writes RUN/rm."),
        ("ppo", "RLHF: PPO against the frozen reward model",
         "Policy from RUN/sft, value model from RUN/rm, per-token KL penalty to the SFT reference, GAE, "
         "clipped updates, plus the next-token loss on RUN/data (PPO-ptx, [ppo] ptx_coef); reports held-out "
         "reward, KL, entropy and accuracy before and after; writes RUN/ppo."),
        ("grpo", "RL on verifiable tasks (group-relative advantages)",
         "G answers per problem, reward from the task's verifier, advantages relative to the group; "
         "reports held-out accuracy before and after; writes RUN/grpo."),
    ]:
        p = sub.add_parser(name, help=help_text, description=description)
        p.add_argument("run", help="run directory")
        p.add_argument("--steps", type=integer(1), help="optimizer steps")
        p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
        p.add_argument("--quick", action="store_true", help="use the --quick speedrun settings")
        add_config_args(p)
        p.set_defaults(func=cmd_rl_stage)

    p = sub.add_parser("arena", help="rate checkpoints by pairwise battles (Bradley-Terry, as Chatbot Arena)",
                       description="Every pair of checkpoints answers the same held-out prompts with the sides drawn "
                                   "at random; the tasks' verifiers and the labelers' rubric (or a judge model, asked "
                                   "in both orders) pick the winner. Ratings by Bradley-Terry maximum likelihood "
                                   "with bootstrap 95% intervals, beside online Elo and a length-controlled fit. "
                                   "With --votes DB: the same ratings from the votes cast on the chat page.")
    p.add_argument("models", nargs="*", help="two or more run or stage directories (base few-shot, sft, ppo, grpo, "
                                             "an imported model...)")
    p.add_argument("--votes", metavar="DB", help="rate the votes in this SQLite file (pocketgpt serve --arena-db)")
    p.add_argument("--n", type=integer(1), help="prompts per task (default 30)")
    p.add_argument("--tasks", help="comma-separated tasks (default: the fact tiers, arithmetic, compare_decimals, "
                                   "multihop)")
    p.add_argument("--judge", metavar="URL", help="an OpenAI-compatible server whose model judges instead of the rubric")
    p.add_argument("--judge-model", help="model id on --judge")
    p.add_argument("--api-key", help="API key for --judge")
    p.add_argument("--rounds", type=integer(1), default=100, help="bootstrap rounds (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="where to write battles and the leaderboard (default: RUN/arena of the first "
                                 "contestant's run)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=integer(1))
    p.set_defaults(func=cmd_arena)

    p = sub.add_parser("rag", help="retrieval: index a folder of documents, answer questions from it")
    rsub = p.add_subparsers(dest="rag_command", required=True)
    r = rsub.add_parser("index", help="chunk and embed a folder (.txt, .md, .rst; .pdf with pypdf) into an index",
                        description="Chunks by tokens, BM25 and MiniLM embeddings, written atomically; a second run "
                                    "over unchanged documents does no work, a changed document alone is redone.")
    r.add_argument("folder", nargs="?", help="the documents")
    r.add_argument("--world", action="store_true",
                   help="index the built-in world's encyclopedia instead (its passages of three sentences)")
    r.add_argument("--out", required=True, help="the index directory")
    r.add_argument("--chunk-size", type=integer(1), default=128, help="tokens per chunk (default 128)")
    r.add_argument("--overlap", type=integer(0), default=32, help="tokens shared by neighbouring chunks (default 32)")
    r.set_defaults(func=cmd_rag)
    r = rsub.add_parser("ask", help="answer a question from an index's passages")
    r.add_argument("index")
    r.add_argument("question")
    r.add_argument("--model", help="a run or stage directory")
    r.add_argument("--server", metavar="URL", help="or a model behind an OpenAI-compatible server")
    r.add_argument("--server-model")
    r.add_argument("--api-key")
    r.add_argument("--k", type=integer(1), default=3, help="passages in the prompt (default 3)")
    r.add_argument("--retriever", choices=("bm25", "dense", "hybrid"), default="hybrid")
    r.add_argument("--quote", action="store_true",
                   help="answer with one sentence of the passages, verbatim, citing its chunk (a small model "
                        "that picks the right sentence but cannot copy a rare name still answers right)")
    r.add_argument("--device", default="auto")
    r.set_defaults(func=cmd_rag)

    p = sub.add_parser("report", help="write the report card (report.md + plots) of a run")
    p.add_argument("run")
    p.add_argument("--publish", metavar="DIR",
                   help="also copy the card, the images it shows and the speedrun's timings into DIR (to commit)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("sample", help="generate text from a model",
                       description="Continue a prompt (base models) or answer it (--chat, for assistants).")
    p.add_argument("model", help="a run directory (its most post-trained stage) or a model directory")
    p.add_argument("--prompt", default="The ", help="text to continue, or the user's message with --chat")
    p.add_argument("--chat", action="store_true", help="render the prompt as a user turn of a conversation; "
                                                           "the assistant's tool calls are run (calculator, search)")
    p.add_argument("--n", type=integer(1), default=1, help="number of samples (share one prefill)")
    p.add_argument("--max-tokens", type=integer(1), help="tokens to generate (default: 128, or what the context leaves)")
    p.add_argument("--temperature", type=non_negative, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=integer(0), default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, help="for reproducible samples")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=integer(1))
    p.add_argument("--bf16", action="store_true", help="bf16 weights: half the memory and the bytes each "
                   "decoding step reads")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="score a model on tasks: accuracy with a 95%% confidence interval",
                       description="Greedy answers to a task's questions, checked by its exact verifier. Base "
                                   "models get a few-shot document prompt, assistants the chat format. Writes "
                                   "one JSON line per example (question, output, verdict) and results.json.")
    p.add_argument("model", nargs="?", help="a run directory (its most post-trained stage) or a model directory "
                                           "(not needed with --server)")
    p.add_argument("--task", help="comma-separated task names, or 'all' (default: the three fact tiers)")
    p.add_argument("--split", default="test", help="train, validation or test (default)")
    p.add_argument("--n", type=integer(1), help="only the first N examples")
    p.add_argument("--shots", type=integer(0), help="solved examples shown before each question "
                                             "(default: 3 few-shot, 0 chat)")
    p.add_argument("--mode", default="auto", choices=("auto", "fewshot", "chat"),
                   help="auto: few-shot for base checkpoints, chat for post-trained ones")
    p.add_argument("--style", help="the rendering of the shots: direct, cot (step by step), tool, sentence, check, "
                                   "or a task's own (factqa: rag; game24: propose, value); default: the one each "
                                   "task is trained in")
    p.add_argument("--batch-size", type=integer(1), default=128, help="questions decoded together")
    p.add_argument("--strategy", choices=tuple(STRATEGIES),
                   help="ask through the LM protocol with a reasoning strategy (reports model calls and tokens; "
                        "see reason/strategies.py)")
    p.add_argument("--matrix", action="store_true",
                   help="the strategy matrix: task x strategy with intervals and cost, into STAGE/matrix (or --out) "
                        "and the report card")
    p.add_argument("--cells", help="--matrix: only the cells whose 'task: strategy' contains one of these "
                                   "comma-separated words (e.g. 'arithmetic,game24: IO')")
    p.add_argument("--k", type=integer(1), help="self_consistency: samples per question; react: its fallback's (default 5)")
    p.add_argument("--temperature", type=non_negative,
                   help="self_consistency, reflection, tot, react: temperature of sampled answers and votes (default 0.7)")
    p.add_argument("--think", action="store_true", help="cot: add 'Let's think step by step.' to the question")
    p.add_argument("--beam", type=integer(1), help="tot: positions kept after each move (default 5)")
    p.add_argument("--search", choices=("bfs", "dfs"), help="tot: breadth- (default) or depth-first")
    p.add_argument("--oracle", action="store_true", help="tot: the exact solver judges positions (an ablation)")
    p.add_argument("--proposals", type=integer(1), help="tot: proposals per position, sampled at --temperature "
                                                            "and their moves merged (default 1: one greedy proposal)")
    p.add_argument("--move-arithmetic", choices=MOVE_ARITHMETIC,
                   help="Game of 24 (tot, cot, self_consistency): the result of a move 'a op b = c': the "
                        "calculator writes it (default; the model picks the numbers and the operation), "
                        "'checked' drops a false claim (tot), 'claimed' takes it as written (cot: the chain in "
                        "one go)")
    p.add_argument("--rounds", type=integer(0), help="reflection: retries after a self-check says no (default 2)")
    p.add_argument("--max-steps", type=integer(1), help="react: tool calls before falling back to a vote (default 4)")
    p.add_argument("--tools", help="react: tools, of calculator, search, python (default calculator,search)")
    p.add_argument("--paths", type=integer(1), help="react: sampled trajectories per question, their answers "
                                                        "voted on (default 1: one greedy trajectory)")
    p.add_argument("--quote", action="store_true", help="rag: answer with one of the passages' sentences, verbatim")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the decode step first (default: on with --matrix, whose thousands of batched steps "
                        "repay a compile of about a minute; off for a task or --strategy)")
    p.add_argument("--server", metavar="URL", help="evaluate a model behind an OpenAI-compatible server "
                                                   "(e.g. http://127.0.0.1:8000/v1) instead of a local run")
    p.add_argument("--server-model", help="model id on --server (default: the last one it lists)")
    p.add_argument("--api-key", help="API key for --server")
    p.add_argument("--concurrency", type=integer(1),
                   help=f"--server: requests in flight at once (the server batches them; default {CONCURRENCY}, "
                        "the rows `pocketgpt serve` decodes together)")
    p.add_argument("--bpb", metavar="SOURCES",
                   help="also bits per byte on data sources, e.g. world,docs: the sources a base model was "
                        "pretrained on by that name (its world's seed and size), else the built-in ones; "
                        "the first 500 KB of each, so training text, not its held-out part")
    p.add_argument("--out", help="where to write results (default: MODEL_DIR/eval)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=integer(1))
    p.add_argument("--bf16", action="store_true", help="bf16 weights (half the memory)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("tasks", help="list the tasks, or export one as OpenAI-messages JSONL")
    tsub = p.add_subparsers(dest="tasks_command", required=True)
    t = tsub.add_parser("list", help="every task with its renderings and split sizes")
    t.set_defaults(func=cmd_tasks)
    t = tsub.add_parser("export", help='write {"messages": [...]} per example, for any tool that reads chat data')
    t.add_argument("name", help="task name (see `pocketgpt tasks list`)")
    t.add_argument("--split", default="train", help="train (default), validation or test")
    t.add_argument("--style", default="direct", help="direct (default), cot, tool, sentence, check, or a task's own "
                                                     "(factqa: rag; game24: propose, value)")
    t.add_argument("--out", required=True, help="output .jsonl file")
    t.set_defaults(func=cmd_tasks)

    p = sub.add_parser("import", help="import a Hugging Face folder or a GGUF file as a run directory",
                       description="Reads a local Hugging Face model folder (config.json, safetensors, "
                                   "tokenizer.json, tokenizer_config.json) or a .gguf file (F32, F16, BF16, Q8_0, "
                                   "Q4_0, Q4_1, dequantised) of the Llama, Mistral or Qwen2 family, and writes "
                                   "RUN/base. sample, eval, sft (full or LoRA), rm and grpo then work on it. "
                                   "Nothing is downloaded.")
    p.add_argument("src", help="a Hugging Face model folder or a .gguf file")
    p.add_argument("run", help="the new run directory")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="store the weights in this dtype (default: as the source stores them)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", help="export a model to a Hugging Face folder, or its tokenizer to tiktoken",
                       description="--to hf: a folder transformers, PEFT, vLLM and llama.cpp's converter read "
                                   "(config.json, model.safetensors, generation_config.json, tokenizer.json, "
                                   "tokenizer_config.json with a Jinja chat template of the model's format). "
                                   "--to tiktoken: our BPE as a .tiktoken rank file + a JSON of pattern and specials.")
    p.add_argument("run", help="a run directory (its most post-trained stage) or a model directory")
    p.add_argument("--to", choices=("hf", "tiktoken"), default="hf")
    p.add_argument("out", help="output folder (hf) or file (tiktoken)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="serve a run over an OpenAI-compatible API, with a chat page",
                       description="Each stage of RUN (base, sft, ppo, grpo, ...) is a model id. Endpoints: "
                                   "/v1/models, /v1/chat/completions, /v1/completions, /tokenize, /detokenize, "
                                   "/health, /metrics; the chat page at /. Requests share one continuously "
                                   "batched engine per model.")
    p.add_argument("run", help="a run directory (every stage is served) or a model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=integer(1, 65535), default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the API")
    p.add_argument("--arena-db", metavar="FILE", help="keep the chat page's arena votes in this SQLite file "
                                                       "(rate them with `pocketgpt arena --votes FILE`)")
    p.add_argument("--max-batch", type=integer(1), default=32,
                   help="sequences decoded together per model (default 32). The key-value cache is dense: while "
                        "busy it holds this many rows of the longest row's tokens (prompt and reply), and an idle "
                        "model gives it back; with long prompts on a small machine, lower it")
    p.add_argument("--max-queued", type=integer(1), default=256, help="waiting sequences before answering 503")
    p.add_argument("--prefix-cache", type=non_negative, default=256, metavar="MB",
                   help="keep the keys and values of prompt beginnings (a system prompt, a conversation's earlier "
                        "turns) up to MB megabytes per model and reuse them instead of prefilling again "
                        "(default 256; 0 turns it off). Usage reports the reused tokens as cached_tokens")
    p.add_argument("--max-n", type=integer(1), default=8, help="largest n a request may ask for")
    p.add_argument("--max-tokens", type=integer(1), default=4096, help="largest max_tokens a request may ask for")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 weights: half the memory; with the compiled decode step, faster decoding of a model "
                        "whose weights dominate a step (SmolLM2) and of many clients at once, but a little slower "
                        "for one client of a model as small as the speedrun's (bench/bench_serve.py measures both)")
    p.add_argument("--bf16-prefill", action="store_true",
                   help="prompts through bf16 matmuls, decoding in float32: a faster time to first token on long "
                        "prompts (SmolLM2, a 600-token prompt: 1.75-2.28x, reports/bench/interop*.json); logits "
                        "differ from float32 slightly")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="compile the decode step with torch.compile before serving (default on: several times "
                        "faster decoding; the start takes ~20-50 s, less once inductor's on-disk cache holds the "
                        "compiled code)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=integer(1))
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", help="chat with a model in the terminal",
                       description="Streams replies. Commands: /reset (new conversation), /system TEXT, "
                                   "/temp T, /quit.")
    p.add_argument("model", help="a run directory (its most post-trained stage) or a model directory")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--temperature", type=non_negative, default=0.7)
    p.add_argument("--max-tokens", type=integer(1), default=512)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=integer(1))
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("lab", help="the seeds' science, reproduced: grokking, scaling, recall, diversity, induction")
    lsub = p.add_subparsers(dest="experiment", required=True)
    from .lab import EXPERIMENTS, experiment

    for name, (_, help_text) in EXPERIMENTS.items():
        e = lsub.add_parser(name, help=help_text)
        mod = experiment(name)
        e.description = mod.__doc__.split("\n\n")[0] if mod.__doc__ else help_text
        mod.add_arguments(e)
        e.set_defaults(func=mod.main)

    p = sub.add_parser("info", help="what a run directory holds")
    p.add_argument("run")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("config", help="print the configuration (defaults, or with --config/--set applied)",
                       description="Print every setting of every stage as JSON: the defaults, or with --quick, "
                                   "--config and --set applied, to copy into a TOML file of your own.")
    p.add_argument("--quick", action="store_true", help="the settings of a --quick run (tiny and fast)")
    add_config_args(p)
    p.set_defaults(func=cmd_config)
    return parser


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def use_run_world(args) -> None:
    """A command given a run directory asks its tasks about that run's world (RUN/world.json), not the default."""
    from .data.tasks import use_world
    from .data.world import read_run_world

    runs = [getattr(args, "run", None), getattr(args, "model", None), *(getattr(args, "models", None) or [])]
    worlds = [w for w in (read_run_world(Path(run)) for run in runs if run) if w is not None]
    if any(w != worlds[0] for w in worlds):
        raise PocketError("these runs were trained on different worlds; compare runs of one world")
    if worlds:
        use_world(worlds[0])


def refuse_extra_processes(args) -> None:
    """Under torchrun, the commands that split their work over processes (the training stages, the lab's
    training runs) run; any other ran whole in every process, printing and writing everything N times."""
    import os

    distributed = (cmd_speedrun, cmd_pretrain, cmd_sft, cmd_rl_stage)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.func not in distributed and args.command != "lab":
        raise PocketError(f"`pocketgpt {args.command}` runs in one process: run it without torchrun (torchrun "
                          "runs the training stages: speedrun, pretrain, sft, rm, ppo, grpo, and the lab)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        refuse_extra_processes(args)
        use_run_world(args)
        args.func(args)
    except Interrupted as e:
        if _is_main():  # under torchrun, once
            Console(stderr=True).print(f"[yellow]{e}[/]", highlight=False, soft_wrap=True)
        return 130  # as a shell reports a command Ctrl-C ended
    except PocketError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
