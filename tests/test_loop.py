"""The training loop: when it evaluates, which optimizer a name gives, what a NaN loss tells the user."""

import math
import os
import signal

import pytest
import torch

from pocketgpt.checkpoint import latest_training_state
from pocketgpt.common import PocketError, read_jsonl
from pocketgpt.errors import Interrupted
from pocketgpt.train.loop import TrainConfig, Trainer, make_optimizer, use_deterministic_kernels


def test_log_spaced_evaluation_thins_out_by_decade():
    cfg = TrainConfig(steps=25_000, eval_every=10, eval_log_spaced=True)
    steps = [s for s in range(1, 25_001) if cfg.evaluates_at(s)]
    assert steps[:3] == [10, 20, 30] and steps[98:101] == [990, 1000, 1100]
    assert steps[-3:] == [23_000, 24_000, 25_000] and 9_900 in steps and 10_000 in steps and 10_500 not in steps
    assert len(steps) == 99 + 90 + 16  # 10..990, 1000..9900, 10000..25000
    plain = TrainConfig(steps=1_005, eval_every=100)
    assert [s for s in range(1, 1_006) if plain.evaluates_at(s)] == [100 * k for k in range(1, 11)] + [1_005]


@pytest.mark.parametrize("schedule, expected", [
    # 2 warm-up steps to lr 1.0, then 10 steps (progress 0.1 a step) down to the floor of 0.1
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("cosine", [0.5, 1.0] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 10)) for k in range(10)]),
    ("wsd", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.55]),  # the last 20% decays linearly
])
def test_the_learning_rate_follows_its_schedule_and_the_optimizer_trains_at_it(tmp_path, schedule, expected):
    """No test read the learning rate: the schedules (the speedrun's wsd among them) could be taken out unseen."""
    cfg = TrainConfig(steps=12, warmup_steps=2, lr=1.0, min_lr_frac=0.1, schedule=schedule, eval_every=1000,
                      log_every=1, device="cpu")
    assert [cfg.lr_at(step) for step in range(12)] == pytest.approx(expected)
    metrics = tmp_path / "metrics.jsonl"
    Trainer(torch.nn.Linear(2, 1), _Batches(), cfg, tmp_path / "sft", "sft", metrics, torch.device("cpu")).run()
    assert [r["lr"] for r in read_jsonl(metrics) if "lr" in r] == pytest.approx(expected)


def test_adam_adds_weight_decay_to_the_gradient_adamw_apart_from_it():
    """With a zero gradient, AdamW shrinks a weight by lr * wd * w; Adam's L2 term becomes the whole
    normalised update (one lr step against the weight's sign): far stronger once the loss is flat."""
    results = {}
    for name in ("adamw", "adam"):
        layer = torch.nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 4.0]]))
        opt = make_optimizer(layer, TrainConfig(optimizer=name, lr=0.1, weight_decay=0.01))
        layer.weight.grad = torch.zeros(2, 2)
        opt.step()
        results[name] = layer.weight.detach().clone()
    w = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    torch.testing.assert_close(results["adamw"], w * (1 - 0.1 * 0.01))
    torch.testing.assert_close(results["adam"], w - 0.1 * torch.sign(w), atol=1e-6, rtol=0)


def test_each_stage_sets_the_deterministic_mode_either_way():
    """The mode is process-wide: a stage with `deterministic = false` after one with it on (a speedrun runs
    every stage in one process) gets PyTorch's fastest kernels, not the earlier stage's choice."""
    was = torch.are_deterministic_algorithms_enabled()
    try:
        use_deterministic_kernels(True)
        assert torch.are_deterministic_algorithms_enabled()
        use_deterministic_kernels(False)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        use_deterministic_kernels(was)


class _NaNLoss:
    """An objective whose loss is NaN from the first step."""

    def loss(self, model):
        return torch.tensor(float("nan"), requires_grad=True), {}

    def tokens_per_micro_step(self):
        return 1


