"""Block-quantized weights: a GGUF file's 4- and 8-bit weights, kept as they are for decoding.

A Q4_1 file stores each run of 32 weights of a row as 4-bit codes q with a scale d and an offset m,
w = q * d + m (Q4_0: m = -8 d; Q8_0: 8-bit signed codes and no offset). Importing dequantizes them
into the model's dense fp32 (or bf16) weights, which everything computes with: training, prefill,
export. Decoding one row at a time reads every weight once per token, so its speed is the speed at
which it reads them: SmolLM2-135M's dense fp32 weights are 540 MB a token. The same weights as
blocks are 4.5 to 8.5 bits each in the file (6 and 9 here, where the scales are fp32), 112 MB for
SmolLM2's Q4_1 layers and Q8_0 head: the importer keeps them beside the dense ones (blocks.safetensors),
and the decode step's few-row products (model._row_linear) read them instead, dequantizing inside
the reduction and accumulating in fp32. The values are the dense weights' exactly (checked when
attached), so the result is the dense product's up to the order of summation.

Layout (ours, chosen for the compiled reduction, not GGUF's interleaving): for a weight [N, K],
    4-bit  codes uint8 [N, K/2]: the low nibble holds column k, the high one column k + K/2
    8-bit  codes int8 [N, K]
    scale, offset fp32 [N, K/32] (offset absent for 8 bits)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .errors import PocketError

BLOCK = 32  # weights per scale in every GGUF type kept here


@dataclass
class BlockWeight:
    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None  # None: 8-bit codes, w = codes * scale

    @property
    def bits(self) -> int:
        return 8 if self.offset is None else 4

    @property
    def shape(self) -> tuple[int, int]:
        rows, width = self.codes.shape
        return rows, width if self.bits == 8 else 2 * width

    def dequantize(self) -> torch.Tensor:
        """The dense fp32 weight, computed as gguf's dequantization computes it (a product, then a sum)."""
        scale = self.scale.repeat_interleave(BLOCK, dim=1)
        if self.offset is None:
            return self.codes.float() * scale
        codes = torch.cat((self.codes & 15, self.codes >> 4), dim=1).float()
        return codes * scale + self.offset.repeat_interleave(BLOCK, dim=1)

    def take_rows(self, order: torch.Tensor) -> BlockWeight:
        """The same weight with its rows reordered (llama.cpp's query/key reordering undone)."""
        return BlockWeight(self.codes[order], self.scale[order], None if self.offset is None else self.offset[order])


# ----------------------------------------------------------------------------- from GGUF's blocks


def from_gguf(kind: str, raw: np.ndarray, shape: tuple[int, int]) -> BlockWeight | None:
    """A GGUF tensor's raw blocks (uint8, as gguf's reader maps them) in our layout; None when the type
    is not one kept here or, for 4 bits, the row does not split into two halves of whole blocks (K a
    multiple of 64)."""
    rows, cols = shape
    if kind not in ("Q4_0", "Q4_1", "Q8_0") or cols % (BLOCK if kind == "Q8_0" else 2 * BLOCK):
        return None
    blocks = np.ascontiguousarray(raw).reshape(rows, cols // BLOCK, -1)
    scale = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))
    if kind == "Q8_0":
        codes = torch.from_numpy(blocks[..., 2:].copy().view(np.int8)).reshape(rows, cols)
        return BlockWeight(codes, scale, None)
    if kind == "Q4_1":
        offset = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
        packed = torch.from_numpy(blocks[..., 4:].copy())
    else:  # Q4_0: w = (q - 8) d = q d + (-8 d), exactly (a half-precision d times a small integer)
        offset = -8 * scale
        packed = torch.from_numpy(blocks[..., 2:].copy())
    # GGUF's byte j of a block holds its weights j (low nibble) and j + 16 (high nibble)
    codes = torch.cat((packed & 15, packed >> 4), dim=-1).reshape(rows, cols)
    half = cols // 2
    return BlockWeight(codes[:, :half] | (codes[:, half:] << 4), scale, offset)


# ----------------------------------------------------------------------------- on disk (checkpoint.py)


def to_tensors(weights: dict[str, BlockWeight]) -> dict[str, torch.Tensor]:
    """Named tensors for a safetensors file: `<weight name>.codes`, `.scale` and `.offset`."""
    tensors = {}
    for name, w in weights.items():
        tensors[f"{name}.codes"], tensors[f"{name}.scale"] = w.codes.contiguous(), w.scale.contiguous()
        if w.offset is not None:
            tensors[f"{name}.offset"] = w.offset.contiguous()
    return tensors


