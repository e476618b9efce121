"""Pretraining end to end on tiny configs: learning, exact resume after SIGKILL, DDP with two processes."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from pocketgpt.checkpoint import load_model
from pocketgpt.common import read_jsonl
from pocketgpt.train.pretrain import CopyWarmup

CONFIG = """
[pretrain]
preset = "tiny"
[pretrain.train]
steps = {steps}
batch_size = {batch}
seq_len = 64
lr = 0.003
warmup_steps = 3
eval_every = {eval_every}
eval_batches = 2
log_every = 1
save_every = {save_every}
sample_every = 1000
threads = 1
dtype = "{dtype}"
[pretrain.sources.docs]
max_bytes = 150000
[pretrain.sources.code]
max_bytes = 150000
"""


def make_run(tmp_path, tokenizer, name, steps=12, batch=8, save_every=5, eval_every=100, dtype="auto", extra=""):
    run = tmp_path / name
    tokenizer.save(run / "tokenizer" / "tokenizer.json")
    cfg = run / "run.toml"
    text = CONFIG.format(steps=steps, batch=batch, save_every=save_every, eval_every=eval_every, dtype=dtype)
    cfg.write_text(text.replace('preset = "tiny"\n', 'preset = "tiny"\n' + extra))  # extra: [pretrain] keys
    return run, cfg


def run_cli(args, kill_at_step=None, launcher=()):
    """Run `pocketgpt` in a fresh process; optionally SIGKILL it just before a given optimizer step."""
    code = textwrap.dedent(f"""
        import os, signal, sys
        from pocketgpt.train import loop
        from pocketgpt.cli import main
        kill_at = {kill_at_step!r}
        if kill_at is not None:
            original = loop.Trainer.train_step
            def train_step(self):
                if self.step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return original(self)
            loop.Trainer.train_step = train_step
        sys.exit(main({list(args)!r}))
    """)
    cmd = [*launcher, "-m", "pocketgpt.cli", *args] if launcher else [sys.executable, "-c", code]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def losses(run):
    return {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}


def test_pretrain_learns_and_writes_a_model(tmp_path, tokenizer):
    run, cfg = make_run(tmp_path, tokenizer, "learn", steps=30, eval_every=15)
    done = run_cli(["pretrain", str(run), "--config", str(cfg)])
    assert done.returncode == 0, done.stderr
    records = read_jsonl(run / "metrics.jsonl")
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(vals) == 2 and vals[1] < vals[0]
    assert losses(run)[30] < losses(run)[1] - 0.5
    assert all(0 < r["val_bpb"] < 10 for r in records if "val_bpb" in r)
    model, tok, meta = load_model(run)
    assert meta["meta"]["summary"]["steps"] == 30
    assert "realised mixture" in done.stdout and "val loss" in done.stdout
    again = run_cli(["pretrain", str(run), "--config", str(cfg)])
    assert again.returncode == 2 and "--resume" in again.stderr


def test_sigkill_then_resume_reproduces_the_loss_curve(tmp_path, tokenizer):
    whole, cfg_a = make_run(tmp_path, tokenizer, "whole")
    assert run_cli(["pretrain", str(whole), "--config", str(cfg_a)]).returncode == 0

    broken, cfg_b = make_run(tmp_path, tokenizer, "broken")
    killed = run_cli(["pretrain", str(broken), "--config", str(cfg_b)], kill_at_step=8)
    assert killed.returncode == -9  # really killed, no chance to save
    assert sorted(p.name for p in (broken / "base" / "checkpoints").iterdir()) == ["step_0000005"]
    assert max(losses(broken)) == 8
    resumed = run_cli(["pretrain", str(broken), "--config", str(cfg_b), "--resume"])
    assert resumed.returncode == 0, resumed.stderr

    a, b = losses(whole), losses(broken)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in range(6, 13):
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])


def test_copy_warmup_comes_before_the_mixture_and_resumes_exactly(tmp_path, tokenizer):
    """Six steps of repeated random segments, then the mixture: the mixture sees only the remaining steps'
    rows, copy accuracy is reported, and a run killed inside the warm-up resumes onto the same curve."""
    extra = "copy_warmup = 6\nmodel = {smear_keys = true}\n"
    whole, cfg_a = make_run(tmp_path, tokenizer, "whole", eval_every=6, extra=extra)
    done = run_cli(["pretrain", str(whole), "--config", str(cfg_a)])
    assert done.returncode == 0, done.stderr
    summary = load_model(whole)[2]["meta"]["summary"]
    assert summary["copy_warmup_tokens"] == 6 * 8 * 64
    assert sum(s["tokens"] for s in summary["realised_mixture"].values()) == (12 - 6) * 8 * 64
    copy_evals = [r for r in read_jsonl(whole / "metrics.jsonl") if "copy_acc" in r]
    assert [r["step"] for r in copy_evals] == [6, 12] and all(0 <= r["copy_acc"] <= 1 for r in copy_evals)

    broken, cfg_b = make_run(tmp_path, tokenizer, "broken", eval_every=6, extra=extra)
    assert run_cli(["pretrain", str(broken), "--config", str(cfg_b)], kill_at_step=7).returncode == -9
    resumed = run_cli(["pretrain", str(broken), "--config", str(cfg_b), "--resume"])  # from step 5, in the warm-up
    assert resumed.returncode == 0, resumed.stderr
    a, b = losses(whole), losses(broken)
    for step in range(6, 13):
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])


def test_copy_warmup_draws_ordinary_tokens_and_each_process_its_own_rows(tokenizer):
    specials = set(tokenizer.special_ids.values())
    a = CopyWarmup(2, rows=4, seq_len=64, tokenizer=tokenizer, seed=0)
    b = CopyWarmup(2, rows=4, seq_len=64, tokenizer=tokenizer, seed=1)
    assert specials and set(a.tokens.tolist()) == set(range(tokenizer.vocab_size)) - specials
    x, y = a.next_batch()
    assert x.shape == y.shape == (4, 64) and not set(x.flatten().tolist()) & specials
    assert not (b.next_batch()[0] == x).all()
    assert (a.held_out()[0] == b.held_out()[0]).all()  # every process evaluates the same rows
    assert a.pending() and a.next_batch() and not a.pending()


def test_copy_warmup_must_leave_steps_for_the_mixture(tmp_path, tokenizer):
    run, cfg = make_run(tmp_path, tokenizer, "all_warmup", extra="copy_warmup = 12\n")
    done = run_cli(["pretrain", str(run), "--config", str(cfg)])
    assert done.returncode == 2 and "copy_warmup" in done.stderr


def test_a_validation_split_shorter_than_a_row_is_refused_before_training(tmp_path, tokenizer):
    """Its loader was built at the first evaluation: the run failed there and the steps before it were lost."""
    run, cfg = make_run(tmp_path, tokenizer, "short_val", extra="val_fraction = 0.0001\n")
    done = run_cli(["pretrain", str(run), "--config", str(cfg)])
    assert done.returncode == 2 and "the validation split is too short: source" in done.stderr, done.stderr
    assert "raise pretrain.val_fraction, now 0.0001" in done.stderr and not (run / "metrics.jsonl").exists()


def test_ddp_two_processes_match_one(tmp_path, tokenizer):
    single, cfg_1 = make_run(tmp_path, tokenizer, "single", steps=6, batch=8, dtype="float32")
    assert run_cli(["pretrain", str(single), "--config", str(cfg_1)]).returncode == 0
    ddp, cfg_2 = make_run(tmp_path, tokenizer, "ddp", steps=6, batch=4, dtype="float32")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = run_cli(["pretrain", str(ddp), "--config", str(cfg_2)], launcher=torchrun)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = losses(single), losses(ddp)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=2e-3)
    assert a[6] < a[1]


def test_compiled_training_follows_the_eager_loss_curve(tmp_path, tokenizer):
    """`train.compile` changes the speed, not the training: the same steps give the same losses (fp32, so
    that only the compiled kernels' summation order differs), and the run writes the compile time."""
    eager, cfg_e = make_run(tmp_path, tokenizer, "eager", steps=6, dtype="float32")
    assert run_cli(["pretrain", str(eager), "--config", str(cfg_e)]).returncode == 0
    compiled, cfg_c = make_run(tmp_path, tokenizer, "compiled", steps=6, dtype="float32")
    done = run_cli(["pretrain", str(compiled), "--config", str(cfg_c), "--set", "pretrain.train.compile=true"])
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = losses(eager), losses(compiled)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-4)
    _, _, meta = load_model(compiled)
    assert meta["meta"]["summary"]["compile_s"] > 0


def test_a_compiled_run_trains_the_same_model_every_time(tmp_path, tokenizer):
    """The same seed, the same model: the compiled step's kernels are deterministic by default
    (`train.deterministic`); with `train.deterministic=false` the two runs' weights differ, since two threads
    sum the embedding's gradient in an order that changes from run to run."""
    weights = []
    for name in ("first", "second"):
        run, cfg = make_run(tmp_path, tokenizer, name, steps=4, batch=16)
        done = run_cli(["pretrain", str(run), "--config", str(cfg), "--set", "pretrain.train.compile=true",
                        "--set", "pretrain.train.threads=2"])
        assert done.returncode == 0, done.stderr[-3000:]
        weights.append(load_file(run / "base" / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
