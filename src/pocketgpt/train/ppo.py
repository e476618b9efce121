"""RLHF with PPO: sample, score with the frozen reward model, reinforce good tokens, punish bad ones.

    policy (from SFT, trained)       reference (SFT, frozen)       reward model (frozen)
    value model (from the reward model, trained)

One rollout: answer a batch of prompts with the policy; the reward model scores each answer at its
end; every token also pays beta * (log pi - log pi_ref), a KL penalty that keeps the policy near the
SFT model (and away from reward hacking). GAE (gamma = 1, lambda ~ 0.95) turns the per-token rewards
into advantages, whitened over the batch. Then several epochs of clipped policy and value updates
on minibatches of that rollout; each minibatch update is one step of the shared training loop.
Each update also takes a next-token loss on a batch of pretraining text (InstructGPT's PPO-ptx):
RL on one reward drifts the whole network, and the pretraining loss pulls back what it forgets.

Reward hacking is real: the report shows task accuracy before and after, not only the reward.

Under torchrun a rollout is global: rollout_size completions per process, each process sampling
and scoring its share of the prompts. Advantages are whitened with the mean and variance of the
whole rollout, minibatches are the same for any number of processes (`minibatches`), and the
policy and value losses are means over all the minibatch's tokens, not over one process's tokens.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoint import load_model, save_model
from ..common import DistInfo, PocketError, atomic_write_json, console
from ..config import require
from ..data.mixture import MixtureLoader, load_streams
from ..data.tasks import TASKS
from ..model import GPT
from .data_parallel import barrier, count_totals, share, share_of_global_mean, sum_over_processes
from .loop import TrainConfig, Trainer, stage_setup
from .reward import RM_TASKS
from .rl_math import gae, kl_penalty_rewards, masked_mean, masked_whiten, ppo_policy_loss, ppo_value_loss
from .rollout import Prompt, chat_params, collate, policy_logprobs, sample, scored_sequence, task_prompts


@dataclass
class PPOConfig:
    # lr 1e-5: 2e-5 raised the held-out reward as much, but held-out accuracy slipped (25.8% -> 24.2%).
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=64, batch_size=8, seq_len=384, lr=1e-5, warmup_steps=0, schedule="constant", grad_clip=1.0,
        weight_decay=0.0, eval_every=16, save_every=16, sample_every=10**9, log_every=1))
    tasks: list = field(default_factory=lambda: list(RM_TASKS))
    prompts_per_task: int = 200
    rollout_size: int = 32  # completions per rollout and process; minibatches of train.batch_size
    ppo_epochs: int = 2
    temperature: float = 1.0
    max_tokens: int = 128
    compile_sampling: bool = True  # a compiled decode step (rollout.sample): faster after a one-time compile
    beta: float = 0.05  # KL penalty per token
    # Weight of the pretraining loss in each update (0: plain PPO). Without it, PPO here gave up 3-5
    # points of head-fact or letter-counting accuracy for reward, whatever beta (0.05 to 0.3).
    ptx_coef: float = 1.0
    ptx_batch_size: int = 4  # rows of pretraining text per update, of ptx_seq_len tokens
    ptx_seq_len: int = 256  # at most the model's context
    kl_bound: float = 8.0  # the run is reported as within bounds if the mean sequence KL stays below this
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.5
    lam: float = 0.95
    eval_prompts_per_task: int = 20
    seed: int = 0

    def __post_init__(self):
        self.check_values()

    def check_values(self) -> None:
        """rollout_size 0, ppo_epochs 0, ptx_batch_size 0, eval_prompts_per_task 0 or no tasks ended in
        tracebacks; clip -1 or lam 2 trained without a word."""
        require("ppo", {
            "tasks": (self.tasks, bool(self.tasks) and all(t in TASKS for t in self.tasks),
                      f"a list of at least one task of {', '.join(TASKS)}"),
            **{name: (getattr(self, name), getattr(self, name) >= 1, "at least 1")
               for name in ("prompts_per_task", "rollout_size", "ppo_epochs", "max_tokens", "ptx_batch_size",
                            "eval_prompts_per_task")},
            "ptx_seq_len": (self.ptx_seq_len, self.ptx_seq_len >= 2, "at least 2"),
            **{name: (getattr(self, name), 0 <= getattr(self, name) < math.inf, "a number >= 0")
               for name in ("temperature", "beta", "ptx_coef", "vf_coef")},
            **{name: (getattr(self, name), 0 < getattr(self, name) < math.inf, "a number > 0")
               for name in ("kl_bound", "clip", "value_clip")},
            "lam": (self.lam, 0 <= self.lam <= 1, "in [0, 1]"),
        })


class PolicyAndValue(nn.Module):
    """The two trained networks in one module, so the shared loop optimises and checkpoints both."""

    def __init__(self, policy: GPT, value: GPT):
        super().__init__()
        self.policy, self.value = policy, value


@dataclass
class Rollout:
    ids: torch.Tensor
    mask: torch.Tensor
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    lengths: torch.Tensor  # each row's tokens before its padding


@torch.no_grad()
def score(rm: GPT, sequences: list[list[int]], chat, device) -> torch.Tensor:
    """The reward model's score for each finished sequence, read where the chat template says
    (ours: at an appended <|reward|>)."""
    scored = [scored_sequence(chat, s, rm.cfg.max_seq_len) for s in sequences]
    ids, _ = collate(scored, [1] * len(scored), chat.pad_id, device)
    last = torch.tensor([len(s) - 1 for s in scored], device=device)
    return rm.scores(ids).gather(1, last[:, None]).squeeze(1)


def minibatches(n: int, size: int, first: int, seed: str) -> list[torch.Tensor]:
    """Deal a process's n rollout sequences (global indices first, first+1, ...) into n // size minibatches.

    Each run of M = n // size consecutive sequences gives one sequence to every minibatch, in an
    order seeded by the run's global index. A process's share is whole runs, so minibatch j is the
    same set of sequences (spread over the processes) for any number of processes."""
    if n % size:
        raise PocketError(f"ppo: rollout_size {n} must be a multiple of train.batch_size {size}")
    m = n // size
    assigned: list[list[int]] = [[] for _ in range(m)]
    for run in range(0, n, m):
        for i, j in enumerate(random.Random(f"{seed}:{first + run}").sample(range(m), m)):
            assigned[j].append(run + i)
    return [torch.tensor(idx) for idx in assigned]


class PPOObjective:
    def __init__(self, cfg: PPOConfig, ref: GPT, rm: GPT, chat, prompts: list[Prompt], device,
                 pretraining: MixtureLoader | None = None, info: DistInfo = DistInfo()):
        self.cfg, self.ref, self.rm, self.chat, self.pretraining = cfg, ref, rm, chat, pretraining
        self.prompts, self.device, self.info = prompts, device, info
        if len(prompts) < cfg.rollout_size * info.world_size:
            raise PocketError(f"ppo: {len(prompts)} prompts, fewer than a rollout of {cfg.rollout_size} "
                              f"x {info.world_size} process(es); raise prompts_per_task")
        self.rollouts_done = 0
        self.queue: list[tuple[Rollout, torch.Tensor]] = []
        self.stats: dict = {}

    @torch.no_grad()
    def rollout(self, pv: PolicyAndValue) -> None:
        cfg, chat, info = self.cfg, self.chat, self.info
        rng = random.Random(f"{cfg.seed}:{self.rollouts_done}")
        everyone = rng.sample(self.prompts, cfg.rollout_size * info.world_size)
        mine = share(len(everyone), info)
        prompts = everyone[mine.start:mine.stop]
        params = chat_params(chat, cfg.max_tokens, cfg.temperature, seed=cfg.seed + self.rollouts_done)
        outs = sample(pv.policy, chat, prompts, params, dtype=cfg.train.dtype, first_index=mine.start,
                      compile=cfg.compile_sampling)
        seqs = [p.ids + c.tokens for p, c in zip(prompts, outs)]
        ids, mask = collate(seqs, [len(p.ids) for p in prompts], chat.pad_id, self.device,
                            [c.action_mask for c in outs])
        old_lp, entropy = policy_logprobs(pv.policy, ids, with_entropy=True)
        ref_lp = policy_logprobs(self.ref, ids)
        values = pv.value.scores(ids)[:, :-1]
        scores = score(self.rm, seqs, chat, self.device)
        rewards, kl = kl_penalty_rewards(old_lp, ref_lp, mask, scores, cfg.beta)
        advantages, returns = gae(rewards, values, mask, 1.0, cfg.lam)
        # Whitened over the whole rollout: its mean and variance summed over processes.
        advantages = masked_whiten(advantages, mask, total=lambda t: sum_over_processes(t, info))
        ro = Rollout(ids, mask, old_lp, values, advantages, returns, torch.tensor([len(q) for q in seqs]))
        for epoch in range(cfg.ppo_epochs):
            for idx in minibatches(len(seqs), cfg.train.batch_size, mine.start,
                                   f"{cfg.seed}:{self.rollouts_done}:{epoch}"):
                self.queue.append((ro, idx))
        correct = [p.task.verify(p.example, c.text) for p, c in zip(prompts, outs)]
        self.stats = {"reward": scores.mean().item(), "kl": kl.mean().item(),
                      "entropy": masked_mean(entropy, mask).item(), "response_tokens": mask.sum(1).mean().item(),
                      "sample_accuracy": sum(correct) / len(correct)}
        self.rollouts_done += 1

    def loss(self, pv: PolicyAndValue):
        if not self.queue:
            self.rollout(pv)
        ro, idx = self.queue.pop(0)
        ids, mask = ro.ids[idx], ro.mask[idx]
        lp = policy_logprobs(pv.policy, ids)
        values = pv.value.scores(ids)[:, :-1]
        pl, pstats = ppo_policy_loss(lp, ro.old_logprobs[idx], ro.advantages[idx], mask, self.cfg.clip)
        vl, vstats = ppo_value_loss(values, ro.old_values[idx], ro.returns[idx], mask, self.cfg.value_clip)
        # Both are token means: over the minibatch's tokens on all processes, not this one's alone.
        loss = (pl + self.cfg.vf_coef * vl) * share_of_global_mean(mask.sum(), self.info)
        stats = {"policy_loss": pl.item(), "value_loss": vl.item(), "tokens": float(ro.lengths[idx].sum())}
        if self.pretraining is not None:
            x, y = self.pretraining.next_batch()
            ptx = pv.policy(x.to(self.device), targets=y.to(self.device))
            loss, stats["ptx_loss"] = loss + self.cfg.ptx_coef * ptx, ptx.item()
            stats["tokens"] += x.numel()
        return loss, {**pstats, **vstats, **stats, **self.stats}

    def tokens_per_micro_step(self) -> int:
        return self.cfg.train.batch_size * self.cfg.max_tokens

    def state(self) -> dict:
        # A resumed run starts a fresh rollout from the restored policy (rollouts are seeded by index).
        return {"rollouts_done": self.rollouts_done,
                "pretraining": self.pretraining.state() if self.pretraining else None}

    def load_state(self, state: dict) -> None:
        self.rollouts_done = state["rollouts_done"]
        self.queue = []
        if self.pretraining and state.get("pretraining"):
            self.pretraining.load_state(state["pretraining"])


@torch.no_grad()
def held_out(policy: GPT, ref: GPT, rm: GPT, chat, prompts: list[Prompt], cfg: PPOConfig, device,
             info: DistInfo = DistInfo()) -> dict:
    """Mean reward, KL to the reference, entropy and accuracy of sampled answers to held-out prompts;
    each process answers its share of the prompts and the sums are added up."""
    mine = share(len(prompts), info)
    prompts = prompts[mine.start:mine.stop]
    sums = [0.0] * 6  # reward, kl, entropy x tokens, tokens, right answers, answers
    if prompts:
        params = chat_params(chat, cfg.max_tokens, cfg.temperature, seed=12345)
        outs = sample(policy, chat, prompts, params, dtype=cfg.train.dtype, first_index=mine.start,
                      compile=cfg.compile_sampling)
        seqs = [p.ids + c.tokens for p, c in zip(prompts, outs)]
        ids, mask = collate(seqs, [len(p.ids) for p in prompts], chat.pad_id, device, [c.action_mask for c in outs])
        lp, entropy = policy_logprobs(policy, ids, with_entropy=True)
        # KL(policy || reference) per answer, by Schulman's k3 estimator: unbiased like the log-ratio, and never
        # below 0, which the log-ratio's sample mean was (a held-out KL of -0.057)
        log_ratio = policy_logprobs(ref, ids) - lp
        kl = ((log_ratio.exp() - 1 - log_ratio) * mask).sum(1)
        sums = [score(rm, seqs, chat, device).sum().item(), kl.sum().item(), (entropy * mask).sum().item(),
                mask.sum().item(), sum(p.task.verify(p.example, c.text) for p, c in zip(prompts, outs)), len(outs)]
    reward, kl, entropy, tokens, right, n = count_totals(sums, info, device)
    return {"heldout_reward": reward / n, "heldout_kl": kl / n, "heldout_entropy": entropy / max(tokens, 1),
            "heldout_accuracy": right / n}


def pretraining_loader(cfg: PPOConfig, run_dir: Path, info: DistInfo, context: int) -> MixtureLoader | None:
    """Batches of the run's pretraining mixture for PPO-ptx; None when it is off or the run has no data."""
    if cfg.ptx_coef <= 0:
        return None
    if not (run_dir / "data").exists():
        if info.is_main:
            console.print(f"[yellow]ppo: {run_dir / 'data'} holds no pretraining data: PPO runs without the "
                          "pretraining loss (ptx_coef ignored)[/]")
        return None
    streams, weights = load_streams(run_dir / "data", "train")
    return MixtureLoader(streams, weights, cfg.ptx_batch_size, min(cfg.ptx_seq_len, context), cfg.seed,
                         info.rank, info.world_size)


