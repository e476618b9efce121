"""Generation as a scheduler: sequences join and leave a running batch at any step (continuous batching).

    submit(prompt, params) -> Sequence(s)           waiting: not yet in the cache
    step():  admit waiting sequences into free cache rows (n samples of a prompt share its prefill;
                      with a prefix cache, a beginning seen before is copied in, not prefilled)
             prefill: feed up to `prefill_chunk` prompt tokens (long prompts take several steps,
                      so the sequences already decoding never stall behind them)
             sample:  every sequence with fresh logits picks its next token (its own temperature,
                      top-k, top-p, seed, logits processors, stops, max tokens); logprobs on request
             decode:  one forward over the cache rows, each row continuing after its own length
    finished sequences free their row, unless kept (the tool loop appends a tool's result to the
    live cache with `extend` and decoding goes on without re-reading the conversation)

Each sequence owns its sampling parameters and random generator, so requests with different
settings share one batch. The engine is synchronous and single-threaded: the server runs it in a
thread of its own, hands it sequences with `enqueue`, cancels them with `Sequence.cancel`, and
receives each step's events from `step()`.
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from .common import PocketError, autocast
from .model import GPT, ROW_LINEAR_MAX_ROWS, decode_block
from .prefix_cache import BLOCK, PrefixCache, block_keys
from .tokenizer import Tokenizer

# processor(generated_so_far, logits (V,)) -> logits: a grammar mask, a forced token, a bias
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


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
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-probability and k alternatives
    # Never sampled (a tool call where no tool is offered): one masked write for the whole batch, where a
    # logits processor would cost a Python call per row and step.
    banned_tokens: tuple[int, ...] = ()
    # OpenAI's: subtracted from a token's logit once it has been sampled (presence) and per time (frequency)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, added to its logit) pairs: -100 bans, 100 forces


@dataclass
class TokenEvent:
    row: int  # the sequence's index in its submission (prompt_index * n + sample)
    token: int
    done: bool
    finish_reason: str | None = None
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class Completion:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "stop" (token or string) | "length" | "cancelled" | "error"
    prompt_index: int = 0
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


class Sequence:
    """One sample being generated: its tokens, its sampling state, its row in the KV cache."""

    _ids = itertools.count()

    def __init__(self, prompt: list[int], params: SamplingParams, processors, index: int, prompt_index: int,
                 keep: bool):
        self.id = next(self._ids)
        self.prompt, self.params, self.processors = list(prompt), params, list(processors)
        self.index, self.prompt_index, self.keep = index, prompt_index, keep
        self.tokens: list[int] = []  # everything after the prompt, sampled or written by the runtime
        self.sampled: list[int] = []  # 1 where tokens[i] was sampled, 0 where the runtime wrote it
        self.turn: list[int] = []  # tokens sampled since the last submit/extend (stops and max_tokens look here)
        self.counts: dict[int, int] = {}  # how often each token was sampled (presence and frequency penalties)
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.pending: list[int] = list(prompt)  # to feed into the cache before the next sample
        self.unfed: int | None = None  # the last sampled token, not yet in the cache
        self.logits: torch.Tensor | None = None  # the next-token logits, when fresh
        self.first_logits: torch.Tensor | None = None  # after the prompt: what the siblings start from
        self.row: int | None = None
        self.leader: Sequence | None = None  # n samples: the sibling that prefills the shared prompt
        self.finish_reason: str | None = None
        self.cancelled = False
        self.generator: torch.Generator | None = None
        self.block_keys: list[int] = []  # the prefix cache's keys of its first blocks, as far as computed
        self.cached = 0  # prompt tokens the prefix cache supplied

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop at the next step (a client went away); safe to call from any thread."""
        self.cancelled = True

    def completion(self, engine: Engine) -> Completion:
        """The last turn as a Completion (with its log-probabilities when they were asked for)."""
        c = Completion(self.turn, engine.visible_text(self.turn, self.params), self.finish_reason or "length",
                       self.prompt_index)
        if self.params.logprobs is not None:
            start = len(self.logprobs) - len(self.turn)
            c.logprobs, c.top_logprobs = self.logprobs[start:], self.top_logprobs[start:]
        return c


