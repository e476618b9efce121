"""The math of preference learning and RL, as plain tensor functions (no models, no data).

Reward modelling, PPO and GRPO all come down to a handful of formulas. Each lives here as a small
function whose body reads like the equation in its paper, so it can be checked by hand and reused
by the thin objectives in `train/`:

    reward model   pairwise_ranking_loss, pair_accuracy         InstructGPT (Ouyang et al. 2022) eq. 1
    RLHF reward    kl_penalty_rewards                           InstructGPT eq. 2, per token as in TRL
    advantages     gae, masked_whiten                           Schulman et al. 2016 (GAE)
    PPO            ppo_policy_loss, ppo_value_loss              Schulman et al. 2017
    GRPO           group_advantages, grpo_loss, k3_kl           DeepSeekMath (Shao et al. 2024), DAPO

Shapes: sequences are rows of a (B, T) batch. `mask` (bool or 0/1) marks the positions that count,
usually the completion tokens: prompt positions before them and padding after them are 0.
Values at masked positions never influence a result, and outputs at masked positions are 0.
Rewards, advantages and returns are targets, not things to differentiate: their functions run
without gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------- masked statistics


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is set (over `dim`, or all of them); 0 where none is."""
    m = mask.bool()
    return torch.where(m, x, 0).sum(dim) / m.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  total: Callable[[torch.Tensor], torch.Tensor] = lambda sums: sums) -> torch.Tensor:
    """(x - mean) / std over the valid positions of the whole batch (population std).

    PPO whitens advantages so their scale does not depend on the reward's scale. With
    shift_mean=False the mean is added back after scaling: the advantages keep their average (the
    batch's overall push up or down) and only their spread is normalised.

    When the batch is spread over processes, `total` adds up partial sums over all of them (an
    all-reduce), so the mean and variance are those of the whole batch.
    """
    m = mask.bool()
    valid_sum, count = total(torch.stack([torch.where(m, x, 0).sum(), m.sum().to(x.dtype)]))
    count = count.clamp(min=1)
    mean = valid_sum / count
    var = total(torch.where(m, (x - mean) ** 2, 0).sum()) / count
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, 0)


# ---------------------------------------------------------------------------- from logits


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the next-token distribution at each position: (B, T, V) -> (B, T)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ---------------------------------------------------------------------------- reward model


