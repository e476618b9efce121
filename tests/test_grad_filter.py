"""Grokfast's EMA filter: the arithmetic of the paper, checkpointed with the optimizer, wired into the Trainer."""

import copy

import pytest
import torch

from pocketgpt.common import PocketError
from pocketgpt.train.grad_filter import Grokfast, make_grad_filter


def step_with(param, optimizer, grad_filter, grad):
    param.grad = grad.clone()
    grad_filter()
    filtered = param.grad.clone()
    optimizer.step()
    return filtered


def test_grokfast_adds_the_amplified_moving_average_of_the_gradients():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.0)
    f = Grokfast(opt, alpha=0.9, lamb=2.0)
    g1, g2, g3 = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0]), torch.tensor([0, 0, 4.0])
    # by hand: ema1 = g1; ema2 = .9 g1 + .1 g2; ema3 = .9 ema2 + .1 g3; filtered = g + 2 ema
    assert torch.allclose(step_with(p, opt, f, g1), torch.tensor([3.0, 0, 0]))
    assert torch.allclose(step_with(p, opt, f, g2), torch.tensor([1.8, 1.2, 0]))
    assert torch.allclose(step_with(p, opt, f, g3), torch.tensor([1.62, 0.18, 4.8]))


def test_grokfast_state_rides_in_the_optimizer_checkpoint_and_adamw_still_works():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([p], lr=0.1)
    f = Grokfast(opt)
    step_with(p, opt, f, torch.ones(4))
    assert {"exp_avg", "exp_avg_sq", Grokfast.KEY} <= set(opt.state[p])  # AdamW initialised its own state too
    saved = copy.deepcopy(opt.state_dict())  # as a checkpoint file would hold it, not tensors shared with opt

    q = torch.nn.Parameter(p.detach().clone())
    opt2 = torch.optim.AdamW([q], lr=0.1)
    opt2.load_state_dict(saved)
    f2 = Grokfast(opt2)
    a = step_with(p, opt, f, torch.full((4,), 3.0))
    b = step_with(q, opt2, f2, torch.full((4,), 3.0))
    assert torch.equal(a, b) and torch.equal(p, q)
    assert torch.allclose(a, torch.full((4,), 3.0 + 2 * (0.98 * 1 + 0.02 * 3)))


def test_unknown_filter_and_bad_alpha_are_clear_errors():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert make_grad_filter("none", opt, 0.98, 2.0) is None
    with pytest.raises(PocketError, match="unknown grad_filter"):
        make_grad_filter("lowpass", opt, 0.98, 2.0)
    with pytest.raises(PocketError, match="alpha"):
        Grokfast(opt, alpha=1.0)
