"""The GPT: a Llama-style decoder-only transformer in one file.

    tokens -> embed -> N x [RMSNorm -> attention (RoPE, GQA) -> + ; RMSNorm -> SwiGLU MLP -> +] -> RMSNorm -> logits

Module names follow Hugging Face's `LlamaForCausalLM` exactly (model.layers.0.self_attn.q_proj.weight,
...), so a state dict moves between the two without renaming. Attention uses PyTorch's
scaled_dot_product_attention; a KV cache lets generation feed one token at a time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from .blocks import fp32_norm_weight, has_blocks
from .blocks import row_linear as block_row_linear
from .common import PocketError


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int = 6  # < n_head: grouped-query attention (several query heads share one K/V head)
    d_model: int = 384
    d_ff: int = 0  # SwiGLU hidden size; 0 means Llama's rule: ~8/3 * d_model rounded up to a multiple of 64
    head_dim: int = 0  # 0 means d_model / n_head; imported models may differ (Qwen2.5, Gemma-like shapes)
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Hugging Face's rope_scaling: None, {"rope_type": "llama3"|"linear", ...}
    attention_bias: bool = False  # biases on q/k/v (Qwen2)
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    score_head: bool = False  # a scalar head on the hidden states: reward models and PPO's value model
    # Each key mixes in the key one position before it, by a learned share per K/V head (Olsson et al. 2022's
    # "smeared key"): an induction head then needs one layer, not two. Not Llama: export refuses it.
    smear_keys: bool = False

    def __post_init__(self):
        if self.d_ff == 0:
            self.d_ff = 64 * math.ceil(8 * self.d_model / 3 / 64)
        if self.head_dim == 0:
            if self.d_model % self.n_head:
                raise PocketError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
            self.head_dim = self.d_model // self.n_head
        if self.n_head % self.n_kv_head:
            raise PocketError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise PocketError(f"head dim {self.head_dim} must be even for RoPE")
        kind = (self.rope_scaling or {}).get("rope_type", "default")
        if kind not in ROPE_TYPES:
            raise PocketError(f"rope_scaling type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
        for name in ROPE_FIELDS[kind]:
            value = self.rope_scaling.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise PocketError(f"rope_scaling of type {kind!r} needs {name} (a number > 0), not {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise PocketError(f"unknown model config keys: {sorted(unknown)}")
        for f in fields(cls):  # a hand-edited "six" layers says so, not a TypeError deep in the model
            value = d.get(f.name, f.default)
            if isinstance(f.default, bool):
                ok = isinstance(value, bool)
            elif isinstance(f.default, int):
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif isinstance(f.default, float):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            else:  # rope_scaling: a table or nothing, checked by __post_init__
                ok = True
            if not ok:
                raise PocketError(f"model config {f.name} must be {type(f.default).__name__}, got {value!r}")
        return cls(**d)


# Presets: `tiny` for tests, `small` for the CPU speedrun, the rest for GPUs (vocab is set by the tokenizer).
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=128),
    "small": dict(n_layer=6, n_head=4, n_kv_head=4, d_model=256, max_seq_len=256),
    "medium": dict(n_layer=8, n_head=8, n_kv_head=4, d_model=512, max_seq_len=512),
    "gpt2": dict(n_layer=12, n_head=12, n_kv_head=12, d_model=768, max_seq_len=1024, tie_embeddings=False),
    "d20": dict(n_layer=20, n_head=10, n_kv_head=10, d_model=1280, max_seq_len=2048, tie_embeddings=False),
    "d26": dict(n_layer=26, n_head=13, n_kv_head=13, d_model=1664, max_seq_len=2048, tie_embeddings=False),
}


def preset(name: str, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise PocketError(f"unknown model preset {name!r}; available: {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


# ----------------------------------------------------------------------------- rotary embeddings

ROPE_TYPES = ("default", "linear", "llama3")
# What each kind of RoPE scaling reads from its table (rope_frequencies)
ROPE_FIELDS = {"default": (), "linear": ("factor",),
               "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def rope_frequencies(cfg: GPTConfig, device=None) -> torch.Tensor:
    """The rotation speed of each pair of dimensions; long-context variants slow the slow ones down.

    linear: every frequency divided by `factor` (positions interpolated). llama3 (Llama 3.1/3.2):
    wavelengths shorter than original_max / high_freq_factor stay, those longer than original_max /
    low_freq_factor are divided by `factor`, and the band between is blended smoothly.
    """
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=device)
                                         / cfg.head_dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        original = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((original / wavelen - low) / (high - low)).clamp(0, 1)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        return torch.where(wavelen < original / high, inv_freq,
                           torch.where(wavelen > original / low, inv_freq / factor, blended))
    return inv_freq


def rope_tables(cfg: GPTConfig, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for positions 0..length-1, in Hugging Face's half-split layout (rotate_half)."""
    inv_freq = rope_frequencies(cfg, device)
    freqs = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + d/2]) by a position-dependent angle: attention then sees relative offsets."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


