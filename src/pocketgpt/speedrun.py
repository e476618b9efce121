"""The speedrun: every stage of the pipeline, in order, in one run directory.

    tokenizer -> pretrain -> sft (+ the naive-SFT ablation) -> reward model -> PPO -> GRPO
              -> evaluation of every checkpoint -> report card

A stage whose output is already complete is skipped and a half-finished one resumes from its last
checkpoint, so re-running the same command after an interruption continues where it stopped.

Under torchrun every process runs every stage (each trains on its share of the global batch); what
one process writes (the tokenizer, a stage's model) is behind a barrier before any process reads it.
The evaluation deals the checkpoints out to the processes; rank 0 writes the report card.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .checkpoint import imported_source, latest_training_state, load_model, read_config
from .common import PocketError, atomic_write_json, console, init_distributed, pick_device, provenance
from .data.tasks import use_world
from .data.world import WorldConfig, read_run_world, record_run_world
from .evaluate.harness import SUITE, copying, diversity, evaluate_suite
from .tokenizer import PATTERNS, SPECIAL_TOKENS
from .train.bpe import train_tokenizer
from .train.data_parallel import barrier
from .train.grpo import GRPOConfig, grpo
from .train.loop import TrainConfig
from .train.ppo import PPOConfig, ppo
from .train.pretrain import PretrainConfig, pretrain
from .train.reward import RewardConfig, reward_model
from .train.sft import SFTConfig, sft


@dataclass
class TokenizerConfig:
    vocab_size: int = 4096
    max_chars: int = 10_000_000
    pattern: str = "gpt4"  # gpt4 (numbers in chunks of up to 3 digits) | gpt4-digits (one token per digit)

    def __post_init__(self):
        self.check_values()

    def check_values(self) -> None:
        """Refused when set: 0 characters trained a tokenizer of bytes alone, with exit code 0."""
        smallest = 256 + len(SPECIAL_TOKENS)
        if self.vocab_size < smallest or self.max_chars < 1 or self.pattern not in PATTERNS:
            raise PocketError(f"tokenizer: vocab_size must be at least {smallest} (256 bytes and the specials), "
                              f"max_chars at least 1 and pattern one of {', '.join(PATTERNS)}; got {self.vocab_size}, "
                              f"{self.max_chars} and {self.pattern!r}")


@dataclass
class EvalConfig:
    n: int = 100  # test examples per task (0 = the whole test split)
    batch_size: int = 128  # questions decoded together (the SFT model's suite: 32.7 s against 46-51 s at 32)
    compile: bool = True  # one compiled decode step for every checkpoint (harness.evaluate_task)


@dataclass
class RunConfig:
    """Everything a run needs; `--config run.toml` fills it with [world], [tokenizer], [pretrain], ... tables."""
    world: WorldConfig = field(default_factory=WorldConfig)  # the synthetic world every stage and task uses
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    sft_ablation: bool = True  # also fine-tune without the hallucination mitigation, to measure it
    rm: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def quick(cfg: RunConfig) -> RunConfig:
    """A smoke-test version of the run: a tiny model, little data, a few dozen steps per stage."""
    cfg.tokenizer = TokenizerConfig(vocab_size=1024, max_chars=1_000_000, pattern=cfg.tokenizer.pattern)
    for s in cfg.pretrain.sources.values():
        s["max_bytes"] = min(s.get("max_bytes") or 500_000, 500_000)
    cfg.pretrain.preset = "tiny"
    small = dict(batch_size=8, seq_len=128, warmup_steps=5, eval_batches=2, log_every=10)
    cfg.pretrain.train = TrainConfig(steps=60, lr=3e-3, eval_every=30, sample_every=30, save_every=30,
                                     threads=cfg.pretrain.train.threads, **small)
    cfg.sft.train = TrainConfig(steps=20, lr=1e-3, eval_every=20, sample_every=20, save_every=20,
                                threads=cfg.sft.train.threads, **small)
    cfg.sft.probe_samples = 2
    for spec in cfg.sft.tasks.values():
        spec["n"] = 30
    cfg.rm.train = TrainConfig(steps=10, lr=3e-4, eval_every=10, sample_every=10**9, save_every=10,
                               threads=cfg.rm.train.threads, **{**small, "batch_size": 4})
    cfg.rm.prompts_per_task, cfg.rm.val_prompts_per_task, cfg.rm.max_tokens = 6, 3, 32
    cfg.ppo.train = TrainConfig(steps=4, lr=2e-5, schedule="constant", warmup_steps=0, eval_every=4,
                                sample_every=10**9, save_every=4, log_every=1, seq_len=256, batch_size=4,
                                threads=cfg.ppo.train.threads)
    cfg.ppo.rollout_size, cfg.ppo.max_tokens, cfg.ppo.eval_prompts_per_task = 8, 32, 2
    cfg.grpo.train = TrainConfig(steps=2, lr=2e-5, schedule="constant", warmup_steps=0, eval_every=2,
                                 sample_every=10**9, save_every=2, log_every=1, seq_len=256,
                                 threads=cfg.grpo.train.threads)
    cfg.grpo.prompts_per_step, cfg.grpo.group_size, cfg.grpo.max_tokens, cfg.grpo.eval_n = 2, 4, 48, 10
    # A compile (~30 s) would take longer than the quick run's sampling and evaluation.
    cfg.eval = EvalConfig(n=10, compile=False)
    cfg.rm.compile_sampling = cfg.ppo.compile_sampling = cfg.grpo.compile_sampling = False
    return cfg


def settle_world(cfg: RunConfig, run_dir: Path, record: bool = True) -> WorldConfig:
    """The run's one world: the first command on a run records it (RUN/world.json; not if `record` is
    False), later ones read it back (asking for another is refused); the pretraining world source and every
    task of this process use it."""
    recorded = read_run_world(run_dir)
    if recorded is not None and cfg.world != WorldConfig():
        record_run_world(run_dir, cfg.world)  # refuses a world other than the recorded one
    world = recorded or cfg.world
    settings = asdict(world)
    for name, source in cfg.pretrain.sources.items():
        if source.get("kind") == "world":
            # the tasks ask about the run's one world, so a world source is that world: its own setting would
            # have been replaced without a word (a second source of seed 9 was the same world again)
            other = {key: value for key, value in source.items() if key in settings and value != settings[key]}
            if other:
                raise PocketError(
                    f"pretrain.sources.{name} sets {', '.join(f'{k} = {v!r}' for k, v in other.items())}: a world "
                    "source is the run's one world, which every task asks about; set it for the run with "
                    + " ".join(f"--set world.{k}={v!r}" for k, v in other.items()))
            source.update(settings)
    if recorded is None and record and os.environ.get("RANK", "0") == "0":  # one process writes it (torchrun)
        run_dir.mkdir(parents=True, exist_ok=True)
        record_run_world(run_dir, world)
    cfg.world = world
    use_world(world)
    return world


def stage_done(model_dir: Path, steps: int) -> bool:
    cfg_path = model_dir / "config.json"
    if not cfg_path.exists():
        return False
    summary = json.loads(cfg_path.read_text()).get("meta", {}).get("summary", {})
    return summary.get("steps") == steps and not summary.get("interrupted")


def finished_steps(model_dir: Path) -> int | None:
    """How many steps the finished model in `model_dir` was trained for; None if there is none (or only a
    training state, which a resume continues)."""
    if latest_training_state(model_dir) is not None or not (model_dir / "config.json").exists():
        return None
    return read_config(model_dir).get("meta", {}).get("summary", {}).get("steps")  # a corrupt one: one line


def run_tokenizer(cfg: RunConfig, run_dir: Path) -> dict:
    return train_tokenizer(cfg.pretrain.source_specs(), run_dir / "tokenizer", cfg.tokenizer.vocab_size,
                           cfg.tokenizer.max_chars, cfg.tokenizer.pattern)


def run_eval(cfg: RunConfig, run_dir: Path, stage: str, mode: str, tasks: dict[str, str]) -> dict:
    """Evaluate one checkpoint on the suite; results land in RUN/STAGE/eval/."""
    model, chat, _ = load_model(run_dir / stage, pick_device(cfg.pretrain.train.device))
    threads = cfg.pretrain.train.threads
    if threads:
        import torch

        torch.set_num_threads(threads)
    console.print(f"[bold]eval[/] {stage} ({mode})")
    results = evaluate_suite(model, chat, run_dir / stage / "eval", tasks, mode, n=cfg.eval.n or None,
                             batch_size=cfg.eval.batch_size, compile=cfg.eval.compile,
                             log=lambda line: console.print(line, highlight=False, soft_wrap=True))
    results["diversity"] = diversity(model, chat, mode)
    results["copying"] = copying(model, chat)
    console.print(probes_line(results["diversity"], results["copying"]), highlight=False, soft_wrap=True)
    atomic_write_json(run_dir / stage / "eval" / "results.json", results)
    return results


def probes_line(diversity: dict, copying: dict) -> str:
    """The diversity and copying probes in one line: "diversity: entropy 5.61 nats, 79% distinct names,
    1.8 names an answer; in-context copying: expression 0%, result 0%, list 0%"."""
    copied = ", ".join(f"{name} {share:.0%}" for name, share in copying.items())
    return (f"diversity: entropy {diversity['entropy']:.2f} nats, {diversity['distinct_names']:.0%} distinct names, "
            f"{diversity['names_per_answer']:.1f} names an answer; in-context copying: {copied}")


