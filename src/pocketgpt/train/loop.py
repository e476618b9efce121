"""The one training loop every stage shares; a stage only says how to compute a loss.

    for step in steps:
        lr = schedule(step)
        for micro in range(grad_accum):            # gradients summed
            loss = objective.loss(model, ...)      # under bf16 autocast
            (loss / grad_accum).backward()
        average the gradients over processes       # torchrun: one all-reduce
        clip, optimizer.step()
        every N steps: log metrics, evaluate, print a sample, write a checkpoint

An objective (pretraining, SFT, reward modelling, ...) provides `loss(model)` and, if its data has
a position, `state()` / `load_state()`; the loop saves that position with each checkpoint, so a run
killed at any moment resumes exactly where its last checkpoint stood (`resume=True`).

Tokens/s and MFU count what a step did. A packed batch is `tokens_per_micro_step()` tokens; an objective
whose rows are padded, or that also samples and scores (RLHF), says in its metrics how many tokens it
trained on ("tokens", padding left out) and how many only went forward through a model of that size
("forward_tokens": sampled, scored by a frozen model; a third of a trained token's FLOPs).

Under torchrun every process runs this loop on its share of the global batch; the gradients are
averaged by one all-reduce after the backward passes (data_parallel.py), not by DDP's hooks, so an
objective may call the model, or parts of it (PPO's policy and value model), as often as it needs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..checkpoint import latest_training_state, load_training_state, read_training_state, save_training_state
from ..common import (
    DistInfo,
    PocketError,
    append_jsonl,
    atomic_write_text,
    autocast,
    compute_dtype,
    console,
    human,
    init_distributed,
    keep_freed_memory,
    local_device,
    pick_device,
    read_jsonl,
    set_threads,
)
from ..errors import Interrupted
from ..model import GPT
from .data_parallel import average_gradients, mean_over_processes
from .grad_filter import GRAD_FILTERS, make_grad_filter
from .throughput import measured_peak, mfu

SCHEDULES = ("cosine", "wsd", "constant")
OPTIMIZERS = ("adamw", "adam", "sgd")
DTYPES = ("auto", "bfloat16", "float32")


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16  # rows per process per micro-step
    # micro-steps a step sums (each loss / grad_accum, as nanoGPT): every micro-step's mean weighs the same, so a
    # masked loss (SFT, PPO, GRPO) weighs tokens equally within a micro-step, not across them as one larger
    # batch (or more processes under torchrun) would
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_frac: float = 0.1  # the schedule ends at lr * min_lr_frac
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay: flat, then linear decay over the last 20%) | constant
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    optimizer: str = "adamw"  # adamw | adam (weight decay as an L2 term in the gradient) | sgd (momentum 0.9)
    grad_filter: str = "none"  # none | grokfast (train/grad_filter.py)
    grokfast_alpha: float = 0.98
    grokfast_lambda: float = 2.0
    dtype: str = "auto"  # auto | bfloat16 | float32: autocast dtype for forward/backward (auto: bf16 where faster)
    compile: bool = False  # torch.compile the training step: pays on fixed shapes (pretraining, SFT) after ~1 min
    deterministic: bool = True  # the same seed trains the same model on the same machine (use_deterministic_kernels)
    threads: int = 0  # CPU threads; 0 = PyTorch's default
    device: str = "auto"
    eval_every: int = 100
    eval_log_spaced: bool = False  # evaluate every eval_every steps up to 100x that, then at a tenth of each decade
    eval_batches: int = 8
    sample_every: int = 250
    save_every: int = 250
    keep_checkpoints: bool = False  # keep the training state when the stage finishes (to train it further)
    log_every: int = 10
    seed: int = 0

    def __post_init__(self):
        self.check_values()

    def check_values(self) -> None:
        """Refuse what could only train nothing or fail later (`config.update` calls it after --set): -5 steps
        trained an untrained model with a NaN loss, an unknown schedule failed once warmup ended."""
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_every", "save_every", "log_every",
                     "sample_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise PocketError(f"train.{name} must be at least 1, not {getattr(self, name)}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_frac <= 1 or not 0 <= self.lr < math.inf:
            raise PocketError(f"train: warmup_steps must be >= 0, min_lr_frac in [0, 1] and lr >= 0; got "
                              f"{self.warmup_steps}, {self.min_lr_frac} and {self.lr}")
        for name, known in (("schedule", SCHEDULES), ("optimizer", OPTIMIZERS), ("grad_filter", GRAD_FILTERS),
                            ("dtype", DTYPES)):
            if getattr(self, name) not in known:  # else found only once the data is ready, or at the first step
                raise PocketError(f"unknown train.{name} {getattr(self, name)!r}: {', '.join(known)}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1) or self.threads < 0:
            raise PocketError(f"train: beta1 and beta2 must be in [0, 1) and threads >= 0; got {self.beta1}, "
                              f"{self.beta2} and {self.threads}")

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        floor = self.lr * self.min_lr_frac
        if self.schedule == "cosine":
            return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if self.schedule == "wsd":
            decay_start = 0.8
            if progress < decay_start:
                return self.lr
            return self.lr - (self.lr - floor) * (progress - decay_start) / (1 - decay_start)
        raise PocketError(f"unknown schedule {self.schedule!r}: {', '.join(SCHEDULES)}")

    def evaluates_at(self, step: int) -> bool:
        """Whether the run evaluates after `step`: every `eval_every` steps and at the last one; log-spaced,
        the interval grows with the decade (10, 20, ... 1000, 1100, ... 10000, 11000, ... for eval_every 10),
        so that a run plotted on a log axis has points evenly along it at a fraction of the cost."""
        every = self.eval_every
        if self.eval_log_spaced:
            every = max(every, 10 ** (len(str(step)) - 1) // 10 // every * every)
        return step % every == 0 or step == self.steps


class Objective(Protocol):
    def loss(self, model: torch.nn.Module) -> tuple[torch.Tensor, dict]: ...  # metrics may count "tokens"
    def tokens_per_micro_step(self) -> int: ...  # the most a micro-step trains on: the matmul peak's rows
    def state(self) -> dict: ...
    def load_state(self, state: dict) -> None: ...


class LoaderObjective:
    """An objective whose data position is its loader's (anything with B, T, state() and load_state())."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device

    def tokens_per_micro_step(self) -> int:
        return self.loader.B * self.loader.T

    def state(self) -> dict:
        return self.loader.state()

    def load_state(self, state: dict) -> None:
        self.loader.load_state(state)