def sample_seed(seed: int, index: int) -> int:
    """The seed of one sample's random stream, from a request's seed and the sample's index. A CPU
    torch.Generator keeps only a seed's low 32 bits (seeds 42 and 42 + 2**32 drew the same samples), so a
    value beyond them (an OpenAI client may send any integer) is hashed into them; small seeds keep the
    streams they always had."""
    value = seed * 1_000_003 + index
    if 0 <= value < 2 ** 32:
        return value
    return int.from_bytes(hashlib.blake2b(str(value).encode(), digest_size=4).digest(), "little")


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids, with one setting and one random generator for every row."""
    return sample_rows(logits, [params] * len(logits), [generator] * len(logits))


# exp(x) for x below this is a subnormal float or 0, and the CPU's vectorised exp takes a slow path for
# every such element: over 32 rows of SmolLM2's 49k vocabulary, whose logits span more than 87 nats,
# exp(x - max) took ~11 ms here (a tenth of its decode step), ~1 ms clamped. A token that far below the
# best one has a probability under 1e-38; raised to exactly that, its slice of a cumulative sum that
# reaches 1 is still absorbed by float32 rounding once the sum passes what the smallest draw can be.
EXP_FLOOR = -87.0


def stable_exp(x: torch.Tensor) -> torch.Tensor:
    """exp(x - max) per row, what lies more than 87 nats below the row's max (-inf too) raised to exactly that."""
    return (x - x.amax(dim=-1, keepdim=True)).clamp_(min=EXP_FLOOR).exp_()


# The first candidates top-k/top-p filtering sorts; more only for rows whose kept set reaches past them.
# A full sort of 32 rows of SmolLM2's 49k vocabulary took ~56 ms here (longer than its decode step), the
# 64 largest ~2 ms, and a trained model's nucleus at top_p 0.9 is usually a few tokens.
FILTER_CANDIDATES = 64


