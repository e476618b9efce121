"""Pretraining: next-token prediction on the weighted mixture of sources.

The stage prepares the data (tokenized streams on disk, once), builds the model from a preset,
and hands the shared training loop an objective that is just `model(x, targets=y)`. It reports
validation loss and bits per byte (a loss that does not depend on the tokenizer) as it goes and a
greedy sample every so often, so one can watch the text get coherent.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..chat import ChatTemplate
from ..checkpoint import save_model
from ..common import PocketError, autocast, console, human
from ..data.mixture import MixtureLoader, load_streams, prepare_mixture
from ..data.shards import DEFAULT_SHARD_TOKENS
from ..data.sources import SourceSpec
from ..engine import Engine, SamplingParams
from ..model import GPT, preset
from ..tokenizer import Tokenizer
from .data_parallel import barrier
from .loop import LoaderObjective, TrainConfig, Trainer, stage_setup

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
    model: dict = field(default_factory=dict)  # overrides of the preset, e.g. {n_layer = 4}
    # Compiled, a step runs ~1.4x faster here after ~50 s of compiling; the speedrun spends that on 1,500
    # steps where it used to afford 1,000 (validation loss 1.216 -> 1.194; see README "Training speed").
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1500, batch_size=16, seq_len=256,
                                                                   compile=True))
    sources: dict = field(default_factory=lambda: {k: dict(v) for k, v in DEFAULT_SOURCES.items()})
    val_fraction: float = 0.02
    shard_tokens: int = DEFAULT_SHARD_TOKENS  # tokens per file of the tokenized sources on disk
    sample_prompt: str = "The capital of"

    def source_specs(self) -> list[SourceSpec]:
        specs = [SourceSpec.from_dict(name, d) for name, d in self.sources.items()]
        specs = [s for s in specs if s.weight > 0]
        if not specs:
            raise PocketError("the data mixture has no source with a positive weight")
        return specs


class LanguageModeling(LoaderObjective):
    """The pretraining objective: cross-entropy of every next token in a packed row."""

    def loss(self, model):
        x, y = self.loader.next_batch()
        return model(x.to(self.device), targets=y.to(self.device)), {}


@torch.no_grad()
def evaluate_lm(model: GPT, loader: MixtureLoader, batches: int, token_bytes: torch.Tensor,
                device: torch.device, dtype: str) -> dict:
    """Mean loss (nats/token) and bits per byte over `batches` batches; summed over processes."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nats, tokens, bytes
    for _ in range(batches):
        x, y = loader.next_batch()
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            nats = model(x, targets=y, reduction="none")
        totals += torch.stack([nats.sum().double(), torch.tensor(float(y.numel()), device=device).double(),
                               token_bytes[y].sum().double()])
    if dist.is_initialized():
        dist.all_reduce(totals)
    model.train(was_training)
    nats, tokens, nbytes = totals.tolist()
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
        manifest = prepare_mixture(cfg.source_specs(), chat, data_dir, cfg.val_fraction, tc.seed,
                                   workers=max(1, torch.get_num_threads()), shard_tokens=cfg.shard_tokens)
        console.print(f"data ready in {time.time() - t0:.1f}s: " + ", ".join(
            f"{n} {human(e['train_tokens'])} tok" for n, e in manifest["sources"].items()))
    barrier(info)
    streams, weights = load_streams(data_dir, "train")
    loader = MixtureLoader(streams, weights, tc.batch_size, tc.seq_len, tc.seed, info.rank, info.world_size)
    val_streams, _ = load_streams(data_dir, "val")

    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    model_cfg = preset(cfg.preset, **{"vocab_size": tokenizer.vocab_size, **cfg.model})
    model_cfg.max_seq_len = max(model_cfg.max_seq_len, tc.seq_len)
    model = GPT(model_cfg).to(device)
    token_bytes = torch.tensor(tokenizer.byte_lengths(), device=device)

    def evaluate(m: GPT) -> dict:
        val = MixtureLoader(val_streams, weights, tc.batch_size, tc.seq_len, tc.seed + 1,
                            info.rank, info.world_size)
        return evaluate_lm(m, val, tc.eval_batches, token_bytes, device, tc.dtype)

    def sample(m: GPT) -> str:
        m.eval()
        prompt = chat.document(cfg.sample_prompt)
        params = SamplingParams(max_tokens=48, temperature=0.0, stop_tokens=chat.document_stops)
        text = cfg.sample_prompt + Engine(m, tokenizer).generate([prompt], params)[0].text
        m.train()
        return text

    meta = {"stage": "base", "preset": cfg.preset, "train": asdict(tc), "sources": cfg.sources}
    trainer = Trainer(model, LanguageModeling(loader, device), tc, out_dir, "pretrain",
                      run_dir / "metrics.jsonl", device, info, evaluate, sample)
    if resume:
        trainer.resume()
    model.train()
    if info.is_main:
        console.print(f"[bold]pretrain[/] {cfg.preset}: {human(model.num_params())} params "
                      f"({human(model.num_params(embeddings=False))} without embeddings), "
                      f"{human(model.flops_per_token(tc.seq_len))} FLOPs/token, vocab {tokenizer.vocab_size}, "
                      f"{info.world_size} process(es), device {device}, {torch.get_num_threads()} threads")
    summary = trainer.run()
    summary.update(params=model.num_params(), realised_mixture=loader.realised())
    if info.is_main:
        save_model(model, out_dir, chat, {**meta, "summary": summary})
    barrier(info)  # the next stage reads base/ on every process
    summary["output"] = str(out_dir)
    return summary