@pytest.mark.parametrize("compile", [False, True])
def test_a_nan_loss_stops_the_stage_with_what_to_try(tmp_path, compile):
    """Lowering the learning rate is the usual cure; when the step is compiled, training without the
    compiler is the other thing to try (a compiled bf16 step went NaN where eager did not)."""
    cfg = TrainConfig(steps=2, compile=compile, device="cpu")
    trainer = Trainer(torch.nn.Linear(2, 2), _NaNLoss(), cfg, tmp_path, "pretrain", tmp_path / "metrics.jsonl",
                      torch.device("cpu"))
    with pytest.raises(PocketError, match="loss became nan at step 0; lower the learning rate") as error:
        trainer.train_step()
    assert ("train.compile = false" in str(error.value)) == compile


class _CtrlC:
    """A linear model's loss, until the user presses Ctrl-C during the micro-step numbered `at`."""

    def __init__(self, at: int):
        self.calls, self.at = 0, at

    def loss(self, model):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return model(torch.ones(1, 2)).square().sum(), {}

    def tokens_per_micro_step(self):
        return 1

    def state(self):
        return {}

    def load_state(self, state):
        pass


def test_ctrl_c_saves_the_state_and_ends_the_stage_instead_of_finishing_it(tmp_path):
    """An interrupted stage returned as if finished: the speedrun went on to SFT on a half-trained base."""
    cfg = TrainConfig(steps=10, eval_every=1000, device="cpu")
    trainer = Trainer(torch.nn.Linear(2, 2), _CtrlC(at=4), cfg, tmp_path, "pretrain", tmp_path / "metrics.jsonl",
                      torch.device("cpu"))
    with pytest.raises(Interrupted, match="pretrain interrupted at step 3 of 10; its checkpoint is in") as e:
        trainer.run()
    assert isinstance(e.value, PocketError) and latest_training_state(tmp_path).name == "step_0000003"
    again = Trainer(torch.nn.Linear(2, 2), _CtrlC(at=0), cfg, tmp_path, "pretrain", tmp_path / "metrics.jsonl",
                    torch.device("cpu"))
    assert again.resume() and again.step == 3
    assert again.run()["steps"] == 10


class _Batches:
    """A loss over a stream of batches whose position is the objective's state; `signal_at`: a real Ctrl-C
    (SIGINT to this process) arrives while that batch is being trained on."""

    def __init__(self, signal_at: int = 0):
        self.position, self.signal_at = 0, signal_at

    def loss(self, model):
        self.position += 1
        x = torch.tensor([[float(self.position), 1.0]])
        if self.position == self.signal_at:
            os.kill(os.getpid(), signal.SIGINT)
        return (model(x) - self.position % 3).square().sum(), {}

    def tokens_per_micro_step(self):
        return 1

    def state(self):
        return {"position": self.position}

    def load_state(self, state):
        self.position = state["position"]


def test_a_ctrl_c_mid_step_resumes_to_the_same_model(tmp_path):
    """Caught mid-step, the loader had handed out that step's batch and the saved state skipped it: the
    resumed run trained another model. The first Ctrl-C now stops after the step it lands in."""
    cfg = TrainConfig(steps=8, eval_every=1000, device="cpu", lr=0.01, warmup_steps=0)

    def trainer(objective, out):
        torch.manual_seed(0)
        return Trainer(torch.nn.Linear(2, 1), objective, cfg, out, "sft", out / "metrics.jsonl", torch.device("cpu"))

    whole = trainer(_Batches(), tmp_path / "whole")
    whole_summary = whole.run()
    cut = trainer(_Batches(signal_at=4), tmp_path / "cut")
    with pytest.raises(Interrupted, match="interrupted at step 4 of 8"):
        cut.run()
    again = trainer(_Batches(), tmp_path / "cut")
    assert again.resume() and again.step == 4
    summary = again.run()
    for a, b in zip(whole.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)
    # the stage's tokens and time over both invocations (the summary and the report card counted the last)
    assert summary["tokens"] == whole_summary["tokens"] == 8 and summary["time_s"] > again.seconds_before > 0