class DrawCounter:
    """For an objective that draws a fresh seeded batch each step: its data position is the number of draws,
    so a resumed run draws exactly the batches an uninterrupted one would have."""

    draws = 0

    def next_draw(self, seed: int) -> int:
        """The seed of the next batch: one stream per run seed, one value per draw."""
        self.draws += 1
        return seed * 1_000_003 + self.draws - 1

    def state(self) -> dict:
        return {"draws": self.draws}

    def load_state(self, state: dict) -> None:
        self.draws = state["draws"]


def stage_setup(tc: TrainConfig, run_dir: str | Path, name: str, resume: bool) -> tuple[torch.device, DistInfo, Path]:
    """Threads, memory reuse, device (one per torchrun process) and the stage's output directory, refusing to
    clobber a run."""
    set_threads(tc.threads)
    keep_freed_memory()
    device = pick_device(tc.device)
    info = init_distributed(device)
    device = local_device(device, info)
    out_dir = Path(run_dir) / name
    latest = latest_training_state(out_dir)
    if latest is not None and not resume:
        raise PocketError(f"{out_dir} already holds a training checkpoint: pass --resume to continue it, "
                          f"or delete {out_dir} to start over")
    if latest is None and (out_dir / "config.json").exists():
        raise PocketError(f"{out_dir} holds a finished model and no training state (--resume has nothing to "
                          f"continue): delete {out_dir} to train it again")
    return device, info, out_dir


