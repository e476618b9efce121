"""Every stage under torchrun: two processes train like one process on the doubled batch.

Each comparison runs a stage twice from the same start (a tiny model briefly fine-tuned to count a
letter in a word, right about 40% of the time, so answers differ and rewards vary): once as one process with a global
batch of 2B, once under `torch.distributed.run --nproc_per_node 2` (gloo) with B per process.
Same seeds, float32, no dropout: the per-step losses and gradient norms must agree, and the final
weights must differ by less than WEIGHT_TOL of how far training moved them. Sampling, whitening, minibatches and
token means are defined over the global batch, so the only differences left are the order of float
additions. Pretraining under torchrun is tested in test_pretrain.py.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pocketgpt.checkpoint import load_model, save_model
from pocketgpt.common import read_jsonl
from pocketgpt.data.mixture import prepare_mixture
from pocketgpt.data.sources import SourceSpec
from pocketgpt.data.tasks import get_task
from pocketgpt.model import GPT, preset
from pocketgpt.train.sft import ConversationLoader

LOSS_TOL = 1e-4  # per-step loss, one process vs two (float32: measured differences ~1e-6)
GRAD_NORM_TOL = 2e-3  # relative, per step (measured up to 4e-4: Adam magnifies rounding in tiny gradients)
# Weight difference (L2 over all weights) as a share of the change training made (L2). Measured: PPO
# 9e-7, GRPO 2e-6, RM 2e-4 (its score head starts at 0, so its first gradients into the network are
# tiny, and Adam divides rounding noise in tiny gradients by their own size).
WEIGHT_TOL = 2e-3

# Runs a `pocketgpt` command; with KILL_AT_STEP set, every process SIGKILLs itself just before that step.
DRIVER = """
import os, signal, sys
from pocketgpt.train import loop
from pocketgpt.cli import main

kill_at = os.environ.get("KILL_AT_STEP")
if kill_at:
    original = loop.Trainer.train_step
    def train_step(self):
        if self.step == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self)
    loop.Trainer.train_step = train_step
sys.exit(main(sys.argv[1:]))
"""

# The compiled sampler (tested in test_rl_stages.py) would compile in every process: sampling stays eager.
CONFIG = """
[sft]
mitigate_hallucination = false
multi_turn_fraction = 0.0
[sft.tasks]
count_letter = {style = "direct", n = 64}
spell = {style = "direct", n = 64}
[sft.train]
steps = 4
seq_len = 48
lr = 1e-3
warmup_steps = 0
schedule = "constant"
save_every = 100
eval_every = 100
sample_every = 100
log_every = 1
dtype = "float32"
compile = false
threads = 1

[rm]
compile_sampling = false
tasks = ["count_letter"]
prompts_per_task = 8
val_prompts_per_task = 6
k = 4
max_tokens = 12
[rm.train]
steps = 4
seq_len = 128
lr = 1e-3
warmup_steps = 0
schedule = "constant"
save_every = 2
eval_every = 100
log_every = 1
dtype = "float32"
threads = 1

[ppo]
compile_sampling = false
tasks = ["count_letter"]
prompts_per_task = 24
ppo_epochs = 2
max_tokens = 12
eval_prompts_per_task = 6
ptx_seq_len = 32
[ppo.train]
steps = 6
lr = 5e-4
save_every = 100
eval_every = 100
dtype = "float32"
threads = 1

