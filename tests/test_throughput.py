import statistics

import pytest
import torch

from pocketgpt.common import DistInfo, read_jsonl
from pocketgpt.model import GPT, preset
from pocketgpt.train import throughput
from pocketgpt.train.loop import TrainConfig, Trainer
from pocketgpt.train.throughput import matmul_shapes, measured_peak, mfu


def test_matmul_shapes_are_the_models_distinct_weights():
    model = GPT(preset("tiny", vocab_size=512))  # d 64, 4 heads, 2 K/V heads of 16, d_ff 192
    assert matmul_shapes(model, 1000) == ((1000, 64, 32), (1000, 64, 64), (1000, 64, 192), (1000, 64, 512),
                                          (1000, 192, 64))
    assert {rows for rows, _, _ in matmul_shapes(model, 10**6)} == {4096}  # capped: enough to reach the peak


def test_a_lora_model_is_measured_by_its_frozen_base_and_its_adapters():
    from pocketgpt.train.lora import apply_lora

    model = GPT(preset("tiny", vocab_size=512))
    shapes, full = matmul_shapes(model, 1000), model.flops_per_token(64)
    attention = 12 * model.cfg.n_layer * model.cfg.d_model * 64
    weights = (full - attention) // 6  # every matmul weight trains: 6 FLOPs each
    apply_lora(model, r=4)
    adapters = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    # The peak is measured on the base layers' shapes (LoRA's layers are not nn.Linear) ...
    assert matmul_shapes(model, 1000) == shapes
    # ... and a frozen weight costs no gradient of its own: 4 FLOPs, the adapters 6.
    assert model.flops_per_token(64) == 4 * weights + 6 * adapters + attention


def test_a_reward_model_never_computes_the_logits():
    model = GPT(preset("tiny", vocab_size=512))
    rm = model.with_score_head()
    d, vocab = model.cfg.d_model, model.cfg.vocab_size
    assert rm.flops_per_token(64) == model.flops_per_token(64) - 6 * vocab * d + 6 * d  # no LM head; the score head


def test_measured_peak_is_cached_per_process(monkeypatch):
    model = GPT(preset("tiny", vocab_size=512))
    monkeypatch.setattr(throughput, "_best_peaks", {})  # this test's peaks stay its own
    peak = measured_peak(model, 256, torch.device("cpu"), "float32")
    measured = []
    monkeypatch.setattr(throughput, "matmul_peak", lambda *a: measured.append(a) or peak / 2)
    assert measured_peak(model, 256, torch.device("cpu"), "float32") == peak > 0 and not measured  # not measured again
    assert measured_peak(model, 256, torch.device("cpu"), "float32", again=True) == peak and len(measured) == 1  # lower: kept
    monkeypatch.setattr(throughput, "matmul_peak", lambda *a: peak * 2)
    assert measured_peak(model, 256, torch.device("cpu"), "float32", again=True) == peak * 2  # higher: taken


def test_mfu_counts_every_process_against_its_own_peak():
    assert mfu(6e6, 1000, 1e10) == 0.6
    assert mfu(6e6, 1000, 1e10, DistInfo(rank=0, local_rank=0, world_size=2)) == 0.3


class RandomTokens:
    """Language modelling on a fixed random batch: enough to drive the loop."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 512, (4, 32), generator=g)
        self.y = torch.randint(0, 512, (4, 32), generator=g)

    def loss(self, model):
        return model(self.x, targets=self.y), {}

    def tokens_per_micro_step(self) -> int:
        return self.x.numel()

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass


def test_trainer_reports_tokens_per_second_and_mfu(tmp_path):
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=512))
    cfg = TrainConfig(steps=4, batch_size=4, seq_len=32, warmup_steps=1, log_every=1, save_every=100)
    trainer = Trainer(model, RandomTokens(), cfg, tmp_path / "out", "pretrain", tmp_path / "metrics.jsonl",
                      torch.device("cpu"))
    first = measured_peak(model, 128, torch.device("cpu"), trainer.dtype)
    summary = trainer.run()
    steps = [r for r in trainer.history if "loss" in r]
    assert len(steps) == 4 and all(0 < r["mfu"] < 1 for r in steps)
    # measured again at the end, the higher kept: what later calls return
    assert summary["peak_flops"] >= first and summary["peak_flops"] == measured_peak(
        model, 128, torch.device("cpu"), trainer.dtype)
    # the summary's speed is the median step's (compilation and evaluation do not count), and its MFU follows
    assert summary["tokens_per_s"] == statistics.median(r["tokens_per_s"] for r in steps)
    assert summary["tokens"] == 4 * 128 and all(r["tokens"] == 128 for r in steps)
    expected = mfu(model.flops_per_token(32), summary["tokens_per_s"], summary["peak_flops"])
    assert summary["mfu"] == pytest.approx(expected, rel=1e-12)


def test_a_steps_mfu_above_one_measures_the_peak_again(tmp_path, monkeypatch):
    """A peak measured in a slow second at the start put every step's MFU at 323%; only the summary, measured
    again at the end, said otherwise."""
    model = GPT(preset("tiny", vocab_size=512))
    monkeypatch.setattr(throughput, "_best_peaks", {})
    peaks = iter([1.0, 1e15])  # FLOP/s: the start's absurdly slow moment, then any real machine's at most
    monkeypatch.setattr(throughput, "matmul_peak", lambda *a: next(peaks, 1e15))
    cfg = TrainConfig(steps=3, batch_size=4, seq_len=32, warmup_steps=1, log_every=1, save_every=100)
    Trainer(model, RandomTokens(), cfg, tmp_path / "out", "pretrain", tmp_path / "metrics.jsonl",
            torch.device("cpu")).run()
    steps = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert len(steps) == 3 and all(0 < r["mfu"] < 1 for r in steps)


class PaddedAndSampled(RandomTokens):
    """Rows of which 100 tokens are real (the rest padding), and 60 more tokens sampled, per micro-step."""

    def loss(self, model):
        loss, _ = super().loss(model)
        return loss, {"tokens": 100.0, "forward_tokens": 60.0}


def test_tokens_per_second_and_mfu_count_what_the_objective_says_it_did(tmp_path):
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=512))
    cfg = TrainConfig(steps=3, batch_size=4, seq_len=32, warmup_steps=1, log_every=1, save_every=100, grad_accum=2)
    trainer = Trainer(model, PaddedAndSampled(), cfg, tmp_path / "out", "rm", tmp_path / "metrics.jsonl",
                      torch.device("cpu"))
    peak = measured_peak(model, 128, torch.device("cpu"), trainer.dtype)  # the steps' (the end measures again)
    summary = trainer.run()
    steps = [r for r in trainer.history if "loss" in r]
    assert summary["tokens"] == 3 * 200 and all(r["tokens"] == 200 and r["forward_tokens"] == 120 for r in steps)
    for r in steps:  # a sampled token is a third of a trained one's FLOPs
        seconds = 200 / r["tokens_per_s"]
        assert r["mfu"] == pytest.approx(mfu(model.flops_per_token(32), (200 + 120 / 3) / seconds, peak), rel=1e-6)