def use_deterministic_kernels(on: bool = True) -> None:
    """Kernels that give the same result on every run (`on`), or whichever PyTorch finds fastest. Without
    them a compiled step sums the token embedding's gradient with atomic adds across threads, in an order
    that changes from run to run: two runs of the same speedrun pretrained different models (validation
    loss 1.217 and 1.189 after 2,400 steps), so a seed meant nothing. Measured on the `small` step,
    compiled, bf16, 2 threads: no slower. The mode also fills every new tensor with NaN by default (to
    expose reads of uninitialised memory): a write of every buffer for nothing here, left off. cuBLAS needs
    a fixed workspace to be deterministic. The mode is process-wide, so each stage sets it either way."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (or Adam with L2, or SGD with momentum); weight decay on matrices and embeddings only (not on norm gains).

    AdamW decays the weights apart from the gradient; Adam adds `weight_decay * w` to the gradient before
    normalising it, so once the loss's gradient is tiny (a memorised training set) the decay dominates the
    normalised update and acts far more strongly. Grokfast's reference runs use Adam's."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        # One fused kernel over every parameter: a third of the per-tensor update's time (4 ms vs 13 for `small`).
        fused = all(p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
    if cfg.optimizer == "adam":
        fused = all(p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    raise PocketError(f"unknown optimizer {cfg.optimizer!r}: {', '.join(OPTIMIZERS)}")


class Trainer:
    """Runs an objective over a model; owns the optimizer, schedule, checkpoints, metrics and progress."""

    def __init__(self, model: torch.nn.Module, objective: Objective, cfg: TrainConfig, out_dir: str | Path,
                 stage: str, metrics_path: str | Path, device: torch.device, dist_info: DistInfo = DistInfo(),
                 evaluate: Callable[[GPT], dict] | None = None, sample: Callable[[GPT], str] | None = None,
                 until: Callable[[dict], bool] | None = None):
        """`until(evaluation)` ends the run early when it returns True (the lab stops a run that has converged)."""
        self.model, self.objective, self.cfg = model, objective, cfg
        self.until = until
        self.out_dir, self.stage, self.metrics_path = Path(out_dir), stage, Path(metrics_path)
        self.device, self.dist = device, dist_info
        self.dtype = compute_dtype(cfg.dtype, device)  # "auto" settles here: a resumed run may pick differently
        self.evaluate, self.sample = evaluate, sample
        self.optimizer = make_optimizer(model, cfg)
        # What the run's inputs were (the tokenizer's fingerprint, say), saved with each state: a resume
        # whose inputs changed since is refused rather than continued on other data.
        self.identity: dict[str, str] = {"optimizer": cfg.optimizer}
        self.grad_filter = make_grad_filter(cfg.grad_filter, self.optimizer, cfg.grokfast_alpha, cfg.grokfast_lambda)
        self.step = 0
        # What the stage has trained and taken so far, over every invocation: a resumed stage's summary (and the
        # report card) counted only its last part.
        self.tokens_trained, self.seconds_before, self.started = 0.0, 0.0, time.time()
        use_deterministic_kernels(cfg.deterministic)
        # Inductor's MPS backend is still partial: Apple GPUs train eagerly.
        self.wrapped: torch.nn.Module = torch.compile(model) if cfg.compile and device.type != "mps" else model
        self.history: list[dict] = []

    # ------------------------------------------------------------------ resume

    def resume(self) -> bool:
        """Continue from the newest checkpoint in out_dir, if any; `run` drops the metrics logged after it."""
        path = latest_training_state(self.out_dir)
        if path is None:
            return False
        state = read_training_state(path)
        if state["step"] > self.cfg.steps:  # it saved a model of state["step"] steps labelled with fewer
            raise PocketError(f"{path} is at step {state['step']}, past train.steps = {self.cfg.steps}: "
                              f"ask for at least {state['step']} steps to continue it")
        for key, value in state.get("identity", {}).items():
            if self.identity.get(key, value) != value:
                raise PocketError(f"{path} was trained with another {key} ({value}; the run's is now "
                                  f"{self.identity[key]}): restore it, or delete {path.parent} to start over")
        load_training_state(path, self.model, self.optimizer)
        self.step = state["step"]
        self.tokens_trained, self.seconds_before = state.get("tokens", 0.0), state.get("time_s", 0.0)
        self.objective.load_state(state["objective"])
        if self.dist.is_main:
            console.print(f"[bold]resumed[/] {self.stage} from {path} (step {self.step})")
        return True

    def _forget_metrics_past_the_step(self) -> None:
        """The stage's records logged after the step it starts from: a resumed run's past its checkpoint, a
        fresh run's all (a stage trained again drew both trainings as one curve that jumped back to step 1)."""
        if self.dist.is_main and self.metrics_path.exists():
            kept = [r for r in read_jsonl(self.metrics_path, torn_lines=True)
                    if r.get("stage") != self.stage or r.get("step", 0) <= self.step]
            atomic_write_text(self.metrics_path, "".join(_json_line(r) for r in kept))

    def save(self, finished: bool = False) -> None:
        """A finished run's state is replaced by the stage's final model, unless the config keeps it."""
        if self.dist.is_main:
            save_training_state(self.out_dir, self.step, self.model, self.optimizer,
                                {"objective": self.objective.state(), "stage": self.stage, "identity": self.identity,
                                 "tokens": self.tokens_trained, "time_s": self.seconds(),
                                 "replaced_by_model": finished and not self.cfg.keep_checkpoints})

    def seconds(self) -> float:
        """The stage's time so far, the invocations before a resume included."""
        return self.seconds_before + time.time() - self.started

    # ------------------------------------------------------------------ the loop

    @contextlib.contextmanager
    def _ctrl_c_between_steps(self):
        """A first Ctrl-C stops the run after the step it lands in, a second one at once. Caught mid-step,
        the loader had handed out a batch the saved state then skipped: the resumed run trained another
        model. One process only: under torchrun the processes could stop at different steps, one of them
        then waiting for the others' gradients, so there the first Ctrl-C stops at once."""
        asked = []
        if self.dist.world_size > 1 or threading.current_thread() is not threading.main_thread():
            yield lambda: False
            return

        def on_ctrl_c(signum, frame):
            if asked:  # the second: as Python would
                raise KeyboardInterrupt
            asked.append(True)
            console.print(f"[yellow]{self.stage}: stopping after this step (Ctrl-C again to stop at once)[/]")

        previous = signal.signal(signal.SIGINT, on_ctrl_c)
        try:
            yield lambda: bool(asked)
        finally:
            signal.signal(signal.SIGINT, previous)

    def log(self, record: dict) -> None:
        record = {"stage": self.stage, "step": self.step, **record}
        self.history.append(record)
        if self.dist.is_main:
            append_jsonl(self.metrics_path, record)

    def train_step(self) -> dict:
        cfg = self.cfg
        lr = cfg.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total, extras, tokens = 0.0, {}, {"tokens": 0.0, "forward_tokens": 0.0}
        for _ in range(cfg.grad_accum):
            with autocast(self.device, self.dtype):
                loss, metrics = self.objective.loss(self.wrapped)
            (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
            tokens["tokens"] += metrics.pop("tokens", self.objective.tokens_per_micro_step())
            tokens["forward_tokens"] += metrics.pop("forward_tokens", 0)
            for k, v in metrics.items():
                extras[k] = extras.get(k, 0.0) + v / cfg.grad_accum
        if not math.isfinite(total):
            # A compiled step can go NaN where the eager one does not (DEVELOPERS.md, "Known issues").
            compiled = ", or train without torch.compile (train.compile = false)" if self.wrapped is not self.model else ""
            raise PocketError(f"{self.stage}: loss became {total} at step {self.step}; lower the learning rate{compiled}")
        average_gradients(self.model, self.dist)
        if self.grad_filter:  # after the all-reduce: every rank filters the same averaged gradient
            self.grad_filter()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # Logs show the mean over processes, as the gradients were (every process logs the same keys);
        # token counts are the step's, all processes together.
        averaged = mean_over_processes({"loss": total, **extras, **tokens}, self.dist, self.device)
        for k in tokens:
            averaged[k] *= self.dist.world_size
        return {**averaged, "lr": lr, "grad_norm": float(norm)}

    def run(self) -> dict:
        cfg = self.cfg
        # MFU against this machine's matmul peak in the training's dtype, measured now (once per process),
        # for a GPT's known FLOPs.
        flops = self.model.flops_per_token(cfg.seq_len) if isinstance(self.model, GPT) else 0
        micro_tokens = self.objective.tokens_per_micro_step()
        peak = measured_peak(self.model, micro_tokens, self.device, self.dtype) if flops else 0.0
        step_seconds: list[float] = []
        rates: list[tuple[float, float]] = []  # each step's (trained tokens/s, FLOP-weighted tokens/s)
        self._forget_metrics_past_the_step()
        self.started = time.time()
        progress = _progress(self.dist.is_main)
        plain_log = self.dist.is_main and progress.disable  # no live bar (not a terminal): print lines
        task = progress.add_task(self.stage, total=cfg.steps, completed=self.step, info="")
        interrupted = False  # by Ctrl-C: the state is saved, then the run raises Interrupted
        last: dict = {}
        with progress, self._ctrl_c_between_steps() as stop_asked:
            try:
                while self.step < cfg.steps:
                    if stop_asked():  # after a whole step: the saved state resumes exactly
                        raise KeyboardInterrupt
                    t_step = time.time()
                    metrics = self.train_step()
                    self.step += 1
                    dt = max(time.time() - t_step, 1e-9)
                    step_seconds.append(dt)
                    self.tokens_trained += metrics["tokens"]
                    rates.append((metrics["tokens"] / dt, (metrics["tokens"] + metrics["forward_tokens"] / 3) / dt))
                    metrics["tokens_per_s"] = rates[-1][0]
                    if peak:
                        metrics["mfu"] = mfu(flops, rates[-1][1], peak, self.dist)
                        if metrics["mfu"] > 1:  # impossible: the start's measurement caught a slow moment (323%)
                            peak = measured_peak(self.model, micro_tokens, self.device, self.dtype, again=True)
                            metrics["mfu"] = mfu(flops, rates[-1][1], peak, self.dist)
                    last = metrics
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        self.log(metrics)
                    if self.evaluate and cfg.evaluates_at(self.step):
                        ev = self.evaluate(self.model)
                        self.log(ev)
                        last.update(ev)
                        if plain_log:
                            console.print(f"{self.stage} step {self.step}: " +
                                          " ".join(f"{k}={v:.4g}" for k, v in ev.items()))
                        if self.until and self.until(ev):
                            break
                    if self.sample and self.dist.is_main and (self.step % cfg.sample_every == 0):
                        progress.console.print(f"[dim]sample @ {self.step}:[/] {self.sample(self.model)!r}")
                    if self.step % cfg.save_every == 0 and self.step < cfg.steps:
                        self.save()
                    info = f"loss {metrics['loss']:.3f} · {human(metrics['tokens_per_s'])} tok/s"
                    if peak:
                        info += f" · MFU {metrics['mfu']:.0%}"
                    if "val_loss" in last:
                        info += f" · val {last['val_loss']:.3f}"
                    progress.update(task, completed=self.step, info=info)
                    if plain_log and self.step % cfg.log_every == 0:
                        console.print(f"{self.stage} {self.step}/{cfg.steps} {info}")
            except KeyboardInterrupt:
                interrupted = True
        self.save(finished=not interrupted)
        if interrupted:
            raise Interrupted(f"{self.stage} interrupted at step {self.step} of {cfg.steps}; its checkpoint is in "
                              f"{self.out_dir}: the same command with --resume continues it (a speedrun by itself)")
        # Speed is the median step's: neither compilation (in the first step) nor evaluation counts.
        speed = {"tokens_per_s": statistics.median(r[0] for r in rates) if rates else 0.0}
        if peak:  # measured again at the end, the higher kept (see measured_peak)
            peak = measured_peak(self.model, micro_tokens, self.device, self.dtype, again=True)
            speed.update(mfu=mfu(flops, statistics.median(r[1] for r in rates) if rates else 0.0, peak, self.dist),
                         peak_flops=peak)
        if cfg.compile and step_seconds:
            speed["compile_s"] = step_seconds[0] - statistics.median(step_seconds)
        logged = {k: v for k, v in last.items() if isinstance(v, (int, float)) and k not in ("tokens", "forward_tokens")}
        return {"stage": self.stage, "steps": self.step, "dtype": self.dtype,
                "time_s": self.seconds(), "tokens": self.tokens_trained, **logged, **speed}


def _json_line(r: dict) -> str:
    return json.dumps(r, ensure_ascii=False) + "\n"


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                    console=console, disable=not enabled or not console.is_terminal)