[grpo]
compile_sampling = false
tasks = ["count_letter"]
prompts_per_task = 24
group_size = 4
temperature = 1.0
max_tokens = 12
eval_n = 9
[grpo.train]
steps = 3
lr = 1e-3
save_every = 100
eval_every = 100
dtype = "float32"
threads = 1
"""

# What each process takes per step: one process gets twice as much.
PER_PROCESS = {
    "sft": {"sft.train.batch_size": 4},
    "rm": {"rm.train.batch_size": 2},
    "ppo": {"ppo.rollout_size": 4, "ppo.train.batch_size": 2, "ppo.ptx_batch_size": 2},
    "grpo": {"grpo.prompts_per_step": 2},
}


def launch(run: Path, args: list[str], processes: int, kill_at: int | None = None):
    """`pocketgpt ARGS` as one plain process or under torchrun with `processes` processes."""
    driver = run.parent / "driver.py"
    driver.write_text(DRIVER)
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if kill_at is not None:
        env["KILL_AT_STEP"] = str(kill_at)
    return subprocess.run([*launcher, str(driver), *args], capture_output=True, text=True, env=env, timeout=900)


def errors(done: subprocess.CompletedProcess) -> str:
    """The lines of a failed launch that say what went wrong (torchrun's summary buries them)."""
    return "\n".join(line for line in done.stderr.splitlines() if "rror" in line)[-4000:] or done.stderr[-4000:]


def run_stage(start: Path, run: Path, stage: str, processes: int, global_factor: int = 2,
              kill_at: int | None = None, resume: bool = False):
    """Run a stage on a copy of `start` (or on `run` itself when resuming), each process taking
    its share of a global batch `global_factor` times PER_PROCESS."""
    if not resume:
        shutil.copytree(start, run, ignore=shutil.ignore_patterns(stage))  # rm/ is PPO's input, the rm stage's output
    config = run / "run.toml"
    config.write_text(CONFIG)
    sets = [f"--set={key}={value * global_factor // processes}" for key, value in PER_PROCESS[stage].items()]
    done = launch(run, [stage, str(run), "--config", str(config), *sets, *(["--resume"] if resume else [])],
                  processes, kill_at)
    if kill_at is None:
        assert done.returncode == 0, errors(done)
    return done


@pytest.fixture(scope="module")
def start(tmp_path_factory, chat) -> Path:
    """A run directory with sft/ (a tiny model that counts letters, right about 40% of the time), rm/
    (the same network with a random scalar head, so rewards differ) and data/ (text for PPO-ptx)."""
    run = tmp_path_factory.mktemp("dist") / "start"
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=chat.tokenizer.vocab_size))
    task = get_task("count_letter")
    loader = ConversationLoader([chat.render(c) for c in task.render_each(task.examples("train")[:400], "direct")],
                                16, 64, chat.pad_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        x, y = loader.next_batch()
        model(x, targets=y).backward()
        optimizer.step()
        optimizer.zero_grad()
    save_model(model.eval(), run / "sft", chat, {"stage": "sft"})
    save_model(model, run / "base", chat, {"stage": "base"})  # what SFT starts from
    rm = model.with_score_head()
    torch.nn.init.normal_(rm.score.weight, std=0.5)
    save_model(rm, run / "rm", chat, {"stage": "rm"})
    (run / "text.jsonl").write_text("".join(json.dumps({"text": f"pretraining text {i}. " * 20}) + "\n"
                                            for i in range(10)))
    prepare_mixture([SourceSpec("text", "jsonl", path=str(run / "text.jsonl"))], chat, run / "data", val_fraction=0.2)
    return run


@pytest.fixture(scope="module")
def rm_one_process(start, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The reward model trained by one process on the doubled batch: the reference of two tests."""
    run = tmp_path_factory.mktemp("rm") / "one"
    return run, run_stage(start, run, "rm", processes=1)


def losses(run: Path, stage: str, key: str = "loss") -> dict[int, float]:
    records = [r for r in read_jsonl(run / "metrics.jsonl") if r["stage"] == stage and "loss" in r]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"{stage}: a step was logged twice: {steps}"
    return {r["step"]: r[key] for r in records}


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_model(model_dir)[0].state_dict()


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """L2 distance over the weights both hold (a reward model's scalar head is new)."""
    return torch.cat([(a[name] - b[name]).flatten().double() for name in a if name in b]).norm().item()


def assert_same_training(one: Path, two: Path, stage: str, model_dir: str, start_dir: Path, steps: int):
    a, b = losses(one, stage), losses(two, stage)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))  # one record per step: one process logs
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=LOSS_TOL), (stage, step, a[step], b[step])
    norms_a, norms_b = losses(one, stage, "grad_norm"), losses(two, stage, "grad_norm")
    for step in a:  # the gradients themselves, where a loss near 0 (GRPO's) says little
        assert norms_b[step] == pytest.approx(norms_a[step], rel=GRAD_NORM_TOL), (stage, step)
    w0, wa, wb = weights(start_dir), weights(one / model_dir), weights(two / model_dir)
    moved, differ = distance(wa, w0), distance(wa, wb)
    assert moved > 1e-2, f"{stage}: training hardly moved the weights ({moved:.2e}): nothing was compared"
    assert differ < WEIGHT_TOL * moved, (stage, differ, moved)