# ----------------------------------------------------------------------------- KV cache


class KVCache:
    """Keys and values of every layer for several independent sequences ("rows"), each with its own length.

    Row r holds `lengths[r]` tokens; a forward pass over some rows appends its tokens after theirs, so
    rows may join, leave and wait independently (continuous batching). Rows and capacity grow on
    demand, doubling, up to the model's context: a 2,048-token cache is not paid for a 20-token chat.
    """

    def __init__(self, cfg: GPTConfig, rows: int, capacity: int, device, dtype):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        # One tensor per layer, (rows, kv_heads, capacity, head_dim): separate tensors, so that a compiled
        # decode step writes each in place (a view of one shared tensor would be copied whole per write).
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.lengths = torch.zeros(0, dtype=torch.long, device=device)
        self._allocate(rows, capacity)

    def _allocate(self, rows: int, capacity: int) -> None:
        cfg = self.cfg
        old_rows, old_cap = (self.rows, self.capacity) if self.k else (0, 0)

        def grown(old: torch.Tensor | None) -> torch.Tensor:
            new = torch.zeros((rows, cfg.n_kv_head, capacity, cfg.head_dim), device=self.device, dtype=self.dtype)
            if old is not None:
                new[:old_rows, :, :old_cap] = old
            return new

        self.k = [grown(self.k[i] if self.k else None) for i in range(cfg.n_layer)]
        self.v = [grown(self.v[i] if self.v else None) for i in range(cfg.n_layer)]
        lengths = torch.zeros(rows, dtype=torch.long, device=self.device)
        lengths[:old_rows] = self.lengths
        self.lengths = lengths

    @property
    def rows(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def reserve(self, rows: int, capacity: int) -> None:
        """Make room for `rows` rows of `capacity` tokens (one more than written: a decode step may write
        a throwaway key at the end of a row that is not decoding)."""
        capacity = min(capacity + 1, self.cfg.max_seq_len + 1)
        if rows > self.rows or capacity > self.capacity:
            grow = lambda have, need: max(have, 1 << max(need - 1, 1).bit_length())  # noqa: E731
            self._allocate(grow(self.rows, rows), grow(self.capacity, capacity))

    def move_row(self, src: int, dst: int) -> None:
        """Row `src` becomes row `dst` (rows stay packed when a sequence leaves)."""
        for t in (*self.k, *self.v):
            t[dst] = t[src]
        self.lengths[dst] = self.lengths[src]

    def copy_row(self, src: int, dst: int, n: int) -> None:
        """n samples of one prompt share its prefill: copy the first n keys and values of a row."""
        for t in (*self.k, *self.v):
            t[dst, :, :n] = t[src, :, :n]
        self.lengths[dst] = n


@dataclass
class CacheView:
    """One forward pass's use of the cache: which rows, where each new token goes, who may see whom."""
    cache: KVCache
    rows: slice
    row_index: torch.Tensor  # (B, 1): 0..B-1, to scatter each row's new keys at its own positions
    positions: torch.Tensor  # (B, T): the new tokens' positions (each row continues after its length)
    span: int  # keys to attend over: the longest row after this pass
    mask: torch.Tensor | None  # (B, 1, T, span): a query sees the keys at or before its position
    start: int | None  # when every row starts at the same position (batch 1, n samples): it

    @classmethod
    def make(cls, cache: KVCache, rows: slice, T: int, max_len: int) -> CacheView:
        starts = cache.lengths[rows]
        first, last = int(starts.min()), int(starts.max())
        positions = starts[:, None] + torch.arange(T, device=starts.device)
        span = last + T
        if span > max_len:
            raise PocketError(f"sequence of {span} tokens exceeds max_seq_len={max_len}")
        cache.reserve(rows.stop, span)
        uniform = first == last
        # Rows of equal length need no mask to decode one token (every key is visible), and the
        # per-row scatter becomes a plain slice copy: what batch-1 decoding spends its time on.
        mask = None
        if not (uniform and T == 1):
            mask = (torch.arange(span, device=starts.device)[None, None, :] <= positions[:, :, None])[:, None]
        return cls(cache, rows, torch.arange(len(starts), device=starts.device)[:, None], positions, span,
                   mask, first if uniform else None)


# ----------------------------------------------------------------------------- the loss


def _chunk_rows(vocab_size: int) -> int:
    """Rows per chunk of the LM head: about two million logits (8 MB in fp32), yet at least 64 rows, so
    that a chunk's matmuls stay efficient with a large vocabulary. The `small` model's compiled step
    (vocab 4,096, 16 x 256 tokens, bf16, 2 threads) took ~249 ms with chunks of 256 rows (a million
    logits) and ~235 with 512, 768 or 1,024, runs taking turns: fewer, larger matmuls."""
    return max(64, (1 << 21) // vocab_size)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's (bf16) when it is on, else the tensor's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class ChunkedCrossEntropy(torch.autograd.Function):
    """The LM head's cross-entropy, chunk by chunk of rows, with its gradients computed in the forward pass.

    The plain way, `cross_entropy(lm_head(x).float(), y)`, materialises the fp32 logits of the whole
    batch (B*T x V: 64 MB for 16 x 256 x 4096), keeps them for the backward pass, and its log-softmax
    and backward stream them through memory several times. Here each chunk gets its logits in the
    compute dtype (bf16 under autocast) and their log-softmax in fp32, and at once the gradient of
    the logits (softmax - one-hot, rounded to the compute dtype before its matmuls, as autocast
    does), which is folded into dx and dW and dropped. The loss is a scalar (a sum or a mean), so
    the backward pass has nothing left to do but scale them (Liger Kernel's fused linear
    cross-entropy does the same on GPUs).
    """

    @staticmethod
    def forward(ctx, x, weight, targets, mean: bool):
        dtype = _compute_dtype(x)
        xs, w = x.to(dtype), weight.to(dtype)
        valid = targets != -1
        scale = 1.0 / valid.sum() if mean else torch.ones((), device=x.device)
        want_dx, want_dw = ctx.needs_input_grad[:2]
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        dx = torch.empty_like(xs) if want_dx else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if want_dw else None
        rows = _chunk_rows(weight.shape[0])
        for start in range(0, x.shape[0], rows):
            xc, tc, vc = xs[start:start + rows], targets[start:start + rows], valid[start:start + rows]
            tc = tc.clamp(min=0)[:, None]  # an ignored row reads any logit; vc zeroes its loss and gradient
            logits = (xc @ w.T).float()
            lse = logits.logsumexp(-1, keepdim=True)
            loss += ((lse - logits.gather(1, tc)).squeeze(1) * vc).sum()
            if want_dx or want_dw:
                grad = logits.sub_(lse).exp_()  # the softmax, in place of the logits
                grad.scatter_add_(1, tc, -torch.ones_like(lse))
                grad = grad.mul_(vc[:, None] * scale).to(dtype)
                if want_dx:
                    dx[start:start + rows] = grad @ w
                if want_dw:
                    dw += grad.T @ xc
        ctx.save_for_backward(dx, dw)
        ctx.dtypes = x.dtype, weight.dtype
        return loss * scale

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        return (None if dx is None else (dx * grad_loss).to(x_dtype),
                None if dw is None else (dw * grad_loss).to(w_dtype), None, None)


class ChunkedTokenLogprobs(torch.autograd.Function):
    """log p(target) of every row under the LM head, and the entropy of each row's distribution, chunk
    by chunk, never holding the whole batch's fp32 logits (RL scores 128 answers of 200 tokens at
    once: 100M logits, 420 MB per copy, several copies kept for the backward pass).

    Unlike a summed loss, each log-probability enters the RL loss on its own, so the gradient of the
    logits (one-hot - softmax, times the incoming gradient of that row) is only known in the backward
    pass: it recomputes each chunk's logits there. The entropy is for logging: it has no gradient."""

    @staticmethod
    def forward(ctx, x, weight, targets, with_entropy: bool):
        dtype = _compute_dtype(x)
        xs, w = x.to(dtype), weight.to(dtype)
        rows = _chunk_rows(weight.shape[0])
        logprobs, entropies = [], []
        for start in range(0, x.shape[0], rows):
            logp = (xs[start:start + rows] @ w.T).float().log_softmax(-1)
            logprobs.append(logp.gather(1, targets[start:start + rows, None]).squeeze(1))
            if with_entropy:
                entropies.append(-(logp.exp() * logp).sum(-1))
        ctx.save_for_backward(xs, w, targets)
        ctx.dtypes = x.dtype, weight.dtype
        entropy = torch.cat(entropies) if with_entropy else torch.empty(0, device=x.device)
        ctx.mark_non_differentiable(entropy)
        return torch.cat(logprobs), entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        xs, w, targets = ctx.saved_tensors
        want_dx, want_dw = ctx.needs_input_grad[:2]
        dx = torch.empty_like(xs) if want_dx else None
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_dw else None
        rows = _chunk_rows(w.shape[0])
        for start in range(0, xs.shape[0], rows):
            xc, g = xs[start:start + rows], grad_logprobs[start:start + rows, None].float()
            grad = (xc @ w.T).float().softmax(-1).mul_(-g)  # d logp[y] / d logits = one-hot - softmax
            grad.scatter_add_(1, targets[start:start + rows, None], g)
            grad = grad.to(xs.dtype)
            if want_dx:
                dx[start:start + rows] = grad @ w
            if want_dw:
                dw += grad.T @ xc
        x_dtype, w_dtype = ctx.dtypes
        return (None if dx is None else dx.to(x_dtype), None if dw is None else dw.to(w_dtype), None, None)


def lm_head_logprobs(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log p(targets), entropy or None) per position, in fp32, for x (..., d) and targets (...) of valid ids."""
    lp, entropy = ChunkedTokenLogprobs.apply(x.reshape(-1, x.shape[-1]), weight, targets.reshape(-1), with_entropy)
    return lp.view(targets.shape), (entropy.view(targets.shape) if with_entropy else None)


def lm_head_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          reduction: str = "mean") -> torch.Tensor:
    """cross_entropy(x @ weight.T, targets), targets == -1 ignored, without the whole batch's fp32 logits.

    A sum or a mean goes through ChunkedCrossEntropy; per-token losses (reduction="none", what
    evaluation asks for, without gradients) come chunk by chunk from the plain cross-entropy."""
    x, targets = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    if reduction == "none":
        rows = _chunk_rows(weight.shape[0])
        return torch.cat([F.cross_entropy(F.linear(xc, weight).float(), tc, ignore_index=-1, reduction="none")
                          for xc, tc in zip(x.split(rows), targets.split(rows))])
    if reduction not in ("mean", "sum"):
        raise PocketError(f"unknown reduction {reduction!r}: mean, sum or none")
    return ChunkedCrossEntropy.apply(x, weight, targets, reduction == "mean")


# ----------------------------------------------------------------------------- the transformer


def smear(k: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Smeared keys: k (B, KV, S, hd) -> sigmoid(keep) * k_t + (1 - sigmoid(keep)) * k_{t-1}, per K/V head
    (position 0 has no predecessor: zeros).

    Why: copying from the context ("the token that followed this one last time") takes an induction
    head, which in a plain transformer is two heads in two layers: one that copies the previous token
    into each position, and one whose query looks for it. Learning the pair is a plateau: the `small`
    model trained on nothing but repeated random tokens stayed at chance for 1,500 steps, the
    speedrun's whole pretraining. With the previous key already mixed into each key, one head does it:
    smeared, the same model copied half of the repeats by step 175 and 90.7% by step 300 (`pocketgpt lab
    induction`). The cache keeps the plain keys and the mix is taken where they are read, so rows of
    any length stay exact."""
    share = torch.sigmoid(keep).to(k.dtype)[:, None, None]
    return share * k + (1 - share) * F.pad(k[:, :, :-1], (0, 0, 1, 0))


# PyTorch's fused attention on a CPU (a flash-attention kernel) is built for long sequences. Forward +
# backward in bf16 on 2 threads, 4,096 tokens a batch in 4 heads of 64 dims, it took 29 ms at 256
# tokens a row where the plain steps of `causal_attention` took 15 ms, 56 against 45 at 512, and
# 65 against 117 at 1,024.
PLAIN_ATTENTION_MAX_LEN = 512


def causal_bias(length: int, device=None) -> torch.Tensor:
    """(length, length): 0 where a query may see a key, -inf above the diagonal (the future)."""
    return torch.full((length, length), float("-inf"), device=device).triu(1)


class KeyScores(torch.autograd.Function):
    """q @ k^T, the attention's scores (q: B x KV x G x T x D, k: B x KV x 1 x S x D), whose backward writes
    dk laid out as k is, (S, D) row by row.

    Autograd's own rule for a product with k^T computes the gradient of k^T, q^T @ dscores, laid out
    (D, S), and hands dk on as a transposed view. What reads dk next (the smeared keys' backward, whose
    share takes a sum over all of dk, and the rotary embedding's) then walks it against the grain: in
    the compiled training step of the `small` model inductor made that sum a scalar loop, 5.3 ms a
    layer. Computed as dscores^T @ q, dk arrives in k's own layout, the sum vectorises (1.5 ms a
    layer) and the step took 248 ms where it took 265 (bf16, 16 x 256 tokens, 2 threads, AMX; both
    compiled in one process, taking turns)."""

    @staticmethod
    def forward(ctx, q, k):
        ctx.dtypes = q.dtype, k.dtype
        dtype = _compute_dtype(q)  # the backward runs outside autocast: keep what the product ran in
        q, k = q.to(dtype), k.to(dtype)
        ctx.save_for_backward(q, k)
        return q @ k.transpose(-1, -2)

    @staticmethod
    def backward(ctx, grad):
        q, k = ctx.saved_tensors
        grad = grad.to(q.dtype)
        dq = dk = None
        if ctx.needs_input_grad[0]:
            dq = (grad @ k).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            dk = grad.transpose(-1, -2) @ q
            if dk.shape[2] != 1:  # the query heads that share this K/V head (GQA) all read k
                dk = dk.sum(2, keepdim=True)
            dk = dk.to(ctx.dtypes[1])
        return dq, dk


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal bias) v in plain steps. Query heads are grouped over their shared
    K/V head (GQA) by a view, without copying keys and values.

    The softmax runs in the scores' dtype (bf16 under autocast): PyTorch's kernels, eager and compiled,
    compute it in fp32 inside and round only the result, as an fp32 softmax cast to bf16 would, at
    half the memory traffic. The mask is a bias added to the scores (0, or -inf above the diagonal):
    with a masked_fill instead, the whole attention took twice as long, eager and compiled. `bias` is
    the model's stored one (GPT.causal_bias, at least T x T): built inside a compiled graph, the bias
    is recomputed from indices in the softmax's loop, which then took 4.3-4.9 ms a layer where reading a
    stored one took 1.9-2.4 (bf16, a training batch of 16 x 256 tokens, AMX, 2 threads)."""
    B, H, T, D = q.shape
    q = q.view(B, k.shape[1], H // k.shape[1], T, D) * D ** -0.5
    scores = KeyScores.apply(q, k.unsqueeze(2))
    future = (causal_bias(T, q.device) if bias is None else bias[:T, :T]).to(scores.dtype)
    return ((scores + future).softmax(-1) @ v.unsqueeze(2)).view(B, H, T, D)


# A matrix-vector product reads every weight once for one row of input. The BLAS kernel behind
# F.linear reads the decode step's weights at ~12 GB/s here; the same product written as a
# multiply-and-sum, which inductor turns into a vectorised, threaded reduction, reads them at ~50 GB/s
# (bench/bench_foundation.py). From ~8 rows on, the BLAS kernel, which reuses each weight across rows, wins.
ROW_LINEAR_MAX_ROWS = 4


_ONEDNN = torch.backends.mkldnn.is_available()
_ONEDNN_BF16 = _ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _packs(x: torch.Tensor, layer: nn.Linear) -> bool:
    """Whether packed_linear takes this product: a plain bias-free layer on a CPU with oneDNN, in fp32, or
    in bf16 where oneDNN has it."""
    dtype_ok = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _ONEDNN_BF16)
    return _ONEDNN and x.device.type == "cpu" and dtype_ok and layer.bias is None and type(layer) is nn.Linear


# Weights in oneDNN's blocked layout, reordered once per weight (and again if it changes in place).
_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()


@torch.library.custom_op("pocketgpt::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """x @ cat(weights).T (bf16 or fp32, CPU) with the weights stacked once into oneDNN's blocked layout, kept
    beside them.

    A plain matmul reorders its weight into that layout on every call, which at 32 decode rows is a good
    part of the product: a compiled whole-step graph avoids it by folding the weights in ("freezing"),
    but a deep model's decode graph is one block's, shared by all blocks, with the weights as inputs.
    Packed once, SmolLM2 decoded 32 rows ~8% faster in bf16 on an AMX machine (median of three A/B pairs),
    and in fp32 on an AVX2 one 8 rows ~2x and 32 rows ~1.6x faster (its 49,152-token head most of all);
    the price is a second copy of the weights. Weights that read the same input (q, k, v; gate, up) are
    stacked into one product: fewer, larger calls. An opaque op to the compiler, so it sees the weights themselves, not traced stand-ins."""
    stamp = tuple((id(w), w._version) for w in weights)
    entry = _PACKED.get(weights[0])
    if entry is None or entry[0] != stamp:
        stacked = weights[0] if len(weights) == 1 else torch.cat(weights)
        # 32: the batch size oneDNN chooses its layout for (any number of rows may use it)
        entry = _PACKED[weights[0]] = (stamp, torch.ops.mkldnn._reorder_linear_weight(stacked, 32))
    return torch.ops.mkldnn._linear_pointwise(x, entry[1], None, "none", [], "")


@packed_linear.register_fake
def _(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], sum(w.shape[0] for w in weights))


def _row_linears(x: torch.Tensor, *layers: nn.Linear, packed: bool = False) -> tuple[torch.Tensor, ...]:
    """layer(x) for each of `layers`, which all read the decode step's rows x (B, d_in).
    - A few rows: each layer by _row_linear.
    - Many rows, weights folded into the graph (the default): one product with the weights stacked, which
      inductor folds into one constant and packs for oneDNN (the `small` model's 32-row bf16 step made 25
      oneDNN calls instead of 43: 1.6 ms a step instead of 3.4 here).
    - Many rows, `packed` (a deep model's block graph, which takes the weights as inputs: stacking them
      there would copy them every step): bf16 or fp32 on a CPU through packed_linear, which stacks and packs
      them once; otherwise layer by layer. (In the `small` model's folded fp32 graph, packed_linear gained
      nothing: its products are small, and the op is called through Python.)"""
    if x.shape[0] <= ROW_LINEAR_MAX_ROWS:
        return tuple(_row_linear(x, layer) for layer in layers)
    if not packed:
        return _projections(x, *layers)
    if torch.compiler.is_compiling() and all(_packs(x, layer) for layer in layers):
        y = packed_linear(x, [layer.weight for layer in layers])
        return y.split([layer.out_features for layer in layers], -1) if len(layers) > 1 else (y,)
    return tuple(layer(x) for layer in layers)


def _row_linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """layer(x) for a few of the decode step's rows x (B, d_in): inside a compiled graph as a reduction;
    F.linear otherwise. An adapted layer (LoRA) is itself: its weight is only the frozen base (a compiled
    decode of up to 4 rows sampled from the base model, and GRPO with LoRA trained on those samples)."""
    if not torch.compiler.is_compiling() or type(layer) is not nn.Linear:
        return layer(x)
    if has_blocks(layer):  # a GGUF file's 4- or 8-bit weights, the same values in a quarter of the bytes
        y = block_row_linear(x, layer).to(x.dtype)
    else:
        y = (layer.weight.float() * x.float()[:, None, :]).sum(-1).to(x.dtype)  # fp32 accumulation, as a matmul does
    return y if layer.bias is None else y + layer.bias


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query per row over its cached keys: q (B, H, hd), k/v (B, KV, S, hd), mask (B, S) -> (B, H, hd).
    Compiled: plain products and sums (query heads grouped over their K/V head by a view), which inductor
    fuses into a few reductions that read the keys and values where the cache holds them. SDPA's kernel
    cost more than the arithmetic at this size (55 us a call against a whole 0.6 ms decode step of the
    `small` model); batched matmuls copied each block's cached keys and values first (SmolLM2's 32-row
    bf16 step 5-10% slower, fp32 ~5%; the `small` model's the same either way)."""
    B, H, hd = q.shape
    KV = k.shape[1]
    if not torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q[:, :, None], k.to(q.dtype), v.to(q.dtype), attn_mask=mask[:, None, None, :],
                                              enable_gqa=KV != H)[:, :, 0]
    qg = q.view(B, KV, H // KV, 1, hd).float()
    scores = (qg * k[:, :, None].float()).sum(-1) / math.sqrt(hd)  # (B, KV, G, S)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    y = (p[..., None] * v[:, :, None].float()).sum(-2)  # (B, KV, G, hd)
    return y.reshape(B, H, hd).to(q.dtype)


def _projections(x: torch.Tensor, *layers: nn.Linear) -> tuple[torch.Tensor, ...]:
    """layer(x) for each of `layers`, which all read x: in a compiled graph (the training step), as one
    matmul against their weights stacked, which the backward pass turns into one matmul for x's
    gradient too. On the `small` model that trained 11% faster (4,096 tokens a step, 2 threads); eager,
    stacking the weights every call cost as much as it saved, and decoding reads them once per token.
    Adapted layers (LoRA) go one by one."""
    if not torch.compiler.is_compiling() or any(type(layer) is not nn.Linear for layer in layers) \
            or len({layer.bias is None for layer in layers}) > 1:
        return tuple(layer(x) for layer in layers)
    weight = torch.cat([layer.weight for layer in layers])
    bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
    return F.linear(x, weight, bias).split([layer.out_features for layer in layers], -1)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.n_head * hd, cfg.d_model, bias=False)
        if cfg.smear_keys:  # logits of each K/V head's share of its own key; 0: half its own, half the previous
            self.key_smear = nn.Parameter(torch.zeros(cfg.n_kv_head))

    def keys(self, k: torch.Tensor) -> torch.Tensor:
        """The keys attention compares queries with: k itself, or smeared (k: a row's keys from position 0)."""
        return smear(k, self.key_smear) if self.cfg.smear_keys else k

    def forward(self, x, cos, sin, cached: CacheView | None, mask: torch.Tensor | None = None,
                bias: torch.Tensor | None = None):
        B, T, _ = x.shape
        cfg = self.cfg
        q, k, v = _projections(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)
        k = k.view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        v = v.view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        # The tables in q's dtype (bf16 under autocast): fp32 ones would promote q and k to fp32, and
        # the attention's matmuls would cast them back.
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = cfg.n_kv_head != cfg.n_head
        if cached is None and mask is None and x.device.type == "cpu" and T <= PLAIN_ATTENTION_MAX_LEN:
            y = causal_attention(q, self.keys(k), v, bias)
        elif cached is None:
            y = F.scaled_dot_product_attention(q, self.keys(k), v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=gqa)
        else:  # append to each row's keys and values, then attend over the row's history
            k_rows, v_rows = cached.cache.k[self.layer][cached.rows], cached.cache.v[self.layer][cached.rows]
            if cached.start is not None:
                k_rows[:, :, cached.start:cached.start + T] = k
                v_rows[:, :, cached.start:cached.start + T] = v
            else:
                k_rows[cached.row_index, :, cached.positions] = k.transpose(1, 2).to(k_rows.dtype)
                v_rows[cached.row_index, :, cached.positions] = v.transpose(1, 2).to(v_rows.dtype)
            k, v = self.keys(k_rows[:, :, :cached.span].to(q.dtype)), v_rows[:, :, :cached.span].to(q.dtype)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=cached.mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        gate, up = _projections(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cached, mask=None, bias=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cached, mask, bias)
        return x + self.mlp(self.post_attention_layernorm(x))


