"""rl_math pinned on cases small enough to compute by hand (the expected numbers are written out here)."""

import math

import pytest
import torch

from pocketgpt.model import lm_head_logprobs
from pocketgpt.train.rl_math import (
    entropy_from_logits,
    gae,
    group_advantages,
    grpo_loss,
    k3_kl,
    kl_penalty_rewards,
    masked_mean,
    masked_whiten,
    pair_accuracy,
    pairwise_ranking_loss,
    ppo_policy_loss,
    ppo_value_loss,
)


def t(*rows):
    return torch.tensor(rows if len(rows) > 1 else rows[0], dtype=torch.float32)


def close(actual, expected, tol=1e-5):
    expected = torch.as_tensor(expected, dtype=torch.float32)
    assert torch.allclose(torch.as_tensor(actual, dtype=torch.float32), expected, atol=tol), (actual, expected)


def nls(x):  # -log sigmoid(x)
    return math.log(1 + math.exp(-x))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------------------- masked statistics

def test_masked_mean():
    x = t([1.0, 2.0, 100.0], [3.0, 50.0, 60.0], [7.0, 8.0, 9.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    close(masked_mean(x, mask), (1 + 2 + 3) / 3)
    close(masked_mean(x, mask, dim=1), [1.5, 3.0, 0.0])  # a row without valid positions gives 0


def test_masked_whiten():
    x, mask = t([[1.0, 2.0, 3.0, 40.0]]), torch.tensor([[1, 1, 1, 0]])
    std = math.sqrt(((1 - 2) ** 2 + 0 + (3 - 2) ** 2) / 3)  # population std over the valid three
    close(masked_whiten(x, mask), [[-1 / std, 0.0, 1 / std, 0.0]])
    close(masked_whiten(x, mask, shift_mean=False), [[2 - 1 / std, 2.0, 2 + 1 / std, 0.0]])


# ---------------------------------------------------------------------------- from logits

def test_token_logprobs_and_entropy():
    """The LM head's chunked log-probabilities on a hand case: x = one-hot rows, so logits = weight.T rows."""
    logits = t([[0.0, math.log(3)], [math.log(3), 0.0]])  # probabilities (1/4, 3/4) and (3/4, 1/4)
    x, weight = torch.eye(2), logits.T.contiguous()
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    lp, entropy = lm_head_logprobs(x, weight, torch.tensor([1, 1]))
    close(lp, [math.log(3 / 4), math.log(1 / 4)])
    close(entropy, [h, h])
    lp, entropy = lm_head_logprobs(x, weight, torch.tensor([0, 0]), with_entropy=False)
    close(lp, [math.log(1 / 4), math.log(3 / 4)])
    assert entropy is None
    close(entropy_from_logits(logits[None]), [[h, h]])
    close(entropy_from_logits(torch.zeros(1, 1, 4)), [[math.log(4)]])  # uniform over 4: log 4


@pytest.mark.parametrize("rows", [3, 300])  # one chunk, and several (64 rows each at this vocabulary)
def test_chunked_logprobs_match_autograd_of_the_plain_head(rows):
    """Values and gradients (through an uneven upstream gradient, as an RL loss gives) equal the plain
    log_softmax of the whole batch's logits."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 16, generator=g, requires_grad=True)
    weight = torch.randn(50_000, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50_000, (rows,), generator=g)
    upstream = torch.randn(rows, generator=g)
    lp, _ = lm_head_logprobs(x, weight, targets)
    (lp * upstream).sum().backward()
    got = lp.detach(), x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    plain = (x @ weight.T).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    (plain * upstream).sum().backward()
    for a, b in zip(got, (plain.detach(), x.grad, weight.grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- reward model

def test_pairwise_loss_one_prompt_of_three():
    rewards, group, rank = t([2.0, 1.0, 0.0]), torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2])
    close(pairwise_ranking_loss(rewards, group, rank), (nls(1) + nls(2) + nls(1)) / 3)


def test_pairwise_loss_averages_per_prompt_then_over_prompts():
    # prompt 7: K=3, ranked best first with rewards 2, 1, 0; prompt 3: chosen 0.5 vs rejected 1.5 (K=2).
    # Rows are shuffled: the grouping comes from the ids, not from the order.
    rewards = t([1.5, 0.0, 2.0, 0.5, 1.0])
    group = torch.tensor([3, 7, 7, 3, 7])
    rank = torch.tensor([1, 2, 0, 0, 1])
    expected = ((nls(1) + nls(2) + nls(1)) / 3 + nls(0.5 - 1.5)) / 2
    close(pairwise_ranking_loss(rewards, group, rank), expected)
    close(pair_accuracy(rewards, group, rank), 3 / 4)  # prompt 7's three pairs right, prompt 3's one wrong


def test_pairwise_loss_ties_make_no_pair():
    rewards, group, rank = t([1.0, 3.0, 0.0]), torch.tensor([0, 0, 0]), torch.tensor([0, 0, 1])
    close(pairwise_ranking_loss(rewards, group, rank), (nls(1) + nls(3)) / 2)
    close(pair_accuracy(rewards, group, rank), 1.0)
    rewards.requires_grad_(True)
    loss = pairwise_ranking_loss(rewards, group, torch.tensor([0, 0, 0]))  # all tied: nothing to learn
    loss.backward()
    assert loss.item() == 0 and torch.equal(rewards.grad, torch.zeros(3))


def test_pairwise_loss_gradient_pushes_better_up_and_worse_down():
    rewards = t([2.0, 1.0, 0.0]).requires_grad_(True)
    pairwise_ranking_loss(rewards, torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2])).backward()
    # d/dr_w of -log sigmoid(r_w - r_l) is -sigmoid(r_l - r_w); the middle one wins and loses by 1
    close(rewards.grad, [-(sigmoid(-1) + sigmoid(-2)) / 3, 0.0, (sigmoid(-1) + sigmoid(-2)) / 3])
    assert rewards.grad[0] < 0 < rewards.grad[2]  # gradient descent raises the best, lowers the worst


# ---------------------------------------------------------------------------- PPO

def test_kl_penalty_rewards():
    logprobs = t([-1.0, -2.0, -3.0, 9.0], [9.0, -1.0, 9.0, 9.0])
    ref = t([-1.5, -2.0, -2.0, 0.0], [0.0, -3.0, 0.0, 0.0])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 0]])  # row 2: a prompt token, one completion token, padding
    rewards, kl = kl_penalty_rewards(logprobs, ref, mask, score=t([5.0, 1.0]), beta=0.1)
    # log ratios: row 1 (0.5, 0, -1), row 2 (2); the score lands on each row's last valid token
    close(rewards, [[-0.05, 0.0, 0.1 + 5.0, 0.0], [0.0, -0.2 + 1.0, 0.0, 0.0]])
    close(kl, [-0.5, 2.0])


def test_gae_by_hand():
    rewards, values = t([[0.0, 0.0, 1.0, 9.0]]), t([[0.5, 0.6, 0.8, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # deltas from the end: 1 + 0 - 0.8 = 0.2;  0 + 0.8 - 0.6 = 0.2;  0 + 0.6 - 0.5 = 0.1
    a2 = 0.2
    a1 = 0.2 + 0.5 * a2  # 0.3
    a0 = 0.1 + 0.5 * a1  # 0.25
    close(adv, [[a0, a1, a2, 0.0]])
    close(ret, [[a0 + 0.5, a1 + 0.6, a2 + 0.8, 0.0]])


def test_gae_skips_tool_results_inside_a_sequence():
    # Actions at 0, 1 and 4; positions 2-3 are a tool's result (not actions): same as without them.
    rewards, values = t([[0.0, 0.0, 7.0, 7.0, 1.0]]), t([[0.5, 0.6, 9.0, 9.0, 0.8]])
    adv, ret = gae(rewards, values, torch.tensor([[1, 1, 0, 0, 1]]), gamma=1.0, lam=0.5)
    plain_adv, plain_ret = gae(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.6, 0.8]]), torch.ones(1, 3), gamma=1.0, lam=0.5)
    close(adv[:, [0, 1, 4]], plain_adv)
    close(ret[:, [0, 1, 4]], plain_ret)
    close(adv[:, [2, 3]], [[0.0, 0.0]])


def test_gae_with_lambda_one_is_discounted_return_minus_value():
    rewards, values = t([[0.0, 0.0, 1.0]]), t([[0.5, 0.6, 0.8]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=1.0)
    close(ret, [[0.81, 0.9, 1.0]])
    close(adv, [[0.81 - 0.5, 0.9 - 0.6, 1.0 - 0.8]])


def test_ppo_policy_loss_clips_only_the_optimistic_side():
    # (ratio, advantage): (1.5, +1) clipped at 1.2; (1.5, -1) not; (0.5, -1) clipped at 0.8; (0.5, +1) not
    ratios, adv = t([[1.5, 1.5, 0.5, 0.5, 1.0]]), t([[1.0, -1.0, -1.0, 1.0, 0.0]])
    old = t([[-1.0, -2.0, -1.0, -2.0, 0.0]])
    logprobs = (old + ratios.log()).requires_grad_(True)
    logprobs.data[0, 4] = 50.0  # padding: an absurd log-probability must not matter
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, stats = ppo_policy_loss(logprobs, old, adv, mask, clip=0.2)
    close(loss, (-1.2 + 1.5 + 0.8 - 0.5) / 4)
    close(stats["clipfrac"], 0.5)
    close(stats["ratio"], 1.0)
    close(stats["approx_kl"], (2 * (0.5 - math.log(1.5)) + 2 * (-0.5 - math.log(0.5))) / 4)
    loss.backward()
    # d/dlogp of -A * ratio is -A * ratio where unclipped, 0 where clipped (and at padding)
    close(logprobs.grad, [[0.0, 1.5 / 4, 0.0, -0.5 / 4, 0.0]])


def test_ppo_value_loss_clipping():
    old, returns = t([1.0, 1.0, 1.0]), t([2.0, 2.0, 2.0])
    values = t([1.5, 0.5, 1.1])
    loss, stats = ppo_value_loss(values, old, returns, torch.ones(3), clip=0.2)
    # 1.5 -> clipped to 1.2: errors 0.25 vs 0.64, the larger (clipped) one counts
    # 0.5 -> clipped to 0.8: errors 2.25 vs 1.44, the unclipped one is larger
    # 1.1 is inside the clip range: 0.81 either way
    close(loss, 0.5 * (0.64 + 2.25 + 0.81) / 3)
    close(stats["value_clipfrac"], 1 / 3)


# ---------------------------------------------------------------------------- GRPO

def test_group_advantages():
    rewards, groups = t([1.0, 1.0, 0.0, 1.0, 0.0]), torch.tensor([5, 9, 5, 9, 5])
    mean, std = 1 / 3, math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 3)  # group 5: rewards 1, 0, 0
    eps = 1e-4
    close(group_advantages(rewards, groups, eps=eps),
          [(1 - mean) / (std + eps), 0.0, -mean / (std + eps), 0.0, -mean / (std + eps)])
    close(group_advantages(rewards, groups, scale=False), [2 / 3, 0.0, -1 / 3, 0.0, -1 / 3])
    # all-equal groups give exactly 0, even where float rounding would leave r - mean slightly off
    assert torch.equal(group_advantages(t([0.1, 0.1, 0.1]), torch.tensor([0, 0, 0])), torch.zeros(3))


def test_k3_kl():
    logp = t([-1.0, -2.0, -0.5])
    mask = torch.ones(3)
    assert torch.equal(k3_kl(logp, logp, mask), torch.zeros(3))
    # ref - logp = +log 2: 2 - log 2 - 1;  ref - logp = -log 2: 1/2 + log 2 - 1
    k3 = k3_kl(logp[:2], logp[:2] + t([math.log(2), -math.log(2)]), mask[:2])
    close(k3, [1 - math.log(2), math.log(2) - 0.5])
    assert (k3 > 0).all()


def test_grpo_loss_is_a_token_level_mean():
    old = t([-1.0, -1.0, -1.0], [-2.0, 7.0, 7.0])
    logprobs = old.clone().requires_grad_(True)  # first update of a batch: ratio 1
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv = t([1.0, -2.0])
    loss, _ = grpo_loss(logprobs, old, adv, mask)
    close(loss, (3 * -1.0 + 2.0) / 4)  # every valid token counts once: not (-1 + 2) / 2
    loss.backward()
    close(logprobs.grad, [[-0.25, -0.25, -0.25], [0.5, 0.0, 0.0]])  # -A / number of valid tokens


def test_grpo_loss_kl_and_clip():
    old = t([[-1.0, -1.0]])
    logprobs = old.clone().requires_grad_(True)
    ref = old - math.log(2)  # ref - logp = -log 2 at every token: k3 = log 2 - 1/2
    loss, stats = grpo_loss(logprobs, old, t([1.0]), torch.ones(1, 2), ref_logprobs=ref, beta=0.1)
    close(loss, -1.0 + 0.1 * (math.log(2) - 0.5))
    close(stats["kl"], math.log(2) - 0.5)
    loss.backward()
    # d k3 / d logp = 1 - exp(ref - logp) = 1/2
    close(logprobs.grad, [[(-1.0 + 0.1 * 0.5) / 2] * 2])
    # ratio 1.5 with a positive advantage is clipped at 1.2, as in PPO
    loss, stats = grpo_loss(old + math.log(1.5), old, t([1.0]), torch.ones(1, 2))
    close(loss, -1.2)
    close(stats["clipfrac"], 1.0)


# ---------------------------------------------------------------------------- padding never matters

PADDED_CASES = {
    "masked_mean": lambda a, b, c, m: masked_mean(a, m),
    "masked_mean_dim": lambda a, b, c, m: masked_mean(a, m, dim=1),
    "masked_whiten": lambda a, b, c, m: masked_whiten(a, m),
    "kl_penalty_rewards": lambda a, b, c, m: kl_penalty_rewards(a, b, m, c[:, 0], beta=0.1),
    "gae": lambda a, b, c, m: gae(a, b, m, gamma=0.9, lam=0.8),
    "ppo_policy_loss": lambda a, b, c, m: ppo_policy_loss(a, b, c, m),
    "ppo_value_loss": lambda a, b, c, m: ppo_value_loss(a, b, c, m),
    "k3_kl": lambda a, b, c, m: k3_kl(a, b, m),
    "grpo_loss": lambda a, b, c, m: grpo_loss(a, b, c[:, 0], m, ref_logprobs=c, beta=0.05),
}


@pytest.mark.parametrize("name", PADDED_CASES)
def test_padded_values_do_not_change_the_output(name):
    fn = PADDED_CASES[name]
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    a, b, c = (torch.randn(2, 6, generator=g) for _ in range(3))
    expected = fn(a, b, c, mask)
    padding = mask == 0
    for x in (a, b):  # c[:, 0] is a per-sequence input (score / advantage): keep it
        x[padding] = torch.randn(int(padding.sum()), generator=g) * 100
    c[:, 1:][padding[:, 1:]] = 100.0
    actual = fn(a, b, c, mask)
    as_tuple = lambda v: v if isinstance(v, tuple) else (v,)  # noqa: E731
    for e, x in zip(as_tuple(expected), as_tuple(actual)):
        if isinstance(e, dict):  # the stats of a loss
            assert x == pytest.approx(e)
        else:
            close(x, e)