def test_sft_two_processes_match_one(start, tmp_path):
    """Rows hold different numbers of trained (assistant) tokens: each process averaged over its own before,
    so two processes weighed tokens unlike one process on the whole batch (loss 4.3254 against 4.2913)."""
    run_stage(start, tmp_path / "one", "sft", processes=1)
    run_stage(start, tmp_path / "two", "sft", processes=2)
    assert_same_training(tmp_path / "one", tmp_path / "two", "sft", "sft", start / "base", steps=4)


def test_reward_model_two_processes_match_one(start, rm_one_process, tmp_path):
    one_run, one = rm_one_process
    two = run_stage(start, tmp_path / "two", "rm", processes=2)
    assert_same_training(one_run, tmp_path / "two", "rm", "rm", start / "sft", steps=4)
    # The comparisons were sampled in two shares and gathered: the same data, the same held-out accuracy.
    data = [json.loads((run / "rm" / "rm_data.json").read_text()) for run in (one_run, tmp_path / "two")]
    assert data[0] == data[1] and data[0]["train_groups_with_pairs"] >= 4
    summaries = [load_model(run / "rm")[2]["meta"]["summary"] for run in (one_run, tmp_path / "two")]
    assert summaries[1]["val_pair_accuracy"] == pytest.approx(summaries[0]["val_pair_accuracy"], abs=1e-6)
    assert one.stderr.count("held-out pairwise accuracy") == two.stderr.count("held-out pairwise accuracy") == 1
    # the logged training accuracy pools the global batch's pairs (processes holding different numbers of them
    # averaged their own shares before)
    assert losses(tmp_path / "two", "rm", "pair_accuracy") == pytest.approx(losses(one_run, "rm", "pair_accuracy"),
                                                                              abs=1e-6)