def _group_index(group: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Arbitrary group ids (e.g. prompt ids 7, 7, 3) -> dense indices 0..G-1 and G."""
    ids, index = torch.unique(group, return_inverse=True)
    return index, len(ids)


def _per_group(x: torch.Tensor, index: torch.Tensor, n_groups: int, reduce: str) -> torch.Tensor:
    """Reduce x (N,) within each group: "sum", "mean", "amax" or "amin" -> (G,)."""
    return x.new_zeros(n_groups).scatter_reduce(0, index, x, reduce, include_self=False)


def ranked_pairs(group: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """(N, N) bool: pairs[i, j] when i and j answer the same prompt and i is ranked better (ties: no pair)."""
    return (group[:, None] == group[None, :]) & (rank[:, None] < rank[None, :])


def pairwise_ranking_loss(rewards: torch.Tensor, group: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """InstructGPT's reward-model loss over all ranked pairs of each prompt's completions.

        loss(prompt) = -1/C(K,2) * sum over pairs (better w, worse l) of log sigmoid(r_w - r_l)

    averaged over prompts. The K(K-1)/2 pairs of one prompt count as one example, which keeps
    prompts with many completions from dominating (and from overfitting, the paper's reason).

    rewards (N,): one scalar per completion; group (N,): which prompt it answers; rank (N,): its
    place in that prompt's ranking, 0 = best. Equal ranks form no pair. Chosen/rejected data is
    K=2: rank 0 for chosen, 1 for rejected. A batch without any pair gives a loss of 0.
    """
    pairs = ranked_pairs(group, rank)
    pair_loss = -F.logsigmoid(rewards[:, None] - rewards[None, :])  # [i, j]: i better than j
    index, n_groups = _group_index(group)
    # Row i holds the pairs where i is the better completion; each row belongs to i's prompt.
    loss_sum = _per_group(torch.where(pairs, pair_loss, 0).sum(1), index, n_groups, "sum")
    n_pairs = _per_group(pairs.sum(1).to(rewards.dtype), index, n_groups, "sum")
    ranked = n_pairs > 0
    if not ranked.any():
        return rewards.sum() * 0  # keeps the graph, so backward() still works
    return (loss_sum[ranked] / n_pairs[ranked]).mean()


@torch.no_grad()
def pair_accuracy(rewards: torch.Tensor, group: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """Fraction of all ranked pairs (same arguments as the loss) whose better one scores strictly higher.

    Pooled over pairs, not averaged per prompt: it answers "how often does the RM agree with the
    labeller on a comparison". NaN if there is no pair.
    """
    pairs = ranked_pairs(group, rank)
    correct = pairs & (rewards[:, None] > rewards[None, :])
    return correct.sum() / pairs.sum()


# ---------------------------------------------------------------------------- PPO (RLHF)


@torch.no_grad()
def kl_penalty_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                       score: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards for RLHF: a KL penalty on every token plus the reward model's score at the end.

        reward[t] = -beta * (log pi(y_t) - log pi_ref(y_t))    + score   at the last valid t

    Summed over a sequence this is InstructGPT's objective r(x, y) - beta * log(pi / pi_ref); spread
    over tokens, every token pays for straying from the reference (SFT) model, which keeps the
    policy from drifting into text the reward model was never trained to judge.

    Returns rewards (B, T) (0 at masked positions) and each sequence's KL estimate (B,), the sum
    of its log ratios. Every row needs at least one valid position.
    """
    m = mask.bool()
    log_ratio = torch.where(m, logprobs - ref_logprobs, 0)
    rewards = -beta * log_ratio
    positions = torch.arange(m.size(1), device=m.device)
    last = (positions * m).amax(1)  # the index of the last valid token of each row
    rewards = rewards.scatter_add(1, last[:, None], score[:, None].to(rewards.dtype))
    return rewards, log_ratio.sum(1)


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the valid positions of right-padded sequences.

        delta[t] = r[t] + gamma * V[t+1] - V[t]
        A[t]     = delta[t] + gamma * lam * A[t+1]        (sweeping from the end)
        returns  = A + V                                  (the value head's regression target)

    V[t] is the value of the state before token t is chosen. The episode ends after the last
    valid token: values beyond it count as 0 and the sweep starts from A = 0 there. lam trades
    bias (lam=0: one-step TD) for variance (lam=1: Monte Carlo return minus V). Masked positions
    inside a sequence (a tool's result: tokens the policy did not choose) are skipped: the step
    after an action is the next action.
    """
    m = mask.bool()
    r, v = torch.where(m, rewards, 0), torch.where(m, values, 0)
    T = r.size(1)
    advantages = torch.zeros_like(r)
    next_value, next_advantage = torch.zeros_like(r[:, 0]), torch.zeros_like(r[:, 0])
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage
        next_value = torch.where(m[:, t], v[:, t], next_value)
        next_advantage = torch.where(m[:, t], advantage, next_advantage)
    advantages = torch.where(m, advantages, 0)
    return advantages, advantages + v


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled by pi (Schulman's "k3").

        k3 = exp(d) - d - 1,  d = log pi_ref - log pi

    Unbiased like -d (its expectation under pi is the same KL) but never negative, with a much
    lower variance. 0 at masked positions.
    """
    d = torch.where(mask.bool(), ref_logprobs - logprobs, 0)
    return torch.exp(d) - d - 1


def _clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                       mask: torch.Tensor, clip: float) -> tuple[torch.Tensor, dict]:
    """PPO's per-token loss -min(ratio * A, clip(ratio, 1-eps, 1+eps) * A) and its diagnostics.

    The min makes the objective pessimistic: once the ratio pi/pi_old has moved more than eps in
    the direction the advantage rewards, the clipped term wins and the gradient vanishes, so one
    batch cannot push the policy far. Moves the advantage punishes are never clipped away.
    """
    m = mask.bool()
    log_ratio = torch.where(m, logprobs - old_logprobs, 0)  # masked first: exp(inf) would poison grads
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = torch.max(unclipped, clipped)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), m).item(),
            # k3 again, now for KL(pi_old || pi) from pi_old's samples: (ratio - 1) - log ratio
            "approx_kl": masked_mean(k3_kl(old_logprobs, logprobs, m), m).item(),
            "ratio": masked_mean(ratio, m).item(),
        }
    return loss, stats


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), averaged over all valid tokens.

    All inputs (B, T). Stats: clipfrac (share of tokens where clipping bit), approx_kl (how far the
    policy moved from the one that sampled), ratio (mean pi/pi_old; stays near 1 when all is well).
    """
    loss, stats = _clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip)
    return masked_mean(loss, mask), stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """Clipped value loss: 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2).

    Like the policy clip, the max is pessimistic: a value that moved more than eps from the one
    seen at rollout time gets no credit for landing closer to the return. Stat: value_clipfrac.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        stats = {"value_clipfrac": masked_mean((clipped_error > unclipped_error).float(), mask).item()}
    return loss, stats


