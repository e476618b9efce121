"""What the preference and RL stages share: prompts from tasks, sampled completions, padded batches.

Alignment convention (used everywhere downstream): for a right-padded batch `ids` (B, T),

    logprobs[:, t] = log p(ids[:, t+1] | ids[:, :t+1])     (B, T-1)
    mask[:, t]     = 1 when ids[:, t+1] is a completion token the policy chose
    values[:, t]   = the value model's estimate in the state ids[:, :t+1]

so `mask` selects exactly the actions, and every per-token tensor has T-1 columns.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import torch

from ..chat import ChatTemplate
from ..common import compute_dtype
from ..data.tasks import Example, Task, default_world, get_task
from ..data.tasks.tools import task_tools
from ..engine import Engine, SamplingParams
from ..model import GPT, lm_head_logprobs
from ..toolloop import Transcript, generate_with_tools


@dataclass
class Prompt:
    task: Task
    example: Example
    ids: list[int]  # the chat prompt, ending with the assistant turn's header


def task_prompts(chat: ChatTemplate, tasks: list[str], split: str, per_task: int, seed: int = 0) -> list[Prompt]:
    """Chat prompts for the given tasks' questions (a seeded sample of `per_task` from each)."""
    prompts = []
    for name in tasks:
        task = get_task(name)
        examples = task.examples(split)
        for e in random.Random(f"{seed}:{name}:{split}").sample(examples, min(per_task, len(examples))):
            ids = chat.prompt([{"role": "user", "content": e.question}])
            prompts.append(Prompt(task, e, ids))
    random.Random(seed).shuffle(prompts)
    return prompts


def scored_sequence(chat: ChatTemplate, ids: list[int], max_len: int) -> list[int]:
    """A finished conversation as the reward model reads it: with the template's read-out suffix. A reply
    that ran into the context limit (the tool loop may fill it) loses its last tokens to make room."""
    suffix = chat.reward_suffix
    return ids[:max_len - len(suffix)] + suffix


def chat_params(chat: ChatTemplate, max_tokens: int, temperature: float, n: int = 1,
                seed: int | None = None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, n=n, seed=seed, stop_tokens=chat.stop_ids)


@torch.no_grad()
def sample(model: GPT, chat: ChatTemplate, prompts: list[Prompt], params: SamplingParams,
           batch_size: int = 128, dtype: str = "float32", first_index: int = 0,
           compile: bool = False) -> list[Transcript]:
    """params.n answers per prompt, row = prompt_index * n + k; the model is left in its previous mode.
    As in evaluation, the assistant's tool calls are executed (toolloop.py); each Transcript's
    action_mask tells the tokens the model chose from those the tools wrote.

    A prompt's random draws follow its index in the global batch (`first_index` + its position
    here), so under torchrun a process sampling its share gets the answers one process would.

    With a reduced `dtype` the answers are decoded by a copy of the weights in that precision
    (bfloat16 decodes ~1.6x faster on a CPU with AMX; "auto" picks it only where it is faster), as RL
    systems decode with an inference engine; the losses still score the sampled tokens with the
    full-precision model.

    `compile`: decode with the compiled step that reads the weights as inputs (Engine's
    `fold_weights=False`), so the stage compiles once and every later call, after any number of
    updates, reuses it (the `small` model's sampling here: ~2,300 tokens/s against ~1,400 eager)."""
    was_training = model.training
    dtype = compute_dtype(dtype, next(model.parameters()).device)
    decoder = model if dtype == "float32" else copy.deepcopy(model).to(getattr(torch, dtype))
    # All prompts go to the engine at once: it keeps `batch_size` rows decoding and starts the next
    # prompt as soon as a row finishes, where fixed chunks would wait for their longest answer. The
    # reward model's prompts (120 x 8 completions, compiled, bf16) sampled at 4,251 tokens/s in 64 rows,
    # 4,546 in 128 and 4,801 in 256; 128 keeps the KV cache of a larger model in bounds.
    engine = Engine(decoder, chat.tokenizer, max_batch=batch_size, compile=compile, fold_weights=False)
    outs = generate_with_tools(engine, chat, [p.ids for p in prompts], params, task_tools(default_world()),
                               first_index=first_index)
    model.train(was_training)
    return outs


def collate(sequences: list[list[int]], prompt_lens: list[int], pad_id: int, device,
            action_masks: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad full sequences; the mask marks completion tokens as actions (T-1 columns), or,
    with `action_masks` (one per completion), only those the model chose (not tool results)."""
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), T - 1)
    for i, (s, p) in enumerate(zip(sequences, prompt_lens)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, p - 1:len(s) - 1] = torch.tensor(action_masks[i], dtype=mask.dtype) if action_masks else 1.0
    return ids.to(device), mask.to(device)


def policy_logprobs(model: GPT, ids: torch.Tensor, with_entropy: bool = False):
    """Log-probabilities of each next token (B, T-1), and optionally the entropy at each position (for
    logging: no gradient). The LM head runs chunk by chunk (model.lm_head_logprobs): the whole batch's
    fp32 logits made GRPO's step peak near 10 GB."""
    lp, entropy = lm_head_logprobs(model.hidden_states(ids)[:, :-1], model.lm_head.weight, ids[:, 1:], with_entropy)
    return (lp, entropy) if with_entropy else lp

