"""Prompts that fit the model's context, with room left to answer: evaluation's few-shot prompts, the
knowledge probe before SFT, and the lab's. A prompt with solved examples loses whole examples before
anything is cut, since a prompt cut from the left starts mid-example, without the chat template's opening."""

from __future__ import annotations

from collections.abc import Callable

from .engine import SamplingParams
from .model import GPT


def fit_to_context(model: GPT, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Leave room to answer: what the longest prompt leaves, and at least half the context, where
    long prompts are cut from the left (the question stays; the oldest demos go)."""
    room = prompt_room(model, prompts, params)
    return [p[-room:] for p in prompts]


def prompt_room(model: GPT, prompts: list[list[int]], params: SamplingParams) -> int:
    """The tokens a prompt may take: params.max_tokens is lowered to what the longest prompt leaves, but not
    below half the context (set in place), and the rest of the context is the prompts'."""
    T = model.cfg.max_seq_len
    params.max_tokens = min(params.max_tokens, max(T // 2, T - max(len(p) for p in prompts)))
    return T - params.max_tokens


def fit_shots_to_context(model: GPT, prompts: list[list[int]], params: SamplingParams,
                         build: Callable[[int, int], list[int]], shots: int) -> tuple[list[list[int]], int, int]:
    """fit_to_context for prompts with solved examples: a prompt too long for its room holds the most
    examples that fit (build(i, k): prompt i with k of them, found by bisection), and is cut from the left
    only if the question alone is too long, since a prompt cut from the left starts mid-example, without
    the chat template's opening. Returns the prompts, how many hold fewer examples, and the fewest any holds."""
    room = prompt_room(model, prompts, params)
    fewer, fewest = 0, shots
    for i, prompt in enumerate(prompts):
        if len(prompt) > room:
            lo, hi = 0, shots - 1  # the most examples that fit lies in [lo, hi]; lo = 0 may not fit either
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if len(build(i, mid)) <= room else (lo, mid - 1)
            prompt, fewer, fewest = build(i, lo)[-room:], fewer + 1, min(fewest, lo)
        prompts[i] = prompt
    return prompts, fewer, fewest