# ---------------------------------------------------------------------------- GRPO (RL for thinking)


@torch.no_grad()
def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-4,
                     scale: bool = True) -> torch.Tensor:
    """GRPO's advantage: each answer's reward compared with the other answers to the same prompt.

        A_i = (r_i - mean(group)) / (std(group) + eps)        (population std)

    The group mean replaces PPO's learned value function as the baseline. A group whose rewards are
    all equal (all right, all wrong) says nothing about which answer is better: its advantages are
    exactly 0. scale=False keeps only r - mean, as Dr. GRPO recommends (dividing by the std
    up-weights prompts that are nearly always or never solved).
    """
    r = rewards.float()
    index, n_groups = _group_index(group_ids)
    advantages = r - _per_group(r, index, n_groups, "mean")[index]
    if scale:
        std = _per_group(advantages ** 2, index, n_groups, "mean").sqrt()
        advantages = advantages / (std[index] + eps)
    uniform = _per_group(r, index, n_groups, "amax") == _per_group(r, index, n_groups, "amin")
    return torch.where(uniform[index], 0, advantages)


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip: float = 0.2, ref_logprobs: torch.Tensor | None = None,
              beta: float = 0.0) -> tuple[torch.Tensor, dict]:
    """GRPO: PPO's clipped surrogate with one advantage per sequence, plus an optional k3 KL penalty.

        loss = sum over valid tokens of [ clipped surrogate(A_seq) + beta * k3 ] / number of valid tokens

    logprobs, old_logprobs, ref_logprobs, mask: (B, T); advantages: (B,), broadcast over each
    sequence's tokens. Normalisation: DeepSeekMath averages over each sequence's tokens and then
    over sequences, which makes a token of a long answer weigh less than one of a short answer (so
    long wrong answers are punished less per token). Like DAPO, we divide by the total number of
    valid tokens in the batch: every token counts the same. With ref_logprobs, stats gain "kl"
    (the mean k3 per token); beta=0 reports it without penalising it.
    """
    loss, stats = _clipped_surrogate(logprobs, old_logprobs, advantages[:, None], mask, clip)
    if ref_logprobs is not None:
        kl = k3_kl(logprobs, ref_logprobs, mask)
        loss = loss + beta * kl
        stats["kl"] = masked_mean(kl.detach(), mask).item()
    return masked_mean(loss, mask), stats