def from_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, BlockWeight]:
    names = {key.rsplit(".", 1)[0] for key in tensors}
    return {n: BlockWeight(tensors[f"{n}.codes"], tensors[f"{n}.scale"], tensors.get(f"{n}.offset")) for n in names}


# ----------------------------------------------------------------------------- on the model


def attach(model: nn.Module, weights: dict[str, BlockWeight], where: str, tied: dict[str, str]) -> int:
    """Give each linear layer whose weight is in `weights` its blocks, as non-persistent buffers
    (`codes`, `scale`, `offset`) that the decode step reads (row_linear); returns how many layers got them.
    `tied`: a layer's weight name -> the name its blocks are stored under (a tied lm_head is the embedding).
    A block weight that does not give the layer's weight back exactly is a corrupt or mismatched file."""
    count = 0
    for module_name, layer in model.named_modules():
        name = f"{module_name}.weight"
        name = tied.get(name, name)
        if type(layer) is not nn.Linear or name not in weights:
            continue
        w = weights[name]
        if w.shape != tuple(layer.weight.shape) or w.scale.shape != (w.shape[0], w.shape[1] // BLOCK):
            raise PocketError(f"{where}: {name} has blocks of shape {list(w.shape)}, the model's weight is "
                              f"{list(layer.weight.shape)}")
        if not torch.equal(w.dequantize().to(layer.weight.dtype), layer.weight.detach().cpu()):
            raise PocketError(f"{where}: {name}'s blocks do not give the model's weight back "
                              "(the file is corrupt or belongs to another model)")
        # The scales as their raw bits (int32): casting the model (model.to(torch.bfloat16)) casts every
        # floating buffer, and these must stay exact.
        device = layer.weight.device
        layer.register_buffer("codes", w.codes.to(device), persistent=False)
        layer.register_buffer("scale", w.scale.view(torch.int32).to(device), persistent=False)
        layer.register_buffer("offset", None if w.offset is None else w.offset.view(torch.int32).to(device),
                              persistent=False)
        count += 1
    if count:
        # The decode rows that read blocks are fp32 (model.decode_block): an fp32 copy of each norm's weight
        # (as bits, like the scales) spares converting a bf16 one inside every product's row loop, where
        # inductor computes the norm (a bf16 SmolLM2 decoded faster so in 5 of 5 A/B pairs, +1-10%).
        for norm in model.modules():
            if isinstance(norm, nn.RMSNorm) and norm.weight is not None:
                norm.register_buffer("weight_bits", norm.weight.detach().float().view(torch.int32), persistent=False)
    return count


def has_blocks(layer: nn.Module) -> bool:
    return getattr(layer, "codes", None) is not None


def fp32_norm_weight(norm: nn.RMSNorm) -> torch.Tensor:
    """The norm's weight in fp32: the copy attach kept, or the weight converted."""
    bits = getattr(norm, "weight_bits", None)
    return norm.weight.float() if bits is None else bits.view(torch.float32)


def row_linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """x (B, K) times the layer's block weight, in fp32: (B, N). Written as products and sums that inductor
    fuses into one reduction reading each code once (the decode step compiles it); for 4 bits, the two
    nibbles of a byte meet the two halves of x."""
    codes, scale, offset = layer.codes, layer.scale.view(torch.float32), layer.offset
    B, rows = x.shape[0], codes.shape[0]
    if offset is None:
        w = codes.view(rows, -1, BLOCK).float() * scale[..., None]
        return (w.view(rows, -1)[None] * x.float()[:, None, :]).sum(-1)
    offset = offset.view(torch.float32)
    blocks = codes.shape[1] // BLOCK  # per half of the row
    halves = x.float().view(B, 2, blocks, BLOCK)
    low = (codes & 15).view(rows, blocks, BLOCK).float() * scale[:, :blocks, None] + offset[:, :blocks, None]
    high = (codes >> 4).view(rows, blocks, BLOCK).float() * scale[:, blocks:, None] + offset[:, blocks:, None]
    return (low[None] * halves[:, None, 0]).sum((-1, -2)) + (high[None] * halves[:, None, 1]).sum((-1, -2))
