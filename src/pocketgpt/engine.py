"""Generation: prefill the prompt once, then decode token by token with a KV cache.

    prompts --left-pad--> prefill (one forward over all prompt tokens) --> copy each row n times
            --> loop: last logits -> processors -> temperature/top-k/top-p -> sample -> stop checks

Rows that hit a stop token, a stop string or max_tokens leave the batch, so the rest decode faster.
Logits processors (e.g. a grammar that masks tokens) see every row's tokens so far and may edit
the logits before sampling.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch

from .model import GPT
from .tokenizer import Tokenizer

# processor(row_ids, generated, logits) -> logits; row_ids are stable indices of the output rows
LogitsProcessor = Callable[[list[int], list[list[int]], torch.Tensor], torch.Tensor]


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    n: int = 1  # samples per prompt; they share the prompt's prefill
    seed: int | None = None
    stop_tokens: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()


@dataclass
class Completion:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "stop" (token or string) | "length"
    prompt_index: int = 0


@dataclass
class TokenEvent:
    row: int
    token: int
    done: bool
    finish_reason: str | None = None


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids."""
    if params.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > params.top_p  # keep the token that crosses p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Engine:
    def __init__(self, model: GPT, tokenizer: Tokenizer):
        self.model = model.eval()
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    # ------------------------------------------------------------------ the core loop

    @torch.inference_mode()
    def events(self, prompts: list[list[int]], params: SamplingParams,
               processors: list[LogitsProcessor] = ()) -> Iterator[TokenEvent]:
        """Decode every prompt params.n times; yields one event per generated token (row = prompt*n + k)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        device, n = self.device, params.n
        longest = max(len(p) for p in prompts)
        max_len = min(self.model.cfg.max_seq_len, longest + params.max_tokens)
        if longest >= max_len:
            raise ValueError(f"prompt of {longest} tokens leaves no room in max_seq_len={self.model.cfg.max_seq_len}")
        generator = None
        if params.seed is not None and params.temperature > 0:
            generator = torch.Generator(device=device).manual_seed(params.seed)

        # Prefill: prompts left-padded to one length; padding keys are masked, positions start at 0.
        ids = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
        valid = torch.zeros(len(prompts), max_len, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):] = torch.tensor(p, device=device)
            valid[i, longest - len(p):] = True
        padded = any(len(p) != longest for p in prompts)
        cache = self.model.make_cache(len(prompts), max_len)
        positions = None
        if padded:
            cache.valid = valid
            positions = (valid[:, :longest].long().cumsum(-1) - 1).clamp(min=0)
        logits = self.model(ids, cache=cache, positions=positions)[:, -1]
        next_pos = torch.tensor([len(p) for p in prompts], device=device)

        # Share the prefill: every prompt's cache row is copied for its n samples.
        if n > 1:
            rows = torch.arange(len(prompts), device=device).repeat_interleave(n)
            cache.select(rows)
            logits, next_pos = logits[rows], next_pos[rows]
        if cache.valid is not None:
            cache.valid[:, longest:] = True

        active = list(range(len(prompts) * n))  # output rows still decoding, in batch order
        generated: list[list[int]] = [[] for _ in active]
        texts = [""] * len(active)
        stop_tokens = set(params.stop_tokens)
        while active:
            for proc in processors:
                logits = proc(active, [generated[r] for r in active], logits)
            tokens = sample_next(logits, params, generator).tolist()
            keep = []
            for i, (row, tok) in enumerate(zip(active, tokens)):
                generated[row].append(tok)
                reason = None
                if tok in stop_tokens:
                    reason = "stop"
                elif params.stop_strings:
                    texts[row] = self.tokenizer.decode(generated[row])
                    if any(s in texts[row] for s in params.stop_strings):
                        reason = "stop"
                if reason is None and (len(generated[row]) >= params.max_tokens
                                       or cache.length >= max_len):
                    reason = "length"
                yield TokenEvent(row, tok, reason is not None, reason)
                if reason is None:
                    keep.append(i)
            if not keep:
                return
            if len(keep) < len(active):
                index = torch.tensor(keep, device=device)
                cache.select(index)
                next_pos = next_pos[index]
                tokens = [tokens[i] for i in keep]
                active = [active[i] for i in keep]
            step = torch.tensor(tokens, device=device)[:, None]
            logits = self.model(step, cache=cache, positions=next_pos[:, None] if padded else None)[:, -1]
            next_pos = next_pos + 1

    # ------------------------------------------------------------------ conveniences

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 processors: list[LogitsProcessor] = ()) -> list[Completion]:
        """All completions, row = prompt_index * n + sample; stop strings and tokens are cut off the text."""
        outs = [Completion(prompt_index=r // params.n) for r in range(len(prompts) * params.n)]
        for ev in self.events(prompts, params, processors):
            outs[ev.row].tokens.append(ev.token)
            if ev.done:
                outs[ev.row].finish_reason = ev.finish_reason
        for c in outs:
            c.text = self.visible_text(c.tokens, params)
        return outs

    def visible_text(self, tokens: list[int], params: SamplingParams) -> str:
        """Decoded text without the stop token and without anything from the first stop string on."""
        if tokens and tokens[-1] in params.stop_tokens:
            tokens = tokens[:-1]
        text = self.tokenizer.decode(tokens)
        for s in params.stop_strings:
            if s in text:
                text = text[:text.index(s)]
        return text

    def stream(self, prompt: list[int], params: SamplingParams,
               processors: list[LogitsProcessor] = ()) -> Iterator[str]:
        """Text pieces of one completion as they are generated (never half a UTF-8 character)."""
        params = replace(params, n=1)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        tokens: list[int] = []
        text, emitted = "", ""
        for ev in self.events([prompt], params, processors):
            tokens.append(ev.token)
            if ev.done and ev.finish_reason == "stop":
                visible = self.visible_text(tokens, params)
            else:
                text += decoder.decode(self.tokenizer.decode_bytes([ev.token]), final=ev.done)
                visible = text if ev.done else _hold_back_stop_prefix(text, params.stop_strings)
            if len(visible) > len(emitted):
                yield visible[len(emitted):]
                emitted = visible


def _hold_back_stop_prefix(text: str, stops: tuple[str, ...]) -> str:
    """Do not show text that may turn out to be the start of a stop string."""
    for s in stops:
        for k in range(len(s) - 1, 0, -1):
            if text.endswith(s[:k]):
                return text[:-k]
    return text
