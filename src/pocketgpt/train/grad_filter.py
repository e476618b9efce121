"""Gradient filters: a transform of the gradients between `backward()` and the optimizer's step.

Grokfast (Lee et al. 2024, "Grokfast: Accelerated Grokking by Amplifying Slow Gradients") treats each
parameter's gradient over steps as a signal: the fast-varying part fits the training set, the slow part
generalises. It keeps an exponential moving average of the gradient (the low-pass filtered signal) and
adds it back amplified:

    ema  = alpha * ema + (1 - alpha) * grad        (ema starts as the first gradient)
    grad = grad + lambda * ema

Switch it on for any training run with `train.grad_filter = "grokfast"` (alpha 0.98, lambda 2.0 as in
the paper's modular-arithmetic runs).
"""

from __future__ import annotations

import torch

from ..common import PocketError

GRAD_FILTERS = ("none", "grokfast")


class Grokfast:
    """The EMA filter; its averages live in the optimizer's per-parameter state, so checkpoints keep them."""

    KEY = "grokfast_ema"

    def __init__(self, optimizer: torch.optim.Optimizer, alpha: float = 0.98, lamb: float = 2.0):
        if not 0.0 <= alpha < 1.0:
            raise PocketError(f"grokfast alpha must be in [0, 1), got {alpha}")
        self.optimizer, self.alpha, self.lamb = optimizer, alpha, lamb
        # AdamW creates its own state for a parameter only while that state is empty, so an average
        # born before the optimizer's first step waits here and moves in right after that step.
        self.newborn: dict[torch.Tensor, torch.Tensor] = {}
        optimizer.register_step_post_hook(self._adopt_newborn)

    @torch.no_grad()
    def __call__(self) -> None:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.optimizer.state[p]
                if self.KEY in state:
                    ema = state[self.KEY].mul_(self.alpha).add_(p.grad, alpha=1 - self.alpha)
                else:
                    ema = self.newborn[p] = p.grad.detach().clone()
                p.grad.add_(ema, alpha=self.lamb)

    def _adopt_newborn(self, optimizer, args, kwargs) -> None:
        for p, ema in self.newborn.items():
            optimizer.state[p][self.KEY] = ema
        self.newborn.clear()


def make_grad_filter(name: str, optimizer: torch.optim.Optimizer, alpha: float, lamb: float):
    """The filter a TrainConfig names, as a callable run after backward (None for "none")."""
    if name == "none":
        return None
    if name == "grokfast":
        return Grokfast(optimizer, alpha, lamb)
    raise PocketError(f"unknown grad_filter {name!r}: {', '.join(GRAD_FILTERS)}")
