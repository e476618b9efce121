import copy
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pocketgpt.checkpoint import load_model, save_model
from pocketgpt.common import PocketError
from pocketgpt.model import GPT
from pocketgpt.train.loop import TrainConfig, make_optimizer
from pocketgpt.train.lora import (
    DEFAULT_TARGETS,
    apply_lora,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    merge_lora,
    trainable_summary,
)


def randomize_adapters(model, std=0.05):
    """B = 0 makes the adapter path contribute nothing; random B makes the tests mean something."""
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(std=std)


def tokens(model, shape=(2, 16)):
    return torch.randint(0, model.cfg.vocab_size, shape, generator=torch.Generator().manual_seed(0))


def test_fresh_adapter_is_the_base_model(tiny_model):
    x = tokens(tiny_model)
    with torch.no_grad():
        expected = tiny_model(x)
        lora = apply_lora(tiny_model, r=4, alpha=8)
        assert torch.equal(lora(x), expected)
    assert len(lora_layers(lora)) == len(DEFAULT_TARGETS) * lora.cfg.n_layer


def test_training_changes_only_the_adapters(tiny_model):
    model = apply_lora(tiny_model.train(), r=4, alpha=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.1))
    x, y = tokens(model), tokens(model).roll(1, dims=1)
    losses = []
    for _ in range(8):
        loss = model(x, targets=y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    for name, value in model.state_dict().items():
        is_adapter = name.endswith(("lora_A", "lora_B"))
        assert torch.equal(value, before[name]) != is_adapter, name


def test_merge_is_a_plain_gpt(tiny_model, chat, tmp_path):
    original_keys = list(tiny_model.state_dict())
    model = apply_lora(tiny_model, r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    randomize_adapters(model)
    x = tokens(model)
    with torch.no_grad():
        adapted = model(x)
        merged = merge_lora(model)
        assert type(merged) is GPT and not lora_layers(merged)
        assert list(merged.state_dict()) == original_keys
        assert all(p.requires_grad for p in merged.parameters())
        torch.testing.assert_close(merged(x), adapted, atol=1e-5, rtol=0)
        assert not torch.allclose(adapted, GPT(merged.cfg)(x))  # the adapters did change something
        save_model(merged, tmp_path / "m", chat)
        loaded, _, _ = load_model(tmp_path / "m")
        assert torch.equal(loaded(x), merged(x))


@pytest.mark.parametrize("base_dtype, stored, ratio",
                         [("bfloat16", torch.bfloat16, 2.0), ("int8", torch.int8, 3.5)])
def test_reduced_precision_base(tiny_model, base_dtype, stored, ratio):
    x = tokens(tiny_model)
    with torch.no_grad():
        fp32 = tiny_model(x)
    fp32_bytes = trainable_summary(apply_lora(copy.deepcopy(tiny_model), r=4))["weight_bytes"]
    model = apply_lora(tiny_model, r=4, base_dtype=base_dtype)
    layer = model.model.layers[0].self_attn.q_proj
    base = layer.weight_int8 if base_dtype == "int8" else layer.weight
    assert base.dtype == stored and layer.lora_A.dtype == torch.float32
    base_bytes = sum(t.nbytes for name, t in layer.state_dict().items() if not name.startswith("lora_"))
    assert layer.in_features * layer.out_features * 4 / base_bytes >= ratio
    assert trainable_summary(model)["weight_bytes"] < fp32_bytes
    with torch.no_grad():
        out = model(x)
    assert ((out - fp32).norm() / fp32.norm()).item() < 0.02
    randomize_adapters(model)
    with torch.autocast("cpu", torch.bfloat16):  # how the training loop runs it
        model(x, targets=x).backward()
    assert model.model.layers[0].mlp.up_proj.lora_B.grad is not None
    with torch.no_grad():
        adapted = model(x)
        torch.testing.assert_close(merge_lora(model)(x), adapted, atol=1e-4, rtol=1e-4)


def test_adapter_state_dict_round_trip(tiny_model):
    model = apply_lora(copy.deepcopy(tiny_model), r=2, targets=["o_proj"])
    randomize_adapters(model)
    sd = st_load(st_save(lora_state_dict(model)))
    assert sorted(sd) == [f"model.layers.{i}.self_attn.o_proj.lora_{m}" for i in range(2) for m in "AB"]
    fresh = apply_lora(tiny_model, r=2, targets=["o_proj"])
    load_lora_state_dict(fresh, sd)
    x = tokens(model)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    del sd["model.layers.1.self_attn.o_proj.lora_B"]
    sd["model.layers.0.self_attn.o_proj.lora_A"] = torch.zeros(3, 64)
    with pytest.raises(PocketError, match=r"missing .*layers\.1.*lora_B.*adapter has \(3, 64\)"):
        load_lora_state_dict(fresh, sd)


def test_trainable_summary(tiny_model):
    total = tiny_model.num_params()
    model = apply_lora(tiny_model, r=8)
    expected = sum(8 * (m.in_features + m.out_features) for m in lora_layers(model).values())
    summary = trainable_summary(model)
    assert summary["trainable"] == expected
    assert summary["total"] == total + expected
    assert summary["fraction"] == pytest.approx(expected / (total + expected))


def test_bad_arguments(tiny_model):
    with pytest.raises(PocketError, match="positive"):
        apply_lora(tiny_model, r=0)
    with pytest.raises(PocketError, match=r"qproj.] match no linear module; available: down_proj.*q_proj"):
        apply_lora(tiny_model, targets=["qproj", "v_proj"])
    for tied in (True, False):  # untied, the chunked losses read the head's weight past the adapter: never trained
        with pytest.raises(PocketError, match="cannot put LoRA on lm_head: the losses read its weight directly"):
            apply_lora(GPT(replace(tiny_model.cfg, tie_embeddings=tied)), targets=["lm_head"])
    with pytest.raises(PocketError, match="base_dtype"):
        apply_lora(tiny_model, base_dtype="int4")
    smallest = min(min(m.in_features, m.out_features) for name, m in tiny_model.named_modules()
                   if name.endswith(DEFAULT_TARGETS))
    with pytest.raises(PocketError, match=rf"rank r = {smallest + 1} is above .* at most {smallest}"):
        apply_lora(tiny_model, r=smallest + 1)
    assert not lora_layers(tiny_model)  # nothing wrapped by a refused call
    apply_lora(tiny_model)
    with pytest.raises(PocketError, match="already has LoRA"):
        apply_lora(tiny_model)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecations inside PEFT
def test_matches_peft(tiny_model):
    """Same weights in Hugging Face Llama + PEFT: same logits, same adapter gradients, same merge."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from pocketgpt.interop.hf import to_hf_config

    r, alpha, targets = 4, 8, list(DEFAULT_TARGETS)
    hf = transformers.LlamaForCausalLM(to_hf_config(tiny_model.cfg)).eval()
    hf.load_state_dict(tiny_model.state_dict(), strict=False)
    hf.tie_weights()
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                     lora_dropout=0.0))
    ours = apply_lora(tiny_model, r=r, alpha=alpha, targets=targets)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.lora_B["default"].weight.normal_(std=0.05)
            layer.lora_A.copy_(peft_layer.lora_A["default"].weight)
            layer.lora_B.copy_(peft_layer.lora_B["default"].weight)

    x, y = tokens(ours), tokens(ours).roll(1, dims=1)
    ours_logits, their_logits = ours(x), theirs(input_ids=x).logits
    torch.testing.assert_close(ours_logits, their_logits, atol=1e-5, rtol=1e-5)
    for logits in (ours_logits, their_logits):
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
    for name, layer in lora_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        for ab in ("A", "B"):
            their_grad = getattr(peft_layer, f"lora_{ab}")["default"].weight.grad
            torch.testing.assert_close(getattr(layer, f"lora_{ab}").grad, their_grad, atol=1e-5, rtol=1e-4)

    merged, their_merged = merge_lora(ours).state_dict(), theirs.merge_and_unload().state_dict()
    for name, weight in merged.items():
        torch.testing.assert_close(weight, their_merged[name], atol=1e-6, rtol=0)


def test_an_adapted_layer_in_a_compiled_decode_of_a_few_rows_is_adapted():
    """Up to 4 rows, the compiled decode step multiplies by a layer's weight as a reduction, which for an
    adapted layer is only the frozen base: GRPO with LoRA sampled from the base model and trained on it."""
    from torch import nn

    from pocketgpt.model import _row_linear
    from pocketgpt.train.lora import LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 6, bias=False), r=2, alpha=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 8)
    compiled = torch.compile(lambda rows: _row_linear(rows, layer))(x)
    base = x @ layer.base_weight(torch.float32).T
    assert torch.allclose(compiled, layer(x), atol=1e-5) and not torch.allclose(compiled, base, atol=1e-2)
