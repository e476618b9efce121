"""Pretraining: next-token prediction on the weighted mixture of sources.

The stage prepares the data (tokenized streams on disk, once), builds the model from a preset,
and hands the shared training loop an objective that is just `model(x, targets=y)`. It reports
validation loss and bits per byte (a loss that does not depend on the tokenizer) as it goes and a
greedy sample every so often, so one can watch the text get coherent.

An optional copy warm-up (`copy_warmup` steps) first trains on rows of random token segments repeated,
where only looking back predicts anything. With smeared keys (`model.smear_keys`) the induction head,
which copying from the context rests on, forms there in a few hundred steps. In the whole speedrun it
cost more than it bought (SFT's calculator calls lost their first operand, spelling went from 29% to
1%; DEVELOPERS.md, "Smeared keys"), so it is off by default: a lever for experiments.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..chat import ChatTemplate
from ..checkpoint import save_model
from ..common import DistInfo, PocketError, autocast, console, human
from ..data.mixture import MixtureLoader, load_streams, prepare_mixture
from ..data.repeats import repeated_token_rows
from ..data.shards import DEFAULT_SHARD_TOKENS
from ..data.sources import SourceSpec
from ..engine import Engine, SamplingParams
from ..model import GPT, PRESETS, GPTConfig, preset
from ..tokenizer import Tokenizer
from .data_parallel import barrier, count_totals
from .loop import DrawCounter, LoaderObjective, TrainConfig, Trainer, stage_setup

# The default mixture, like LLaMA's table: the synthetic world (what the assistant should know),
# worked arithmetic, spelled words (tokens hide their letters: with the drills, SFT's model spelled
# 30% of unseen words, without them none), and real text found on every machine (Python's docs and
# standard library).
DEFAULT_SOURCES: dict[str, dict] = {
    "world": {"kind": "world", "weight": 3.0},
    "math": {"kind": "math", "weight": 1.0, "n": 3000},
    "spelling": {"kind": "spelling", "weight": 0.5},
    "chat": {"kind": "chat", "weight": 1.0},
    "docs": {"kind": "docs", "weight": 0.5},
    "code": {"kind": "code", "weight": 1.0, "max_bytes": 4_000_000},
}


@dataclass
class PretrainConfig:
    preset: str = "small"
    # Overrides of the preset, e.g. {n_layer = 4}. Smeared keys are on: with them the speedrun's SFT model used
    # its tools (ReAct above closed book on multi-hop, 18% against 5%; 25% against 8% in an earlier run) where
    # plain keys did not (DEVELOPERS.md, "Smeared keys"); {smear_keys = false} trains a model export takes.
    model: dict = field(default_factory=lambda: {"smear_keys": True})
    # Compiled and in bf16 on a CPU with AMX, the speedrun affords 3,000 steps (12.3M tokens; 25.4 minutes in
    # all) in its 30 minutes where eager steps afforded 1,000: 2,400 gained arithmetic, decimals, multi-hop,
    # JSON and spelling on 1,500, and 3,000 gained head facts, arithmetic and letter counts on 2,400 while
    # multi-hop and JSON fell back a little; 3,600 gained no validation loss, the synthetic world read 51
    # times instead of 43 (README, "Why 3,000 pretraining steps"; reports/speedrun-amx-3600/).
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=3000, batch_size=16, seq_len=256,
                                                                   compile=True))
    sources: dict = field(default_factory=lambda: {k: dict(v) for k, v in DEFAULT_SOURCES.items()})
    val_fraction: float = 0.02
    shard_tokens: int = DEFAULT_SHARD_TOKENS  # tokens per file of the tokenized sources on disk
    sample_prompt: str = "The capital of"
    # Steps of repeated random token segments before the mixture (part of train.steps, so the mixture gets
    # that many fewer). With model.smear_keys, 300 copied 98.5% of held-out repeats and cost the tasks.
    copy_warmup: int = 0

    def __post_init__(self):
        self.check_values()

    def check_values(self) -> None:
        """Refuse a setting that would fail only once the data is tokenized (`config.update` calls it after --set)."""
        if self.preset not in PRESETS:
            raise PocketError(f"unknown pretrain.preset {self.preset!r}: {', '.join(PRESETS)}")
        unknown = sorted(set(self.model) - {f.name for f in fields(GPTConfig)})
        if unknown:
            raise PocketError(f"unknown pretrain.model setting {unknown[0]!r}: one of {', '.join(f.name for f in fields(GPTConfig))}")
        if not 0 < self.val_fraction < 1 or self.copy_warmup < 0 or self.shard_tokens < 1:
            raise PocketError(f"pretrain: val_fraction must be in (0, 1), copy_warmup >= 0 and shard_tokens >= 1; got "
                              f"{self.val_fraction}, {self.copy_warmup} and {self.shard_tokens}")

    def source_specs(self) -> list[SourceSpec]:
        specs = [SourceSpec.from_dict(name, d) for name, d in self.sources.items()]
        specs = [s for s in specs if s.weight > 0]
        if not specs:
            raise PocketError("the data mixture has no source with a positive weight")
        return specs


class CopyWarmup(DrawCounter):
    """`batches` micro-batches of random token segments (the lab's induction rows), each repeated to fill its
    row; the ids are the tokenizer's ordinary tokens, never a special one. Each process draws its own rows."""

    def __init__(self, batches: int, rows: int, seq_len: int, tokenizer: Tokenizer, seed: int):
        self.batches, self.rows, self.seq_len, self.seed = batches, rows, seq_len, seed
        # The lab's 8-64 tokens (`pocketgpt lab induction`), shorter in short rows: each row holds 4 copies or more.
        self.max_segment = max(2, min(64, seq_len // 4))
        self.min_segment = min(8, self.max_segment)
        specials = set(tokenizer.special_ids.values())
        self.tokens = torch.tensor([i for i in range(tokenizer.vocab_size) if i not in specials])

    def pending(self) -> bool:
        return self.draws < self.batches

    def rows_drawn(self, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return repeated_token_rows(rows, self.seq_len, self.tokens, self.min_segment, self.max_segment, seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rows_drawn(self.rows, self.next_draw(self.seed))

    def held_out(self) -> tuple[torch.Tensor, torch.Tensor]:
        """32 rows no training draw gives (those seeds are >= 0), the same on every process."""
        return self.rows_drawn(32, seed=-1)


class LanguageModeling(LoaderObjective):
    """The pretraining objective: cross-entropy of every next token in a packed row. A copy warm-up's batches
    come first; the mixture's position does not move during them."""

    def __init__(self, loader: MixtureLoader, device: torch.device, warmup: CopyWarmup | None = None):
        super().__init__(loader, device)
        self.warmup = warmup

    def loss(self, model):
        warming_up = self.warmup is not None and self.warmup.pending()
        x, y = self.warmup.next_batch() if warming_up else self.loader.next_batch()
        return model(x.to(self.device), targets=y.to(self.device)), {}

    def state(self) -> dict:
        return {**self.loader.state(), "copy_draws": self.warmup.draws if self.warmup else 0}

    def load_state(self, state: dict) -> None:
        state = dict(state)
        copy_draws = state.pop("copy_draws", 0)  # absent from checkpoints written before the warm-up existed
        if self.warmup is not None:
            self.warmup.draws = copy_draws
        self.loader.load_state(state)


@torch.no_grad()
def measure_copying(model: GPT, inputs: torch.Tensor, targets: torch.Tensor) -> dict:
    """Copy accuracy (the greedy next token against the repeat) and loss over the predictable positions."""
    was_training = model.training
    model.eval()
    loss = model(inputs, targets).item()
    predicted = model(inputs).argmax(-1)
    model.train(was_training)
    predictable = targets != -1
    return {"copy_acc": (predicted == targets)[predictable].float().mean().item(), "copy_loss": loss}


@torch.no_grad()
def evaluate_lm(model: GPT, loader: MixtureLoader, batches: int, token_bytes: torch.Tensor,
                device: torch.device, dtype: str, info: DistInfo = DistInfo()) -> dict:
    """Mean loss (nats/token) and bits per byte over `batches` batches; summed over processes."""
    was_training = model.training
    model.eval()
    sums = [0.0, 0.0, 0.0]  # nats, tokens, bytes
    for _ in range(batches):
        x, y = loader.next_batch()
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            nats = model(x, targets=y, reduction="none")
        sums = [sums[0] + nats.sum().item(), sums[1] + y.numel(), sums[2] + token_bytes[y].sum().item()]
    nats, tokens, nbytes = count_totals(sums, info, device)
    model.train(was_training)
    return {"val_loss": nats / tokens, "val_bpb": nats / math.log(2) / max(nbytes, 1.0)}


def pretrain(cfg: PretrainConfig, run_dir: str | Path, resume: bool = False) -> dict:
    run_dir = Path(run_dir)
    tc = cfg.train
    device, info, out_dir = stage_setup(tc, run_dir, "base", resume)
    tokenizer = Tokenizer.load(run_dir / "tokenizer")
    chat = ChatTemplate.from_spec(tokenizer, None)  # a run's own tokenizer speaks our format

    # Data: rank 0 tokenizes, the others wait and read the same files.
    data_dir = run_dir / "data"
    if info.is_main:
        t0 = time.time()
        workers = max(1, torch.get_num_threads())
        if info.enabled and hasattr(os, "sched_getaffinity"):  # torchrun gives a process one thread: the others wait
            workers = len(os.sched_getaffinity(0))
        manifest = prepare_mixture(cfg.source_specs(), chat, data_dir, cfg.val_fraction, tc.seed, workers=workers,
                                   shard_tokens=cfg.shard_tokens)
        console.print(f"data ready in {time.time() - t0:.1f}s: " + ", ".join(
            f"{n} {human(e['train_tokens'])} tok" for n, e in manifest["sources"].items()))
    barrier(info)
    streams, weights = load_streams(data_dir, "train")
    loader = MixtureLoader(streams, weights, tc.batch_size, tc.seq_len, tc.seed, info.rank, info.world_size)
    val_streams, _ = load_streams(data_dir, "val")
    try:  # checked now: at the first evaluation, the steps before it were lost with the run
        MixtureLoader(val_streams, weights, tc.batch_size, tc.seq_len)
    except PocketError as e:
        raise PocketError(f"the validation split is too short: {e} (raise pretrain.val_fraction, now "
                          f"{cfg.val_fraction}, or lower train.seq_len)") from None

    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    model_cfg = preset(cfg.preset, **{"vocab_size": tokenizer.vocab_size, **cfg.model})
    model_cfg.max_seq_len = max(model_cfg.max_seq_len, tc.seq_len)
    model = GPT(model_cfg).to(device)
    token_bytes = torch.tensor(tokenizer.byte_lengths(), device=device)
    warmup = None
    if cfg.copy_warmup > 0:
        if cfg.copy_warmup >= tc.steps:
            raise PocketError(f"pretrain.copy_warmup ({cfg.copy_warmup}) leaves no step of train.steps "
                              f"({tc.steps}) for the mixture")
        warmup = CopyWarmup(cfg.copy_warmup * tc.grad_accum, tc.batch_size, tc.seq_len, tokenizer,
                            seed=tc.seed * 100_003 + info.rank)
        held_out = [t.to(device) for t in warmup.held_out()]

    def evaluate(m: GPT) -> dict:
        val = MixtureLoader(val_streams, weights, tc.batch_size, tc.seq_len, tc.seed + 1,
                            info.rank, info.world_size)
        metrics = evaluate_lm(m, val, tc.eval_batches, token_bytes, device, tc.dtype, info)
        if warmup is not None:  # whether the head forms in the warm-up, and whether the mixture keeps it
            with autocast(device, tc.dtype):
                metrics.update(measure_copying(m, *held_out))
        return metrics

    def sample(m: GPT) -> str:
        m.eval()
        prompt = chat.document(cfg.sample_prompt)
        params = SamplingParams(max_tokens=48, temperature=0.0, stop_tokens=chat.document_stops)
        text = cfg.sample_prompt + Engine(m, tokenizer).generate([prompt], params)[0].text
        m.train()
        return text

    meta = {"stage": "base", "preset": cfg.preset, "train": asdict(tc), "sources": cfg.sources,
            "copy_warmup": cfg.copy_warmup}
    trainer = Trainer(model, LanguageModeling(loader, device, warmup), tc, out_dir, "pretrain",
                      run_dir / "metrics.jsonl", device, info, evaluate, sample)
    trainer.identity["tokenizer"] = tokenizer.fingerprint()
    if resume:
        trainer.resume()
    model.train()
    if info.is_main:
        shape = f"{model_cfg.d_model} x {model_cfg.n_layer} layers"  # the preset's name alone hid overrides
        console.print(f"[bold]pretrain[/] {cfg.preset}{' (changed)' if cfg.model else ''}, {shape}: "
                      f"{human(model.num_params())} params "
                      f"({human(model.num_params(embeddings=False))} without embeddings), "
                      f"{human(model.flops_per_token(tc.seq_len))} FLOPs/token, vocab {tokenizer.vocab_size}, "
                      f"{info.world_size} process(es), device {device}, {torch.get_num_threads()} threads")
    summary = trainer.run()
    summary.update(params=model.num_params(), realised_mixture=loader.realised())
    if warmup is not None:
        summary["copy_warmup_tokens"] = warmup.draws * tc.batch_size * tc.seq_len
    if info.is_main:
        save_model(model, out_dir, chat, {**meta, "summary": summary})
    barrier(info)  # the next stage reads base/ on every process
    summary["output"] = str(out_dir)
    return summary