def test_a_stage_trained_again_keeps_only_its_new_metrics(tmp_path):
    """"Delete RUN/sft to train it again": the new training's records were appended to the old ones, and the
    curves drew both as one line that jumped back to step 1. Other stages' records stay."""
    import shutil

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"stage": "pretrain", "step": 1, "loss": 9.0}\n')
    cfg = TrainConfig(steps=3, eval_every=1000, log_every=1, device="cpu", lr=0.01, warmup_steps=0)
    for _ in range(2):
        shutil.rmtree(tmp_path / "sft", ignore_errors=True)
        Trainer(torch.nn.Linear(2, 1), _Batches(), cfg, tmp_path / "sft", "sft", metrics, torch.device("cpu")).run()
    records = read_jsonl(metrics)
    assert [r["step"] for r in records if r["stage"] == "sft" and "loss" in r] == [1, 2, 3]
    assert records[0] == {"stage": "pretrain", "step": 1, "loss": 9.0}


def test_a_resume_whose_tokenizer_changed_is_refused(tmp_path):
    """Retraining a run's tokenizer, then `pretrain --resume`, continued the old weights on other token ids."""
    def trainer(fingerprint: str, at: int) -> Trainer:
        t = Trainer(torch.nn.Linear(2, 2), _CtrlC(at), TrainConfig(steps=10, eval_every=1000, device="cpu"), tmp_path,
                    "pretrain", tmp_path / "metrics.jsonl", torch.device("cpu"))
        t.identity = {"tokenizer": fingerprint}
        return t

    with pytest.raises(Interrupted):
        trainer("abc", at=3).run()
    with pytest.raises(PocketError, match=r"with another tokenizer \(abc; the run's is now xyz\): restore it, or delete"):
        trainer("xyz", at=0).resume()
    assert trainer("abc", at=0).resume()


def test_a_resume_past_the_steps_asked_is_refused(tmp_path):
    """`--resume --steps 4` on a step-6 state saved a 6-step model labelled 4 steps and deleted the state."""
    def trainer(steps: int, at: int) -> Trainer:
        return Trainer(torch.nn.Linear(2, 2), _CtrlC(at), TrainConfig(steps=steps, eval_every=1000, device="cpu"),
                       tmp_path, "pretrain", tmp_path / "metrics.jsonl", torch.device("cpu"))

    with pytest.raises(Interrupted):
        trainer(10, at=7).run()
    with pytest.raises(PocketError, match="is at step 6, past train.steps = 4: ask for at least 6 steps"):
        trainer(4, at=0).resume()


def test_a_resume_on_another_optimizer_or_a_damaged_state_is_one_line(tmp_path):
    """A changed train.optimizer, or an optimizer.pt cut short, ended the resume in a torch traceback."""
    def trainer(optimizer: str = "adamw", at: int = 0) -> Trainer:
        return Trainer(torch.nn.Linear(2, 2), _CtrlC(at), TrainConfig(steps=10, eval_every=1000, device="cpu",
                                                                       optimizer=optimizer),
                       tmp_path, "pretrain", tmp_path / "metrics.jsonl", torch.device("cpu"))

    with pytest.raises(Interrupted):
        trainer(at=3).run()
    with pytest.raises(PocketError, match=r"with another optimizer \(adamw; the run's is now sgd\)"):
        trainer("sgd").resume()
    state = latest_training_state(tmp_path)
    blob = (state / "optimizer.pt").read_bytes()
    (state / "optimizer.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(PocketError, match=r"optimizer.pt cannot be loaded \(.*\): delete .* to train the stage from"):
        trainer().resume()
    (state / "state.json").write_text("{not json")
    with pytest.raises(PocketError, match=r"state.json is unreadable .*: delete"):
        trainer().resume()