def ppo(cfg: PPOConfig, run_dir: str | Path, resume: bool = False) -> dict:
    run_dir = Path(run_dir)
    tc = cfg.train
    device, info, out_dir = stage_setup(tc, run_dir, "ppo", resume)
    policy, chat, _ = load_model(run_dir / "sft", device)
    ref, _, _ = load_model(run_dir / "sft", device)
    rm, _, _ = load_model(run_dir / "rm", device)
    value, _, _ = load_model(run_dir / "rm", device)  # the value model starts as the reward model
    for frozen in (ref, rm):
        frozen.requires_grad_(False)
    pv = PolicyAndValue(policy, value)
    prompts = task_prompts(chat, cfg.tasks, "train", cfg.prompts_per_task, cfg.seed)
    val_prompts = task_prompts(chat, cfg.tasks, "validation", cfg.eval_prompts_per_task, cfg.seed)

    def evaluate(m: PolicyAndValue) -> dict:
        return held_out(m.policy, ref, rm, chat, val_prompts, cfg, device, info)

    before = evaluate(pv)
    if info.is_main:
        console.print("[bold]ppo[/] start (SFT policy): " + ", ".join(f"{k} {v:.3f}" for k, v in before.items()))
    pretraining = pretraining_loader(cfg, run_dir, info, policy.cfg.max_seq_len)
    objective = PPOObjective(cfg, ref, rm, chat, prompts, device, pretraining, info)
    trainer = Trainer(pv, objective, tc, out_dir, "ppo", run_dir / "metrics.jsonl", device, info, evaluate=evaluate)
    if resume:
        trainer.resume()
    pv.train()
    summary = trainer.run()
    # The loop evaluates at the last step: the same weights and prompts, so the same figures.
    after = {k: summary[k] for k in before} if before.keys() <= summary.keys() else evaluate(pv)
    summary.update(before={k: v for k, v in before.items()}, after=after,
                   kl_within_bound=after["heldout_kl"] < cfg.kl_bound, reward=after["heldout_reward"],
                   kl=after["heldout_kl"])
    if info.is_main:
        save_model(policy, out_dir, chat, {"stage": "ppo", "train": asdict(tc), "summary": summary,
                                           "beta": cfg.beta})
        atomic_write_json(out_dir / "ppo_summary.json", summary)
        console.print("ppo end: " + ", ".join(f"{k} {v:.3f}" for k, v in after.items()) + f" -> {out_dir}")
    barrier(info)  # the next stage reads ppo/ on every process
    return summary