def _nucleus(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's candidates: the largest logits of x (B, V), sorted, with -inf for those outside its top_k
    or outside its nucleus (the fewest largest whose probabilities sum past top_p, the token that crosses it
    kept); and their token ids. Only the largest few are sorted: then 4x as many while a row's kept set may
    reach further, up to the whole row."""
    V = x.shape[-1]
    log_total = x.amax(dim=-1, keepdim=True) + stable_exp(x).sum(dim=-1, keepdim=True).log()
    k = min(V, max(FILTER_CANDIDATES, int(top_k.where(top_k < V, 0).max())))  # every row's top_k among them
    while True:
        values, order = torch.topk(x, k, dim=-1)  # sorted, largest first
        probs = torch.exp(values - log_total)
        before = probs.cumsum(dim=-1) - probs  # the mass of the larger candidates
        # settled: the row's next candidate would be dropped, by its top_k or by its top_p
        settled = (top_k <= k) | (before[:, -1] + probs[:, -1] > top_p)
        if k == V or bool(settled.all()):
            break
        k = min(V, k * 4)
    rank = torch.arange(k, device=x.device)[None, :]
    drop = (rank >= top_k[:, None]) | (before > top_p[:, None])
    return values.masked_fill(drop, float("-inf")), order


def _draw(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row of x (B, N), the column whose slice of the cumulative probabilities holds u (B,) in [0, 1)."""
    cdf = stable_exp(x).cumsum(dim=-1)  # unnormalised: u is scaled to its total
    # side="right": the first column whose cumulative probability exceeds u * total; a column of probability
    # zero owns an empty slice and is never picked.
    picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp(max=x.shape[-1] - 1)
    # The float edges of a draw (u = 0 meeting stable_exp's floor, u * total rounding up to the total) can
    # land on a column of probability zero (-inf: banned, outside a grammar), about once in 10^7 draws:
    # such a row takes its most likely column instead, so a constraint holds on every token.
    impossible = x.gather(1, picked[:, None])[:, 0] == float("-inf")
    if bool(impossible.any()):
        picked = torch.where(impossible, x.argmax(dim=-1), picked)
    return picked


def penalize(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """The rows' logit biases and presence and frequency penalties, as OpenAI defines them: each token's logit
    plus its bias, minus frequency_penalty x the times the sequence sampled it and presence_penalty if it did.
    One scattered add for the whole batch; `logits` itself is returned when no row asks for any."""
    rows, tokens, values = [], [], []
    for i, seq in enumerate(seqs):
        p = seq.params
        for token, bias in p.logit_bias:
            rows.append(i), tokens.append(token), values.append(bias)
        if p.presence_penalty or p.frequency_penalty:
            for token, count in seq.counts.items():
                rows.append(i), tokens.append(token), values.append(-p.frequency_penalty * count - p.presence_penalty)
    if not rows:
        return logits
    index = (torch.tensor(rows, device=logits.device), torch.tensor(tokens, device=logits.device))
    return logits.index_put(index, torch.tensor(values, device=logits.device, dtype=logits.dtype), accumulate=True)


# Temperatures below this are greedy, as in vLLM (its _SAMPLING_EPS): logits divided by 1e-38 overflow float32, and
# the draw over the NaNs that follow picked arbitrary tokens.
GREEDY_BELOW = 1e-5


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids, each row with its own temperature, top-k, top-p and generator.

    Sampling is by the inverse of the cumulative distribution: one uniform number u per row, from the
    row's own generator (None: torch's global one), picks the token whose slice of the cumulative
    probabilities holds u. A seeded request is so reproducible whoever shares its batch, and the whole
    batch is one exponential, one cumsum and one search: for 32 rows of SmolLM2's 49k vocabulary, a
    uniform draw per token (the Gumbel-max trick we used before) cost more than the decode step's LM head.
    A row with top-k or top-p draws among its sorted candidates only (_nucleus), not over the vocabulary.
    """
    hot = [i for i, p in enumerate(params) if p.temperature >= GREEDY_BELOW]
    greedy = len(hot) < len(params)  # an argmax over the batch only when some row needs it
    tokens = logits.argmax(dim=-1) if greedy else torch.empty(len(params), dtype=torch.long, device=logits.device)
    if not hot:
        return tokens
    x = (logits if len(hot) == len(params) else logits[hot]).float()
    temperatures = [params[i].temperature for i in hot]
    if any(t != 1 for t in temperatures):
        x = x / torch.tensor(temperatures, device=logits.device)[:, None]
    u = torch.cat([torch.rand(1, device=x.device, generator=generators[i]) for i in hot])
    V = x.shape[-1]
    filtered = [row for row, i in enumerate(hot) if 0 < params[i].top_k < V or params[i].top_p < 1]
    if not filtered:
        picked = _draw(x, u)
    else:
        picked = torch.empty(len(hot), dtype=torch.long, device=x.device)
        kept = set(filtered)
        free = [row for row in range(len(hot)) if row not in kept]
        if free:
            picked[free] = _draw(x[free], u[free])
        top_k = torch.tensor([k if 0 < (k := params[hot[row]].top_k) < V else V for row in filtered], device=x.device)
        top_p = torch.tensor([params[hot[row]].top_p for row in filtered], device=x.device)
        values, order = _nucleus(x[filtered] if len(filtered) < len(hot) else x, top_k, top_p)
        picked[filtered] = order.gather(1, _draw(values, u[filtered])[:, None])[:, 0]
    if not greedy:
        return picked
    tokens[hot] = picked
    return tokens


# Models up to this depth compile their decode step as one graph; deeper ones compile one block's graph,
# shared by every block. A whole-step graph of SmolLM2's 30 blocks with dynamic sizes took over ten minutes
# to compile here (sympy simplifying index expressions, block after block); one block takes seconds, and
# a call per block costs little next to a deep model's step.
WHOLE_STEP_MAX_LAYERS = 8


class Engine:
    def __init__(self, model: GPT, tokenizer: Tokenizer, max_batch: int = 32, prefill_chunk: int = 512,
                 prefill_dtype: str = "float32", compile: bool = False, prefix_cache_mb: float = 0,
                 fold_weights: bool = True):
        """`prefill_dtype="bfloat16"`: prompts go through bf16 matmuls (AMX, tensor cores) while decoding
        stays in the weights' dtype. A prompt is many tokens at once, so its matmuls are large enough for
        bf16 units to pay (SmolLM2's 600-token prefill 2.4x faster here: reports/bench/interop.json).
        Logits then differ from fp32 in the third decimal.

        `compile=True`: the decode step (`GPT.decode_step`) goes through `torch.compile`, one fused graph
        instead of ~300 small kernels per token: the `small` model decodes ~5x faster than transformers'
        `generate` at batch 1 (bench/bench_foundation.py). Each kind of batch (one row, a few, many)
        compiles at its first step, or all at once in `warmup`: 5-20 s each for the `small` model, 20-30 s
        for all three of SmolLM2's (less once inductor's on-disk cache holds them). Worth it for a
        server or a long evaluation, not for a quick sample.

        `fold_weights` (with compile): a model of up to WHOLE_STEP_MAX_LAYERS layers is compiled as one
        graph with its weights folded in as constants, the fastest step, but the engine then decodes with
        the weights it had when it compiled, and every other model compiles anew. With
        `fold_weights=False` (a deeper model always) the step is one compiled graph per block, shared by all
        blocks, which reads the weights as inputs: a model trained between two calls (RL's sampling) or
        another checkpoint of the same shape (an evaluation of several) reuses it without compiling again.
        That graph packs bf16 or fp32 weights for oneDNN at the first many-row step (model.packed_linear),
        which costs a second copy of them.

        `prefix_cache_mb > 0`: the keys and values of prompt beginnings seen before (a system prompt, the
        earlier turns of a conversation) are kept, up to that many megabytes, and copied instead of
        prefilled again (prefix_cache.py)."""
        if prefill_dtype not in ("float32", "bfloat16"):
            raise PocketError(f"prefill_dtype must be float32 or bfloat16, got {prefill_dtype!r}")
        if max_batch < 1 or prefill_chunk < 1:  # no room for a row would wait for one forever
            raise PocketError(f"max_batch and prefill_chunk must be at least 1, got {max_batch} and {prefill_chunk}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.prefill_dtype = prefill_dtype
        self.compiled, self._compiled_kinds = compile, set()
        self.fold_weights = fold_weights and model.cfg.n_layer <= WHOLE_STEP_MAX_LAYERS
        self._decode_step = model.decode_step
        if compile:
            # Every size dynamic (one graph serves all lengths and capacities); each model and kind of
            # batch (1 row, a few, many: see model.ROW_LINEAR_MAX_ROWS) is one entry of the cache.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            if self.fold_weights:
                self._decode_step = torch.compile(model.decode_step, dynamic=True)
            else:
                self._block = torch.compile(decode_block, dynamic=True)
                self._head = torch.compile(model.decode_head, dynamic=True)
                self._decode_step = self._block_by_block
        self.cache = model.make_cache(rows=1, capacity=64)
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 else None
        self.rows: list[Sequence | None] = []  # the sequence in each occupied cache row, packed from row 0
        self.waiting: list[Sequence] = []  # submitted, not yet admitted to a row
        self.running: list[Sequence] = []  # admitted and not finished (prefilling, decoding or sampling)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()  # submissions from other threads

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running or not self.inbox.empty())

    @torch.inference_mode()
    def warmup(self) -> float:
        """Compile the decode step now for every kind of batch it may meet (one row, a few, many), before
        requests wait on it (a server); otherwise each kind compiles at its first decode step. Returns
        the seconds it took (0 without compile)."""
        t0 = time.perf_counter()
        for rows in sorted({1, min(2, self.max_batch), min(ROW_LINEAR_MAX_ROWS + 1, self.max_batch)}):
            self._compile_for(rows)
        return time.perf_counter() - t0 if self.compiled else 0.0

    def _block_by_block(self, ids: torch.Tensor, positions: torch.Tensor, keys: list[torch.Tensor],
                        values: list[torch.Tensor], span: int) -> torch.Tensor:
        """GPT.decode_step with one compiled graph for every block (and one for the head) instead of one
        graph for the whole step: a deep model compiles in a fraction of the time, and pays a call per block."""
        x, rope, mask = self.model.decode_inputs(ids, positions, span)
        for block, k, v in zip(self.model.model.layers, keys, values):
            x = self._block(block, x, rope, mask, positions, k, v, packed=True)
        return self._head(x, packed=True)

    def _compile_for(self, rows: int) -> None:
        """Compile the decode step for batches like `rows` (1, up to ROW_LINEAR_MAX_ROWS, more: the
        step's code differs between them) on a scratch cache, unless done."""
        kind = min(rows, 2) if rows <= ROW_LINEAR_MAX_ROWS else ROW_LINEAR_MAX_ROWS + 1
        if not self.compiled or kind in self._compiled_kinds:
            return
        # Without "duck sizing": sizes equal while tracing (a capacity of 64 and a head size of 64) would
        # be taken as equal for good, and the first cache that grows would compile again.
        # A whole-step graph folds the weights in as constants ("freezing"): inductor then hands oneDNN
        # matmuls pre-packed weights, and the `small` model's step at 32 rows ran 1.45x faster here (the
        # block-by-block graph of a deep model is shared by its blocks: their weights are inputs).
        import torch._inductor.config as inductor_config

        with torch.fx.experimental._config.patch(use_duck_shape=False), \
                inductor_config.patch(freezing=self.fold_weights):
            cache = self.model.make_cache(kind + 3, 64)
            cache.lengths += 4
            ids = torch.zeros(kind, dtype=torch.long, device=self.device)
            self._decode_step(ids, cache.lengths[:kind].clone(), cache.k, cache.v, 5)
        self._compiled_kinds.add(kind)

    # ------------------------------------------------------------------ submitting

    def submit(self, prompt: list[int], params: SamplingParams, processors=(), keep: bool = False,
               prompt_index: int = 0, processor_factory=None) -> list[Sequence]:
        """Queue params.n samples of one prompt; thread-safe. `keep`: a finished sequence keeps its
        cache row for `extend` until `release`. `processor_factory()` gives each sample a processor of its own
        (a grammar's state is per sample)."""
        seqs = self.sequences(prompt, params, processors, keep, prompt_index, processor_factory)
        self.enqueue(seqs)
        return seqs

    def sequences(self, prompt: list[int], params: SamplingParams, processors=(), keep: bool = False,
                  prompt_index: int = 0, processor_factory=None) -> list[Sequence]:
        """The params.n sequences `submit` would queue, not queued yet (a server first files them)."""
        self.check(prompt, params)
        seqs = []
        for k in range(params.n):
            procs = [*processors, processor_factory()] if processor_factory else processors
            seq = Sequence(prompt, params, procs, prompt_index * params.n + k, prompt_index, keep)
            if params.seed is not None and params.temperature > 0:  # one stream per sample, none shared
                seq.generator = torch.Generator(device=self.device).manual_seed(sample_seed(params.seed, seq.index))
            seq.leader = seqs[0] if seqs else None
            seqs.append(seq)
        return seqs

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Bad input is a PocketError that says what is wrong in one line, never an IndexError deep in
        the model. max_tokens may exceed what the context leaves: a sequence stops at the context's end
        (finish_reason "length"), as a batch of prompts of different lengths needs."""
        context, vocab = self.model.cfg.max_seq_len, self.model.cfg.vocab_size
        if not prompt:
            raise PocketError("the prompt is empty: a prompt needs at least one token")
        if len(prompt) >= context:
            raise PocketError(f"the prompt has {len(prompt)} tokens; the model's context is {context}, "
                              "so nothing is left to generate")
        if min(prompt) < 0 or max(prompt) >= vocab:
            bad = next(t for t in prompt if not 0 <= t < vocab)
            raise PocketError(f"the prompt holds token id {bad}, outside the vocabulary (0 to {vocab - 1})")
        for name, ok, rule in (("max_tokens", params.max_tokens >= 1, "at least 1"),
                               ("n", params.n >= 1, "at least 1"),
                               ("temperature", params.temperature >= 0, "at least 0 (0 is greedy)"),
                               ("top_k", params.top_k >= 0, "at least 0 (0 is off)"),
                               ("top_p", 0 < params.top_p <= 1, "above 0 and at most 1 (1 is off)"),
                               ("logprobs", params.logprobs is None or 0 <= params.logprobs <= vocab,
                                f"from 0 to the vocabulary's {vocab}"),
                               ("presence_penalty", -2 <= params.presence_penalty <= 2, "from -2 to 2"),
                               ("frequency_penalty", -2 <= params.frequency_penalty <= 2, "from -2 to 2")):
            if not ok:
                raise PocketError(f"{name} must be {rule}, not {getattr(params, name)}")
        for token, bias in params.logit_bias:
            if not 0 <= token < vocab:
                raise PocketError(f"logit_bias names token id {token}, outside the vocabulary (0 to {vocab - 1})")
            if not -100 <= bias <= 100:
                raise PocketError(f"logit_bias must be from -100 to 100, not {bias} (token {token})")

    def enqueue(self, seqs: list[Sequence]) -> None:
        """Hand sequences to the engine (thread-safe: the engine picks them up at its next step)."""
        self.inbox.put(seqs)

    @torch.inference_mode()
    def extend(self, seq: Sequence, tokens: list[int], params: SamplingParams | None = None) -> None:
        """Append tokens the runtime writes (a tool's result) to a finished, kept sequence's live cache,
        then decode a new turn (max_tokens and stops count from here)."""
        if not seq.done or seq.row is None:
            raise ValueError("only a finished sequence that kept its cache row can be extended")
        seq.pending = ([seq.unfed] if seq.unfed is not None else []) + list(tokens)
        seq.unfed, seq.logits, seq.finish_reason, seq.turn = None, None, None, []
        seq.tokens += tokens
        seq.sampled += [0] * len(tokens)
        if params is not None:
            seq.params = params
        self.running.append(seq)

    @torch.inference_mode()
    def release(self, seq: Sequence, file: bool = True) -> None:
        """Free a sequence's cache row (its blocks filed in the prefix cache first, unless `file` is
        False); the last occupied row moves into it, so rows stay packed."""
        if seq.row is None:
            return
        if file:
            self._file_blocks(seq)
        last = len(self.rows) - 1
        if seq.row != last:
            moved = self.rows[last]
            self.cache.move_row(last, seq.row)
            self.rows[seq.row] = moved
            moved.row = seq.row
        self.rows.pop()
        seq.row = None

    # ------------------------------------------------------------------ one scheduling step

    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, TokenEvent]]:
        """Admit, prefill a chunk, sample for every sequence with fresh logits, decode one token; the events."""
        while not self.inbox.empty():
            self.waiting += self.inbox.get()
        events: list[tuple[Sequence, TokenEvent]] = []
        for seq in [s for s in self.waiting + self.running if s.cancelled and not s.done]:
            events.append((seq, self._finish(seq, "cancelled", None)))
        self._admit()
        self._prefill()
        events += self._sample()
        self._decode()
        if not self.rows and not self.waiting and self.cache.rows * self.cache.capacity > 64:
            # Idle: the cache goes back to its first size. It is dense (rows x the longest row), only grows
            # while busy, and a server kept what one burst had made: 4 GB of SmolLM2's after 32 clients and
            # a 2,000-token prompt.
            self.cache = self.model.make_cache(rows=1, capacity=64)
        return events

    @torch.inference_mode()
    def abort_all(self) -> list[tuple[Sequence, TokenEvent]]:
        """End every sequence (finish_reason "error") and free the cache: after a failed step, the
        engine starts clean instead of retrying what failed."""
        while not self.inbox.empty():
            self.waiting += self.inbox.get()
        for seq in list(self.rows):  # before _finish: rows a failed step may have left half written are not filed
            if seq is not None:
                self.release(seq, file=False)
        return [(seq, self._finish(seq, "error", None)) for seq in [*self.waiting, *self.running]]

    def _admit(self) -> None:
        while self.waiting and len(self.rows) < self.max_batch:
            seq = self.waiting.pop(0)
            seq.row = len(self.rows)
            self.rows.append(seq)
            self.running.append(seq)
            self.cache.reserve(len(self.rows), 64)
            self.cache.lengths[seq.row] = 0
            if self.prefix_cache is not None and seq.leader is None and seq.pending == seq.prompt:
                seq.block_keys = block_keys(seq.prompt, [])
                seq.cached = self.prefix_cache.restore(self.cache, seq.row, seq.prompt, seq.block_keys)
                self.cache.lengths[seq.row] = seq.cached
                seq.pending = seq.prompt[seq.cached:]

    def _file_blocks(self, seq: Sequence) -> None:
        """File the full blocks of what a sequence's cache row holds in the prefix cache."""
        if self.prefix_cache is None or seq.row is None:
            return
        fed = (seq.prompt + seq.tokens)[:int(self.cache.lengths[seq.row])]
        seq.block_keys = block_keys(fed, seq.block_keys[:len(fed) // BLOCK])
        self.prefix_cache.store(self.cache, seq.row, fed, seq.block_keys)

    def _prefill(self) -> None:
        """Feed pending tokens, at most `prefill_chunk` in all, the shortest remaining prompt first: a short
        request that arrives while a long prompt is prefilled goes first, instead of waiting for all of it
        (a "hi" behind a 6,759-token prompt waited 225 s). A sample whose leader has prefilled the shared
        prompt copies the leader's cache row instead. The chunks go through the model in batches
        (`_prefill_groups`): 32 prompts arriving together are one forward pass, not 32."""
        budget = self.prefill_chunk
        chunks: list[tuple[Sequence, list[int]]] = []
        for seq in sorted(self.running, key=lambda s: len(s.pending)):  # stable: arrival order among equals
            if not seq.pending or seq.row is None:
                continue
            leader = seq.leader
            if leader is not None and seq.pending == seq.prompt:
                if leader.row is not None and leader.first_logits is not None:
                    self.cache.copy_row(leader.row, seq.row, len(seq.prompt))
                    seq.pending, seq.logits = [], leader.first_logits
                    continue
                if leader.row is not None and not leader.done:
                    continue  # the leader's prefill is under way: wait and share it
                seq.leader = None  # the leader has gone: prefill the prompt itself
            if budget <= 0:
                break
            chunk, seq.pending = seq.pending[:budget], seq.pending[budget:]
            budget -= len(chunk)
            chunks.append((seq, chunk))
        for group in self._prefill_groups(chunks):
            self._prefill_group(group)

    def _prefill_groups(self, chunks: list[tuple[Sequence, list[int]]]) -> list[list[tuple[Sequence, list[int]]]]:
        """Chunks of adjacent cache rows, in groups that one forward pass can take: rows in a row (a pass
        covers a slice of rows), padded to the longest chunk with at most half as much padding as tokens, and
        without passing the context's end."""
        groups: list[list[tuple[Sequence, list[int]]]] = []
        for seq, chunk in sorted(chunks, key=lambda c: c[0].row):
            group = groups[-1] if groups else None
            if group is not None and group[-1][0].row + 1 == seq.row:
                rows = [*group, (seq, chunk)]
                width = max(len(c) for _, c in rows)
                ends = max(int(self.cache.lengths[s.row]) for s, _ in rows) + width
                if 2 * len(rows) * width <= 3 * sum(len(c) for _, c in rows) and ends <= self.model.cfg.max_seq_len:
                    group.append((seq, chunk))
                    continue
            groups.append([(seq, chunk)])
        return groups

    def _prefill_group(self, group: list[tuple[Sequence, list[int]]]) -> None:
        """One forward pass over a group's chunks, right-padded to the longest. A padded position's key
        lands after its row's length, where the row's next token overwrites it before anything reads it."""
        width = max(len(chunk) for _, chunk in group)
        ids = torch.zeros(len(group), width, dtype=torch.long, device=self.device)
        for i, (_, chunk) in enumerate(group):
            ids[i, :len(chunk)] = torch.tensor(chunk)
        first = group[0][0].row
        with autocast(self.device, self.prefill_dtype):
            hidden = self.model.hidden_states(ids, self.cache, slice(first, first + len(group)), advance=False)
        lengths = torch.tensor([len(chunk) for _, chunk in group], device=self.device)
        self.cache.lengths[first:first + len(group)] += lengths
        # Only each row's last position is sampled from: the LM head on the others (a fifth of SmolLM2's
        # prefill) is waste.
        last = hidden[torch.arange(len(group), device=self.device), lengths - 1]
        logits = self.model.lm_head(last.to(self.model.lm_head.weight.dtype))
        for i, (seq, _) in enumerate(group):
            self._file_blocks(seq)
            if not seq.pending:
                seq.logits = logits[i]
                seq.first_logits = logits[i]  # kept for the n-1 siblings that share this prefill

    def _sample(self) -> list[tuple[Sequence, TokenEvent]]:
        ready = [s for s in self.running if s.logits is not None and not s.pending and not s.done]
        if not ready:
            return []
        raw = torch.stack([s.logits for s in ready]).float()
        # Constraints (the processors) first: logprobs are those of the distribution they leave, before bias,
        # penalties and temperature (vLLM's too). A reply held to ["yes", "no"] reported "Yes" and "No" as its
        # likeliest tokens.
        for i, seq in enumerate(ready):
            for proc in seq.processors:
                raw[i] = proc(seq.turn, raw[i])
        logits = penalize(raw, ready)  # a new tensor where it changes anything: logprobs come from the raw ones
        bans = [(i, t) for i, seq in enumerate(ready) for t in seq.params.banned_tokens]
        if bans and logits is raw:
            logits = raw.clone()
        if bans:
            rows, tokens = zip(*bans)
            logits[list(rows), list(tokens)] = float("-inf")
        tokens = sample_rows(logits, [s.params for s in ready], [s.generator for s in ready]).tolist()
        events = []
        for i, (seq, token) in enumerate(zip(ready, tokens)):
            seq.logits = None
            logprob = top = None
            if seq.params.logprobs is not None:
                logp = F.log_softmax(raw[i], dim=-1)
                logprob = float(logp[token])
                if seq.params.logprobs > 0:  # at most the tokens a constraint allows (JSON has no -inf)
                    values, ids = torch.topk(logp, seq.params.logprobs)
                    top = [(t, v) for t, v in zip(ids.tolist(), values.tolist()) if v > float("-inf")]
                seq.logprobs.append(logprob)
                seq.top_logprobs.append(top or [])
            seq.tokens.append(token)
            seq.sampled.append(1)
            seq.counts[token] = seq.counts.get(token, 0) + 1
            seq.turn.append(token)
            reason = self._stop_reason(seq, token)
            if reason is None:
                seq.unfed = token
                events.append((seq, TokenEvent(seq.index, token, False, None, logprob, top)))
            else:
                seq.unfed = token
                events.append((seq, self._finish(seq, reason, token, logprob, top)))
        return events

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if token in p.stop_tokens:
            return "stop"
        if p.stop_strings and any(s in self.tokenizer.decode(seq.turn) for s in p.stop_strings):
            return "stop"
        if len(seq.turn) >= p.max_tokens or len(seq.prompt) + len(seq.tokens) >= self.model.cfg.max_seq_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str, token: int | None, logprob=None, top=None) -> TokenEvent:
        seq.finish_reason = reason
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        if not seq.keep or reason == "cancelled":
            self.release(seq)
        return TokenEvent(seq.index, -1 if token is None else token, True, reason, logprob, top)

    def _decode(self) -> None:
        """One token for every decoding sequence, in one forward over the packed rows. Rows that are
        prefilling or waiting ride along: their keys at their end are overwritten before they are read."""
        decoding = [s for s in self.running if s.unfed is not None and not s.pending and not s.done]
        if not decoding:
            return
        n = max(s.row for s in decoding) + 1
        self._compile_for(n)
        unfed = [0] * n
        for s in decoding:
            unfed[s.row] = s.unfed
        ids = torch.tensor(unfed, device=self.device)  # one tensor from a list: a write per row cost more
        positions = self.cache.lengths[:n].clone()
        span = int(positions.max()) + 1
        self.cache.reserve(n, span)
        logits = self._decode_step(ids, positions, self.cache.k, self.cache.v, span)
        rows = torch.tensor([s.row for s in decoding], device=self.device)
        self.cache.lengths[rows] += 1
        for s in decoding:
            s.logits, s.unfed = logits[s.row], None

    # ------------------------------------------------------------------ conveniences

    def run(self, seqs: list[Sequence]) -> Iterator[tuple[Sequence, TokenEvent]]:
        """Step until every sequence in `seqs` has finished; yields their events."""
        mine = {s.id for s in seqs}
        while any(not s.done for s in seqs):
            for seq, ev in self.step():
                if seq.id in mine:
                    yield seq, ev

    def events(self, prompts: list[list[int]], params: SamplingParams,
               processors: list[LogitsProcessor] = ()) -> Iterator[TokenEvent]:
        """Decode every prompt params.n times; one event per generated token (row = prompt * n + sample)."""
        if not prompts:
            return
        seqs = [s for i, p in enumerate(prompts) for s in self.submit(p, params, processors, prompt_index=i)]
        for _, ev in self.run(seqs):
            yield ev

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 processors: list[LogitsProcessor] = (), on_done: Callable[[], None] | None = None) -> list[Completion]:
        """All completions, row = prompt_index * n + sample; stop strings and tokens are cut off the text.
        `on_done` is called as each one finishes (a progress bar)."""
        seqs = [s for i, p in enumerate(prompts) for s in self.submit(p, params, processors, prompt_index=i)]
        for _, ev in self.run(seqs):
            if ev.done and on_done:
                on_done()
        return [s.completion(self) for s in seqs]

    def visible_text(self, tokens: list[int], params: SamplingParams) -> str:
        return visible_text(self.tokenizer, tokens, params)

    def stream(self, prompt: list[int], params: SamplingParams,
               processors: list[LogitsProcessor] = ()) -> Iterator[str]:
        """Text pieces of one completion as they are generated (never half a UTF-8 character)."""
        params = replace(params, n=1)
        decoder = TextStream(self.tokenizer, params)
        for ev in self.events([prompt], params, processors):
            piece = decoder.push(ev)
            if piece:
                yield piece


class TextStream:
    """Turns token events into text pieces: never half a UTF-8 character, never the start of a stop string,
    never a special token; nothing from `hide_from` (a token: the display of a turn whose tool call is run
    instead of shown) on."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, hide_from: int | None = None):
        self.tokenizer, self.params, self.hide_from = tokenizer, params, hide_from
        # A token's bytes by lookup, not through tiktoken's decode: that call releases the GIL, and a server's
        # event loop then waited for the engine's thread to hand it back, token after token (py-spy, 32
        # streaming clients: 118 of the loop thread's 426 samples in here, ~35 us a call against 0.4 us
        # alone; 16 samples with the lookup).
        self.token_bytes = tokenizer.visible_token_bytes
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.tokens: list[int] = []
        self.text, self.emitted = "", ""
        self.hidden = False

    def push(self, ev: TokenEvent) -> str:
        if self.hide_from is not None and ev.token == self.hide_from:
            self.hidden = True
        if self.hidden:
            return ""
        if ev.token >= 0:
            self.tokens.append(ev.token)
        if ev.done and ev.finish_reason == "stop":
            visible = visible_text(self.tokenizer, self.tokens, self.params)
        else:
            if ev.token >= 0:
                self.text += self.decoder.decode(self.token_bytes[ev.token], final=ev.done)
            visible = _before_stop(self.text, self.params.stop_strings, partial=not ev.done)
        if len(visible) <= len(self.emitted):
            return ""
        piece, self.emitted = visible[len(self.emitted):], visible
        return piece


def visible_text(tokenizer: Tokenizer, tokens: list[int], params: SamplingParams) -> str:
    """Decoded text without the stop token, without special tokens (a model that goes on past its end of
    turn writes them as text otherwise) and without anything from the first stop string on."""
    if tokens and tokens[-1] in params.stop_tokens:
        tokens = tokens[:-1]
    specials = set(tokenizer.special_ids.values())
    text = tokenizer.decode([t for t in tokens if t not in specials])
    for s in params.stop_strings:
        if s in text:
            text = text[:text.index(s)]
    return text


def _before_stop(text: str, stops: tuple[str, ...], partial: bool) -> str:
    """The text before the first stop string (a display may go on decoding past one: the terminal chat hides
    a tool call's text so); while the text grows (`partial`), also without an end that may start one."""
    for s in stops:
        if s in text:
            text = text[:text.index(s)]
    if partial:  # the longest end that may start any of them ("le" of "led", not "d" of "dZ")
        held = max((k for s in stops for k in range(1, min(len(s), len(text) + 1))
                    if text[-k] == s[0] and s.startswith(text[-k:])), default=0)
        return text[:len(text) - held]
    return text