def test_ppo_two_processes_match_one(start, tmp_path):
    run_stage(start, tmp_path / "one", "ppo", processes=1)
    two = run_stage(start, tmp_path / "two", "ppo", processes=2)
    # 6 steps: a rollout of 8 completions in minibatches of 4, twice, then a second rollout from the
    # trained policy: sampling after training must agree too.
    assert_same_training(tmp_path / "one", tmp_path / "two", "ppo", "ppo", start / "sft", steps=6)
    a, b = (json.loads((tmp_path / run / "ppo" / "ppo_summary.json").read_text()) for run in ("one", "two"))
    for when in ("before", "after"):
        for key, value in a[when].items():
            assert b[when][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (when, key)
    ptx = losses(tmp_path / "two", "ppo", "ptx_loss")  # the pretraining rows were split too
    assert ptx == pytest.approx(losses(tmp_path / "one", "ppo", "ptx_loss"), abs=LOSS_TOL)
    assert two.stderr.count("ppo end:") == 1


def test_grpo_two_processes_match_one(start, tmp_path):
    run_stage(start, tmp_path / "one", "grpo", processes=1)
    two = run_stage(start, tmp_path / "two", "grpo", processes=2)
    assert_same_training(tmp_path / "one", tmp_path / "two", "grpo", "grpo", start / "sft", steps=3)
    a, b = (json.loads((tmp_path / run / "grpo" / "grpo_summary.json").read_text()) for run in ("one", "two"))
    assert a["before"] == b["before"] and a["after"] == b["after"]  # 9 held-out questions, 4 + 5 per process
    rewards = [r["reward"] for r in read_jsonl(tmp_path / "one" / "metrics.jsonl") if "reward" in r]
    assert any(0 < r < 1 for r in rewards)  # some groups had right and wrong answers: there was a gradient
    assert two.stderr.count("grpo: held-out") == 1


def test_a_two_process_run_resumes_as_one_process(start, rm_one_process, tmp_path):
    """The reward model killed at step 3 under two processes (last checkpoint: step 2) continues as one
    process with the same global batch and ends where an uninterrupted one-process run ends."""
    killed = run_stage(start, tmp_path / "broken", "rm", processes=2, kill_at=3)
    assert killed.returncode != 0
    assert sorted(p.name for p in (tmp_path / "broken" / "rm" / "checkpoints").iterdir()) == ["step_0000002"]
    assert max(losses(tmp_path / "broken", "rm")) == 3
    run_stage(start, tmp_path / "broken", "rm", processes=1, resume=True)
    # Steps 3 and 4 (the logged step 3 was dropped on resume, then redone) continue the global data
    # order at the global position: a per-process position would replay or skip comparisons.
    assert_same_training(rm_one_process[0], tmp_path / "broken", "rm", "rm", start / "sft", steps=4)


def test_speedrun_under_torchrun_reaches_its_report_card(tmp_path):
    run = tmp_path / "speedrun"
    shrink = ["tokenizer.vocab_size=300", "tokenizer.max_chars=100000", "pretrain.train.steps=4",
              "pretrain.train.batch_size=4", "pretrain.train.seq_len=64", "pretrain.train.eval_every=4",
              "sft.train.steps=2", "sft.train.batch_size=4", "sft.train.seq_len=128", "sft.probe_samples=1",
              "sft_ablation=false", "rm.train.steps=2", "rm.train.batch_size=2", "rm.prompts_per_task=2",
              "rm.val_prompts_per_task=1", "rm.k=3", "rm.max_tokens=8", "ppo.train.steps=2", "ppo.rollout_size=2",
              "ppo.train.batch_size=2", "ppo.max_tokens=8", "ppo.eval_prompts_per_task=1", "ppo.ptx_batch_size=2",
              "ppo.ptx_seq_len=64", "grpo.train.steps=1", "grpo.prompts_per_step=1", "grpo.group_size=2",
              "grpo.max_tokens=8", "grpo.eval_n=2", "eval.n=2"]
    shrink += [f"pretrain.sources.{name}.max_bytes=60000" for name in ("world", "chat", "docs", "code")]
    shrink += ["pretrain.sources.math.n=200", "pretrain.model.max_seq_len=512"]  # room for few-shot probe prompts
    shrink += [f"{stage}.train.log_every=1" for stage in ("pretrain", "sft", "rm")]
    shrink += [f"sft.tasks.{task}.n=4" for task in ("factqa", "arithmetic", "compare_decimals", "count_letter",
                                                     "spell", "game24", "multihop", "structured", "names")]
    done = launch(run, ["speedrun", "--quick", "--out", str(run), *(f"--set={s}" for s in shrink)], processes=2)
    assert done.returncode == 0, errors(done)
    assert (run / "report.md").exists() and json.loads((run / "speedrun.json").read_text())["total_seconds"] > 0
    for stage, steps in (("pretrain", 4), ("sft", 2), ("rm", 2), ("ppo", 2), ("grpo", 1)):
        assert sorted(losses(run, stage)) == list(range(1, steps + 1)), stage
    for model_dir in ("base", "sft", "rm", "ppo", "grpo"):
        assert load_model(run / model_dir)[2]["meta"]["stage"] == model_dir
    for evaluated in ("base", "sft", "ppo", "grpo"):  # dealt out to the two processes
        assert "copying" in json.loads((run / evaluated / "eval" / "results.json").read_text())
    assert done.stderr.count("4. reward model") == 1  # one process speaks


def test_counts_are_summed_in_float64_where_the_device_has_it():
    """Every stage's evaluation summed its counts in a float64 tensor on the model's device, which MPS refuses
    (the first evaluation failed there): they are summed on the CPU unless nccl needs them on the GPU."""
    from pocketgpt.common import DistInfo
    from pocketgpt.train.data_parallel import count_totals

    assert count_totals([1.0, 2 ** 24 + 1.0], DistInfo(), torch.device("mps")) == [1.0, 2 ** 24 + 1.0]


def test_processes_wait_hours_for_the_first_one_to_tokenize(monkeypatch):
    """PyTorch's default (30 min on gloo) ended a run whose process 0 was still tokenizing a large corpus while
    the others waited at the barrier after it."""
    import datetime

    import torch.distributed as dist

    from pocketgpt.common import init_distributed

    joined = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **settings: joined.update(settings))
    for name, value in (("RANK", "1"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    assert init_distributed(torch.device("cpu")).rank == 1
    assert joined["backend"] == "gloo" and joined["timeout"] >= datetime.timedelta(hours=12)