def _norm(norm: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """norm(x) in x's dtype: the decode step's rows may be fp32 in a bf16 model (decode_block)."""
    weight = fp32_norm_weight(norm) if x.dtype == torch.float32 else norm.weight.to(x.dtype)
    return F.rms_norm(x, norm.normalized_shape, weight, norm.eps)


def decode_block(block: Block, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                 positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 packed: bool = False) -> torch.Tensor:
    """One block of the decode step (GPT.decode_step): x (B, d) -> (B, d), writing each row's new key and
    value into this block's cache tensors at `positions` and attending over the first mask.shape[1].
    `packed`: many bf16 rows multiply by weights packed once (see _row_linears)."""
    cfg, attn, mlp = block.self_attn.cfg, block.self_attn, block.mlp
    B, span = x.shape[0], mask.shape[1]
    if B <= ROW_LINEAR_MAX_ROWS and torch.compiler.is_compiling() and has_blocks(mlp.down_proj):
        # The products read block weights in fp32 whatever the model's dtype (blocks.py): rows kept in fp32
        # are not converted again inside each of them. A bf16 SmolLM2 decoded faster so in 5 of 5 A/B pairs
        # (by 2-19%: this machine drifts). The cache keeps the model's dtype.
        x = x.float()
    cos, sin = rope
    h = _norm(block.input_layernorm, x)
    q, k, v = _row_linears(h, attn.q_proj, attn.k_proj, attn.v_proj, packed=packed)
    q = apply_rope(q.reshape(B, cfg.n_head, cfg.head_dim), cos, sin)
    k = apply_rope(k.reshape(B, cfg.n_kv_head, cfg.head_dim), cos, sin)
    v = v.reshape(B, cfg.n_kv_head, cfg.head_dim)
    rows = torch.arange(B, device=x.device)
    keys[rows, :, positions] = k.to(keys.dtype)
    values[rows, :, positions] = v.to(values.dtype)
    y = _decode_attention(q, attn.keys(keys[:B, :, :span]), values[:B, :, :span], mask)
    x = x + _row_linears(y.reshape(B, -1), attn.o_proj, packed=packed)[0]
    h = _norm(block.post_attention_layernorm, x)
    gate, up = _row_linears(h, mlp.gate_proj, mlp.up_proj, packed=packed)
    return x + _row_linears(F.silu(gate) * up, mlp.down_proj, packed=packed)[0]


class Backbone(nn.Module):
    """Hugging Face calls this `model`: embeddings, the blocks and the final norm."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if cfg.score_head:  # Hugging Face's LlamaForSequenceClassification calls it `score`, too
            self.score = nn.Linear(cfg.d_model, 1, bias=False)
        cos, sin = rope_tables(cfg, cfg.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("causal_bias", causal_bias(PLAIN_ATTENTION_MAX_LEN), persistent=False)
        if self.lm_head.weight.device.type != "meta":  # on "meta", weights come from a file (from_weights)
            self.apply(self._init_weights)
            # GPT-2's trick: scale the projections that write into the residual stream by 1/sqrt(2 * n_layer).
            for name, p in self.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    @classmethod
    def from_weights(cls, cfg: GPTConfig, weights: dict[str, torch.Tensor]) -> GPT:
        """A model built around given weights, without random initialisation or a second copy: the
        module is made on the "meta" device (shapes only) and the tensors are put in place."""
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict(weights, strict=False, assign=True)
        if cfg.tie_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        device = model.model.embed_tokens.weight.device
        cos, sin = rope_tables(cfg, cfg.max_seq_len, device)
        model.rope_cos, model.rope_sin = cos, sin
        model.causal_bias = causal_bias(PLAIN_ATTENTION_MAX_LEN, device)
        return model

    # ------------------------------------------------------------------ forward

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None, rows: slice | None = None,
                      advance: bool = True, all_layers: bool = False,
                      attn_masks: dict[int, torch.Tensor] | None = None):
        """Final (normed) hidden states (B, T, d); with all_layers, the residual stream after every block too.

        With a cache, the B rows of `idx` continue cache rows `rows` (default: the first B), each after
        its own length; `advance=False` leaves the lengths for the caller to move (a batch in which
        some rows only wait). `attn_masks` replaces the causal mask of some layers (layer -> a boolean
        (B, 1, T, T) mask, True where a query may see a key): interpretability experiments cut
        chosen attention edges with it (the lab's attention knockout)."""
        B, T = idx.shape
        cached = None
        attn_masks = attn_masks or {}
        if attn_masks and cache is not None:
            raise PocketError("attention masks replace the causal mask of a full pass: not with a cache")
        if cache is None:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
            if T > self.cfg.max_seq_len:
                raise PocketError(f"sequence of {T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        else:
            rows = rows if rows is not None else slice(0, B)
            cached = CacheView.make(cache, rows, T, self.cfg.max_seq_len)
            cos, sin = self.rope_cos[cached.positions].unsqueeze(1), self.rope_sin[cached.positions].unsqueeze(1)
        x = self.model.embed_tokens(idx)
        stream = [x] if all_layers else None
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, cached, attn_masks.get(i), self.causal_bias)
            if all_layers:
                stream.append(x)
        if cached is not None and advance:
            cache.lengths[rows] += T
        x = self.model.norm(x)
        return (x, stream) if all_layers else x

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                rows: slice | None = None, advance: bool = True, reduction: str = "mean"):
        """Logits (B, T, V) without targets; with targets, the cross-entropy (targets == -1 are ignored)."""
        x = self.hidden_states(idx, cache, rows, advance)
        if targets is None:
            return self.lm_head(x)
        return lm_head_cross_entropy(x, self.lm_head.weight, targets, reduction)

    def decode_step(self, ids: torch.Tensor, positions: torch.Tensor, keys: list[torch.Tensor],
                    values: list[torch.Tensor], span: int) -> torch.Tensor:
        """One new token for each of B cache rows: ids (B,) go at `positions` (B,), each row's keys and
        values are written there, and the next-token logits (B, V) come back.

        The same arithmetic as `forward` with a cache, written for `torch.compile`: tensors in, tensors
        out, no Python decisions on values, so the whole step becomes one graph of fused kernels (the
        engine may instead compile `decode_block` once for every block: see Engine). Rows attend over
        their first `span` keys, masked at their own position (rows may differ in length).
        """
        x, rope, mask = self.decode_inputs(ids, positions, span)
        for block, k, v in zip(self.model.layers, keys, values):
            x = decode_block(block, x, rope, mask, positions, k, v)
        return self.decode_head(x)

    def decode_inputs(self, ids: torch.Tensor, positions: torch.Tensor, span: int):
        """The decode step's embeddings (B, d), rotary tables (cos, sin: (B, 1, hd)) and mask (B, span)."""
        # A row that only rides along may sit at the end of the context: its throwaway key needs some angle.
        angle = positions.clamp(max=self.cfg.max_seq_len - 1)
        rope = self.rope_cos[angle][:, None, :], self.rope_sin[angle][:, None, :]
        mask = torch.arange(span, device=ids.device)[None, :] <= positions[:, None]
        return self.model.embed_tokens(ids), rope, mask

    def decode_head(self, x: torch.Tensor, packed: bool = False) -> torch.Tensor:
        """The decode step's logits (B, V) from the last block's output (`packed`: see _row_linears)."""
        return _row_linears(_norm(self.model.norm, x), self.lm_head, packed=packed)[0]

    def scores(self, idx: torch.Tensor) -> torch.Tensor:
        """The scalar head at every position (B, T): a reward model reads it at <|reward|>, a value model everywhere.

        The head runs in fp32 even under bf16 autocast: a bf16 reward keeps 8 bits (steps of 1/128 near 1), and
        scored so, 49 of the speedrun reward model's 1,847 held-out pairs tied (pairwise accuracy 74.8%, 76.3%
        with the head in fp32, the same weights)."""
        h = self.hidden_states(idx)
        with torch.autocast(h.device.type, enabled=False):
            return self.score(h.float()).squeeze(-1)

    def extend_context(self, length: int) -> None:
        """Let the model read sequences of up to `length` tokens: RoPE has no learned positions, so this is
        its cos/sin tables for more positions (quality past the trained length is another matter)."""
        if length <= self.cfg.max_seq_len:
            return
        self.cfg.max_seq_len = length  # in place: the blocks share this config
        cos, sin = rope_tables(self.cfg, length)
        self.rope_cos, self.rope_sin = cos.to(self.rope_cos), sin.to(self.rope_sin)

    def with_score_head(self) -> GPT:
        """A copy of this model with a fresh scalar head (a reward model starts from the SFT model)."""
        new = GPT(replace(self.cfg, score_head=True)).to(self.lm_head.weight.device)
        new.load_state_dict(self.state_dict(), strict=False)
        nn.init.zeros_(new.score.weight)  # start by scoring everything 0: no initial preference
        return new

    # ------------------------------------------------------------------ bookkeeping

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: per matmul weight 2 forward and 2 for its input's gradient, and 2 more
        for its own gradient if it trains (6 each in full training; 4 for the frozen base weights of LoRA,
        which would otherwise put its MFU above 100%), plus attention's 12*L*d*T."""
        cfg = self.cfg
        T = seq_len or cfg.max_seq_len
        # The input embedding is a lookup (free); the output projection is a matmul even when tied, unless the
        # model trains through its scalar head (a reward or value model), which never computes the logits.
        skipped = [self.model.embed_tokens.weight] + ([self.lm_head.weight] if cfg.score_head else [])
        weights = [p for p in self.parameters() if all(p is not q for q in skipped)]
        if cfg.tie_embeddings and not cfg.score_head:
            weights.append(self.lm_head.weight)
        matmul = sum((6 if p.requires_grad else 4) * p.numel() for p in weights)
        return matmul + 12 * cfg.n_layer * cfg.d_model * T

    def make_cache(self, rows: int = 1, capacity: int = 64, dtype=None) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.cfg, rows, capacity, p.device, dtype or p.dtype)
