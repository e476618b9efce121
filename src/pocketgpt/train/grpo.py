"""RL on verifiable tasks (GRPO, as in DeepSeekMath / R1): practice problems with checkable answers.

    for a batch of problems: sample G answers each -> reward 1 if the task's verifier accepts, else 0
    advantage of an answer = (its reward - the group's mean) / the group's std   (no value model)
    clipped token-level policy loss, optionally a KL penalty to the reference (the SFT model)

No reward model and no labeler: the verifier is the teacher, so there is nothing to hack but the
task itself. The model can discover its own ways of reasoning, as long as the answer checks out.

Under torchrun a step's problems are global (prompts_per_step per process), and each process
answers its share. A group's advantages need only its own answers, which one process holds; the
loss is a mean over the valid tokens of the whole step's micro-batch on every process, so it is divided
by the count summed over processes (`share_of_global_mean`; micro-steps of grad_accum weigh the same each,
see TrainConfig).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..checkpoint import load_model, save_model
from ..common import DistInfo, PocketError, atomic_write_json, console
from ..config import require
from ..data.tasks import TASKS
from ..model import GPT
from .data_parallel import barrier, count_totals, share, share_of_global_mean
from .loop import TrainConfig, Trainer, stage_setup
from .lora import LoRAConfig, apply_lora, merge_lora, trainable_summary
from .rl_math import group_advantages, grpo_loss, masked_mean
from .rollout import Prompt, chat_params, collate, policy_logprobs, sample, task_prompts


@dataclass
class GRPOConfig:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=20, batch_size=16, seq_len=384, lr=5e-5, warmup_steps=0, schedule="constant", weight_decay=0.0,
        eval_every=10, save_every=10, sample_every=10**9, log_every=1))
    tasks: list = field(default_factory=lambda: ["arithmetic"])
    start: str = "sft"  # the checkpoint to improve: sft, or ppo if it exists
    prompts_per_task: int = 500
    # Most problems are out of reach at first, and a group with no right answer teaches nothing:
    # many problems per step keep the gradient from hanging on one or two lucky groups (8 problems
    # per step gave +2 to +14 points depending on the seed, 16 gave +14).
    prompts_per_step: int = 16  # per process
    group_size: int = 8  # G answers per problem
    temperature: float = 0.7
    max_tokens: int = 192
    compile_sampling: bool = True  # a compiled decode step (rollout.sample): faster after a one-time compile
    clip: float = 0.2  # the ratio's clip (grpo_loss); idle at one update per batch, where the ratio is 1
    beta: float = 0.0  # KL to the reference (k3); 0 = none, as in DAPO / Dr. GRPO
    eval_n: int = 200  # held-out (validation split) problems per task for before/after accuracy
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(r=0))  # r > 0: train adapters, merge at the end
    seed: int = 0

    def __post_init__(self):
        self.check_values()

    def check_values(self) -> None:
        """prompts_per_step 0 or eval_n 0 ended in tracebacks; a group of one answer (or of greedy ones, all
        the same) has no advantage to learn from, and trained on at a loss of 0."""
        require("grpo", {
            "tasks": (self.tasks, bool(self.tasks) and all(t in TASKS for t in self.tasks),
                      f"a list of at least one task of {', '.join(TASKS)}"),
            **{name: (getattr(self, name), getattr(self, name) >= 1, "at least 1")
               for name in ("prompts_per_task", "prompts_per_step", "max_tokens", "eval_n")},
            "group_size": (self.group_size, self.group_size >= 2, "at least 2 (advantages are within a group)"),
            "temperature": (self.temperature, 0 < self.temperature < math.inf, "a number > 0 (a group samples)"),
            "clip": (self.clip, 0 < self.clip < math.inf, "a number > 0"),
            "beta": (self.beta, 0 <= self.beta < math.inf, "a number >= 0"),
        })


class GRPOObjective:
    def __init__(self, cfg: GRPOConfig, ref: GPT | None, chat, prompts: list[Prompt], device,
                 info: DistInfo = DistInfo()):
        self.cfg, self.ref, self.chat, self.prompts, self.device, self.info = cfg, ref, chat, prompts, device, info
        if len(prompts) < cfg.prompts_per_step * info.world_size:
            raise PocketError(f"grpo: {len(prompts)} prompts, fewer than a step's {cfg.prompts_per_step} "
                              f"x {info.world_size} process(es); raise prompts_per_task")
        self.step = 0

    def loss(self, policy: GPT):
        cfg, chat = self.cfg, self.chat
        rng = random.Random(f"{cfg.seed}:{self.step}")
        everyone = rng.sample(self.prompts, cfg.prompts_per_step * self.info.world_size)
        mine = share(len(everyone), self.info)
        batch = everyone[mine.start:mine.stop]
        params = chat_params(chat, cfg.max_tokens, cfg.temperature, n=cfg.group_size, seed=cfg.seed + self.step)
        with torch.no_grad():
            outs = sample(policy, chat, batch, params, dtype=cfg.train.dtype, first_index=mine.start,
                          compile=cfg.compile_sampling)
            prompt_of = [batch[c.prompt_index] for c in outs]
            rewards = torch.tensor([float(p.task.verify(p.example, c.text)) for p, c in zip(prompt_of, outs)])
            groups = torch.tensor([c.prompt_index for c in outs])
            advantages = group_advantages(rewards, groups).to(self.device)
            seqs = [p.ids + c.tokens for p, c in zip(prompt_of, outs)]
            ids, mask = collate(seqs, [len(p.ids) for p in prompt_of], chat.pad_id, self.device,
                                [c.action_mask for c in outs])
            ref_lp = policy_logprobs(self.ref, ids) if self.ref is not None and cfg.beta > 0 else None
        lp, entropy = policy_logprobs(policy, ids, with_entropy=True)
        # One update per batch: the policy that sampled is the one being trained, so the old log-probs are
        # these (ratio 1, the clip idle; as TRL does). A second forward pass for them cost a third of the
        # update, and with LoRA dropout drew other masks (ratio 0.988, a KL of 0.019 from nothing).
        # Samples are drawn at `temperature`, log-probs are the policy's at temperature 1: TRL divides the
        # logits by the sampling temperature first; not done here (the speedrun's GRPO figures were measured
        # so, and the change wants a new card).
        old_lp = lp.detach()
        loss, stats = grpo_loss(lp, old_lp, advantages, mask, cfg.clip, ref_lp, cfg.beta)
        loss = loss * share_of_global_mean(mask.sum(), self.info)  # every token of the step counts the same
        self.step += 1
        trained = sum(len(s) for s in seqs)
        # forward only: the prompts' prefill and the completions while sampling, the reference's log-probs
        forward = sum(len(p.ids) for p in batch) + sum(len(c.tokens) for c in outs) + trained * (ref_lp is not None)
        return loss, {**stats, "tokens": float(trained), "forward_tokens": float(forward),
                      "reward": rewards.mean().item(), "entropy": masked_mean(entropy.detach(), mask).item(),
                      "response_tokens": mask.sum(1).mean().item(),
                      # a share, not a count: the loop averages what it logs over processes
                      "solved_share": float(sum(rewards[groups == g].max() > 0 for g in groups.unique())) / len(batch)}

    def tokens_per_micro_step(self) -> int:
        return self.cfg.prompts_per_step * self.cfg.group_size * self.cfg.max_tokens

    def state(self) -> dict:
        return {"step": self.step}

    def load_state(self, state: dict) -> None:
        self.step = state["step"]


def held_out_accuracy(policy: GPT, chat, cfg: GRPOConfig, info: DistInfo = DistInfo()) -> dict:
    """Greedy answers (tools executed) to the first eval_n validation questions of each task, verified;
    each process answers its share of the questions."""
    from ..data.tasks import get_task

    out = {}
    for name in cfg.tasks:
        task = get_task(name)
        examples = task.examples("validation")[:cfg.eval_n]
        mine = share(len(examples), info)
        examples = examples[mine.start:mine.stop]
        prompts = [Prompt(task, e, chat.prompt([{"role": "user", "content": e.question}])) for e in examples]
        answers = sample(policy, chat, prompts, chat_params(chat, cfg.max_tokens, temperature=0.0),
                         compile=cfg.compile_sampling)
        right = sum(task.verify(e, t.text.strip()) for e, t in zip(examples, answers))
        right, n = count_totals([right, len(examples)], info, next(policy.parameters()).device)
        out[f"{name}_accuracy"] = right / n
    policy.train()
    return out


def grpo(cfg: GRPOConfig, run_dir: str | Path, resume: bool = False) -> dict:
    run_dir = Path(run_dir)
    tc = cfg.train
    device, info, out_dir = stage_setup(tc, run_dir, "grpo", resume)
    policy, chat, _ = load_model(run_dir / cfg.start, device, policy=True)
    ref = None
    if cfg.beta > 0:
        ref, _, _ = load_model(run_dir / cfg.start, device)
        ref.requires_grad_(False)
    prompts = task_prompts(chat, cfg.tasks, "train", cfg.prompts_per_task, cfg.seed)
    before = held_out_accuracy(policy, chat, cfg, info)
    if cfg.lora.r:
        apply_lora(policy, **asdict(cfg.lora))
    if info.is_main:
        console.print(f"[bold]grpo[/] from {cfg.start}: held-out "
                      + ", ".join(f"{k} {v:.1%}" for k, v in before.items()))
    trainer = Trainer(policy, GRPOObjective(cfg, ref, chat, prompts, device, info), tc, out_dir, "grpo",
                      run_dir / "metrics.jsonl", device, info, evaluate=lambda m: held_out_accuracy(m, chat, cfg, info))
    if resume:
        trainer.resume()
    policy.train()
    summary = trainer.run()
    if cfg.lora.r:
        summary["lora"] = trainable_summary(policy)
        policy = merge_lora(policy)
    # The loop evaluates at the last step: unless adapters were merged (they round differently), the
    # same weights and questions give the same figures.
    evaluated = not cfg.lora.r and before.keys() <= summary.keys()
    after = {k: summary[k] for k in before} if evaluated else held_out_accuracy(policy, chat, cfg, info)
    summary.update(before=before, after=after)
    if info.is_main:
        save_model(policy, out_dir, chat, {"stage": "grpo", "start": cfg.start, "train": asdict(tc),
                                           "summary": summary})
        atomic_write_json(out_dir / "grpo_summary.json", summary)
        console.print("grpo: held-out " + ", ".join(f"{k} {before[k]:.1%} -> {after[k]:.1%}" for k in after)
                      + f" -> {out_dir}")
    barrier(info)  # a later stage or evaluation reads grpo/ on every process
    return summary