def speedrun(cfg: RunConfig, run_dir: str | Path) -> dict:
    from .evaluate.report import write_report

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.pretrain.train.device)
    info = init_distributed(device)  # one process unless under torchrun
    world = settle_world(cfg, run_dir)
    if info.is_main:
        console.print(f"world: seed {world.seed} ({world.n_countries} countries, {world.n_cities} cities, "
                      f"{world.n_people} people, {world.n_companies} companies)")
    t_start = time.time()
    clock = StageClock(run_dir / "speedrun.json", device, write=info.is_main)

    def say(text: str) -> None:
        if info.is_main:
            console.print(text)

    def stage(name: str, title: str):
        if info.is_main:
            console.rule(f"[bold]{title}")
        clock.start(name)

    # A run directory `pocketgpt import` made: its model is the base, with the tokenizer it came with.
    imported = imported_source(run_dir / "base")
    stage("tokenizer", "1. tokenizer")
    if imported:
        say(f"the imported model's own, skipped (base imported from {imported})")
    elif (run_dir / "tokenizer" / "tokenizer.json").exists():
        say("already trained, skipped")
    else:
        clock.worked()
        if info.is_main:  # the others wait, then load it
            report = run_tokenizer(cfg, run_dir)
            say(f"vocab {report['vocab_size']}, trained in {report['train_seconds']:.1f}s")
    barrier(info)

    def once(stage_dir: str, steps: int, run) -> None:
        """Run a training stage unless its model is complete; a half-finished one resumes."""
        if stage_done(run_dir / stage_dir, steps):
            say(f"{stage_dir}: already finished, skipped")
        elif (trained := finished_steps(run_dir / stage_dir)) not in (None, steps):  # the stage: "delete it"
            raise PocketError(f"{run_dir / stage_dir} holds a model trained for {trained} steps, where this "
                              f"configuration asks for {steps} (a --quick run, run again without --quick?): give "
                              "the settings it was made with, or another run directory")
        else:
            clock.worked()
            run()

    stage("pretrain", "2. pretrain")
    if imported:
        say("base: imported, skipped")
    else:
        once("base", cfg.pretrain.train.steps, lambda: pretrain(cfg.pretrain, run_dir, resume=True))
    stage("sft", "3. supervised fine-tuning (+ the ablation without hallucination mitigation)")
    once("sft", cfg.sft.train.steps, lambda: sft(cfg.sft, run_dir, "sft", resume=True))
    if cfg.sft_ablation:
        naive = replace(cfg.sft, mitigate_hallucination=False)
        once("sft_naive", cfg.sft.train.steps, lambda: sft(naive, run_dir, "sft_naive", resume=True))
    stage("rm", "4. reward model")
    once("rm", cfg.rm.train.steps, lambda: reward_model(cfg.rm, run_dir, resume=True))
    stage("ppo", "5. RLHF (PPO)")
    once("ppo", cfg.ppo.train.steps, lambda: ppo(cfg.ppo, run_dir, resume=True))
    stage("grpo", "6. RL on verifiable tasks (GRPO)")
    once("grpo", cfg.grpo.train.steps, lambda: grpo(cfg.grpo, run_dir, resume=True))

    stage("eval", "7. evaluation")
    clock.worked()
    evaluations = [("base", "fewshot", SUITE)] + [(name, "chat", SUITE) for name in ("sft", "ppo", "grpo")]
    if cfg.sft_ablation:
        evaluations.append(("sft_naive", "chat", {k: v for k, v in SUITE.items() if k.startswith("factqa")}))
    for i, (name, mode, tasks) in enumerate(evaluations):  # each checkpoint by one process, round robin
        if i % info.world_size == info.rank:
            run_eval(cfg, run_dir, name, mode, tasks)
    barrier(info)
    clock.stop()
    if not info.is_main:
        return {}
    report_path = write_report(run_dir)
    console.print(f"pipeline {clock.total:.0f}s (this invocation {time.time() - t_start:.0f}s); "
                  f"report card: {report_path}")
    return {"stage_seconds": clock.stage_seconds, "report": str(report_path)}


