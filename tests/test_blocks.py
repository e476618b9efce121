"""Block-quantized weights: GGUF's blocks in our layout give gguf's own dequantization back exactly, the
row product over them equals the dense one, and a block weight that does not match its layer is refused."""

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from pocketgpt.blocks import BlockWeight, attach, from_gguf, from_tensors, has_blocks, row_linear, to_tensors
from pocketgpt.common import PocketError

KINDS = ["Q4_0", "Q4_1", "Q8_0"]


def quantized(kind: str, rows: int, cols: int, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """A random weight quantized by gguf as llama.cpp does: its raw blocks and gguf's dequantization."""
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType[kind])
    return raw, torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]))


def layer_with_blocks(kind: str, rows: int = 24, cols: int = 128, bias: bool = False) -> tuple[nn.Module, BlockWeight]:
    raw, dense = quantized(kind, rows, cols)
    model = nn.ModuleDict({"proj": nn.Linear(cols, rows, bias=bias)})
    with torch.no_grad():
        model["proj"].weight.copy_(dense)
    blocks = from_gguf(kind, raw, (rows, cols))
    assert attach(model, {"proj.weight": blocks}, "test", {}) == 1
    return model, blocks


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_give_ggufs_dequantized_weights_back(kind):
    raw, dense = quantized(kind, 24, 128)
    w = from_gguf(kind, raw, (24, 128))
    assert w.bits == (8 if kind == "Q8_0" else 4) and w.shape == (24, 128)
    assert w.codes.numel() * 8 == 24 * 128 * w.bits  # 4 bits a weight: two to a byte
    assert torch.equal(w.dequantize(), dense)
    order = torch.randperm(24)
    assert torch.equal(w.take_rows(order).dequantize(), dense[order])
    again = from_tensors(to_tensors({"w": w}))["w"]  # what a blocks.safetensors file holds
    assert torch.equal(again.dequantize(), dense) and again.bits == w.bits


def test_only_4_and_8_bit_types_are_kept_and_4_bit_rows_must_halve_into_blocks():
    raw, _ = quantized("Q4_1", 4, 96)  # 96 columns: three blocks, not two halves of whole blocks
    assert from_gguf("Q4_1", raw, (4, 96)) is None
    raw8, dense8 = quantized("Q8_0", 4, 96)  # 8 bits need whole blocks only
    assert torch.equal(from_gguf("Q8_0", raw8, (4, 96)).dequantize(), dense8)
    assert from_gguf("F16", np.zeros((4, 128), np.float16).view(np.uint8), (4, 128)) is None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [1, 3])
def test_row_linear_equals_the_dense_product(kind, rows):
    model, _ = layer_with_blocks(kind, bias=True)
    layer = model["proj"]
    x = torch.randn(rows, 128)
    expected = x.double() @ layer.weight.double().T
    torch.testing.assert_close(row_linear(x, layer).double(), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_compiled_decode_product_reads_the_blocks(kind):
    """Inside a compiled graph, model._row_linear takes the blocks (and gives the dense product)."""
    from pocketgpt.model import _row_linear

    model, _ = layer_with_blocks(kind, bias=True)
    layer = model["proj"]
    x = torch.randn(2, 128)
    with torch.no_grad():
        layer.weight.zero_()  # now only the blocks hold the weight: a product read from them is not zero
        out = torch.compile(_row_linear, dynamic=False)(x, layer)
        torch.testing.assert_close(out, row_linear(x, layer) + layer.bias, atol=1e-4, rtol=1e-5)
        assert out.abs().sum() > 1


def test_attach_refuses_blocks_that_do_not_give_the_weight_back():
    model, blocks = layer_with_blocks("Q4_1")
    wrong = BlockWeight(blocks.codes ^ 1, blocks.scale, blocks.offset)
    fresh = nn.ModuleDict({"proj": nn.Linear(128, 24, bias=False)})
    with torch.no_grad():
        fresh["proj"].weight.copy_(model["proj"].weight)
    with pytest.raises(PocketError, match="do not give the model's weight back"):
        attach(fresh, {"proj.weight": wrong}, "x/blocks.safetensors", {})
    with pytest.raises(PocketError, match="shape"):
        attach(fresh, {"proj.weight": blocks.take_rows(torch.arange(12))}, "x/blocks.safetensors", {})
    assert not has_blocks(fresh["proj"])


def test_casting_the_model_leaves_the_scales_exact():
    model, blocks = layer_with_blocks("Q4_1")
    x = torch.randn(1, 128)
    before = row_linear(x, model["proj"])
    model.to(torch.bfloat16)
    assert model["proj"].weight.dtype == torch.bfloat16
    assert torch.equal(row_linear(x, model["proj"]), before)
