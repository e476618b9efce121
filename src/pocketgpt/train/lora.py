"""LoRA: fine-tune a few low-rank matrices beside each frozen weight instead of the weights themselves.

    y = W x + (B A x) * alpha / r        W frozen (out, in); A (r, in) and B (out, r) trained

B starts at zero, so the adapted model starts out computing exactly what the base model did.
Only A and B get gradients and optimizer state: for r=8 that is about 1-4% of the parameters.
The frozen W may be kept in bfloat16 or int8 (QLoRA's idea, with plain per-channel absmax
int8), which halves or quarters the memory the base weights take.

    apply_lora(model, r=8)       # q/k/v/o and the MLP projections gain adapters; all else freezes
    ...train as usual...         # make_optimizer only sees the trainable A and B
    merge_lora(model)            # W += B A * alpha / r: a plain GPT again, saved like any other

Names and initialisation follow Hugging Face PEFT (lora_A kaiming-uniform, lora_B zeros), and an
adapted projection keeps its base weight under its own name (q_proj.weight beside q_proj.lora_A),
so a LoRA model's state dict reads like the base model's plus the adapters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..common import PocketError
from ..config import require
from ..model import GPT

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASE_DTYPES = ("float32", "bfloat16", "int8")
ADAPTER_NAMES = ("lora_A", "lora_B")


@dataclass
class LoRAConfig:
    """The [lora] table of a stage's TOML config; use it as `apply_lora(model, **asdict(cfg))`. r = 0: off."""
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    # float32 | bfloat16 | int8: how the frozen base weights are stored. The merged model is that stored base plus
    # the adapters, the model they were trained on: bfloat16's or int8's rounding stays in every targeted layer.
    base_dtype: str = "float32"

    def __post_init__(self):
        self.check_values()

    def check_values(self) -> None:
        """alpha 0 trained adapters scaled by 0 (the model came out equal to its base), no targets failed with
        a RuntimeError about gradients."""
        on = self.r > 0
        require("lora", {
            "r": (self.r, self.r >= 0, "at least 0 (0 is off)"),
            "alpha": (self.alpha, not on or 0 < self.alpha < math.inf, "a number > 0"),
            "dropout": (self.dropout, 0 <= self.dropout < 1, "in [0, 1)"),
            "targets": (self.targets, not on or bool(self.targets), "at least one layer name"),
            "base_dtype": (self.base_dtype, self.base_dtype in ("float32", "bfloat16", "int8"),
                           "float32, bfloat16 or int8"),
        })


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric absmax: w ~= q * scale[:, None], q in [-127, 127]."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # clamp: an all-zero row must not divide by 0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class LoRALinear(nn.Module):
    """A frozen linear layer (float32, bfloat16 or int8) plus a trainable low-rank update B @ A."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 base_dtype: str = "float32"):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.base_dtype = base_dtype
        w = base.weight.detach()
        if base_dtype == "int8":
            q, scale = quantize_int8(w)
            self.register_buffer("weight_int8", q)
            self.register_buffer("weight_scale", scale)
        else:
            # float32 keeps the very tensor of the base model (no copy); bfloat16 halves it.
            self.weight = nn.Parameter(w.to(getattr(torch, base_dtype)), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach(), requires_grad=False)
        # The adapters stay float32 whatever the base is: they are what the optimizer updates.
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # what nn.Linear (and PEFT) do
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def base_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The frozen weight as a float (out, in) matrix, dequantised if it is int8."""
        if self.base_dtype == "int8":
            return self.weight_int8.to(dtype) * self.weight_scale.to(dtype)[:, None]
        return self.weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.base_dtype == "int8":
            # Scale the output channels rather than the weight: no dequantised copy of W is made.
            y = F.linear(x, self.weight_int8.to(x.dtype))
            y = y * self.weight_scale.to(y.dtype)
        else:
            y = F.linear(x, self.weight.to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing W + B A * scaling, in the adapters' (float) dtype; W is the base weight as
        stored (an int8 or bf16 base keeps its rounding: the weight the adapters were trained against)."""
        dtype = self.lora_A.dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.lora_A.device, dtype=dtype)
        linear.weight.copy_(self.base_weight(dtype) + self.lora_B @ self.lora_A * self.scaling)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, base_dtype={self.base_dtype}")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def apply_lora(model: GPT, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS, base_dtype: str = "float32") -> GPT:
    """Wrap every nn.Linear whose last name component is in `targets` (in place); freeze the rest."""
    if r <= 0:
        raise PocketError(f"LoRA rank r must be a positive integer, got {r}")
    if not 0 <= dropout < 1:
        raise PocketError(f"LoRA dropout must be in [0, 1), got {dropout}")
    if base_dtype not in BASE_DTYPES:
        raise PocketError(f"unknown LoRA base_dtype {base_dtype!r}; choose one of {', '.join(BASE_DTYPES)}")
    if lora_layers(model):
        raise PocketError("the model already has LoRA adapters; merge_lora it before adding new ones")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    available = sorted({name.rpartition(".")[2] for name in linears})
    unknown = sorted(set(targets) - set(available))
    if unknown:
        raise PocketError(f"LoRA targets {unknown} match no linear module; available: {', '.join(available)}")
    if "lm_head" in targets:
        # Tied, merging would untie it from the embeddings (a tied checkpoint stores only those); untied, the
        # losses and log-probs read the head's weight in chunks (ChunkedCrossEntropy), past any adapter: it
        # would never train.
        raise PocketError("cannot put LoRA on lm_head: the losses read its weight directly; adapt the blocks' layers")
    # B @ A of rank r above a layer's smaller side can change nothing a rank of that side cannot: it only costs
    # (an adapter of r = 4096 on 256-wide layers trained 13x slower, and merged into the same model)
    full_rank = {name: min(m.in_features, m.out_features) for name, m in linears.items()
                 if name.rpartition(".")[2] in targets}
    name, most = min(full_rank.items(), key=lambda item: item[1])
    if r > most:
        raise PocketError(f"LoRA rank r = {r} is above what the layer {name} ({linears[name].in_features} -> "
                          f"{linears[name].out_features}) can use: a rank of at most {most} (its smaller side) is a "
                          "full update of it; a low rank (4-64) is the point of LoRA")
    model.requires_grad_(False)
    for name, linear in linears.items():
        if name.rpartition(".")[2] in targets:
            _replace(model, name, LoRALinear(linear, r, alpha, dropout, base_dtype))
    return model


def merge_lora(model: GPT) -> GPT:
    """Fold each adapter into its weight: a plain GPT (original state-dict names), all trainable again."""
    for name, layer in lora_layers(model).items():
        _replace(model, name, layer.merged())
    return model.requires_grad_(True)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters: a few MB to save (e.g. with safetensors) instead of the whole model."""
    return {k: v for k, v in model.state_dict().items() if k.rpartition(".")[2] in ADAPTER_NAMES}


def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load adapters saved by `lora_state_dict` into a model with the same apply_lora settings."""
    expected = lora_state_dict(model)
    problems = [f"missing {k}" for k in sorted(set(expected) - set(sd))]
    problems += [f"unexpected {k}" for k in sorted(set(sd) - set(expected))]
    problems += [f"{k}: adapter has {tuple(sd[k].shape)}, model expects {tuple(expected[k].shape)}"
                 for k in sorted(set(sd) & set(expected)) if sd[k].shape != expected[k].shape]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
        raise PocketError(f"LoRA adapter does not match the model: {shown}")
    model.load_state_dict(sd, strict=False)


def trainable_summary(model: nn.Module) -> dict:
    """Trainable vs total parameters (int8 base weights count too), and the bytes all weights occupy."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.weight_int8.numel() for m in lora_layers(model).values() if m.base_dtype == "int8")
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}  # a tied weight counts once
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"trainable": trainable, "total": total, "fraction": trainable / total,
            "weight_bytes": weight_bytes}