def read_timings(path: Path) -> dict | None:
    """RUN/speedrun.json as StageClock writes it, or None: missing, or damaged (said; only timings are lost,
    and the next speedrun invocation writes them anew)."""
    if not path.exists():
        return None
    try:
        timing = json.loads(path.read_text(encoding="utf-8"))
        ok = (isinstance(timing, dict) and isinstance(timing.get("stage_seconds"), dict)
              and isinstance(timing.get("total_seconds"), (int, float))
              and all(isinstance(v, (int, float)) for v in timing["stage_seconds"].values()))
    except (UnicodeDecodeError, json.JSONDecodeError):
        ok = False
    if not ok:
        console.print(f"[yellow]{path} is damaged: the stages' timings in it are not used[/]", soft_wrap=True)
        return None
    return timing


class StageClock:
    """The seconds each stage of the pipeline took, in RUN/speedrun.json, written as each stage ends: an
    interrupted run keeps what its finished stages took, and a resumed run counts a stage it skips at
    what it took when it ran. So the report card's wall time is the cost of the whole pipeline, not of
    the last invocation. (A stage that resumed from a checkpoint counts only its resumed part.)"""

    def __init__(self, path: Path, device, write: bool = True):
        self.path, self.device, self.write = path, device, write
        self.previous: dict[str, float] = (read_timings(path) or {}).get("stage_seconds", {})
        self.seconds: dict[str, float] = {}
        self.current: str | None = None
        self.started = 0.0
        self.did_work = False

    def start(self, name: str) -> None:
        self.stop()
        self.current, self.started, self.did_work = name, time.time(), False

    def worked(self) -> None:
        """The current stage did work in this invocation (it was not skipped as complete)."""
        self.did_work = True

    def stop(self) -> None:
        if self.current is None:
            return
        took = time.time() - self.started
        self.seconds[self.current] = took if self.did_work else self.previous.get(self.current, took)
        self.current = None
        if self.write:
            atomic_write_json(self.path, {"stage_seconds": self.stage_seconds, "total_seconds": self.total,
                                          "measured": provenance(self.device)})

    @property
    def stage_seconds(self) -> dict[str, float]:
        return {**self.previous, **self.seconds}

    @property
    def total(self) -> float:
        return sum(self.stage_seconds.values())
