import pytest
import torch

from pocketgpt.common import PocketError
from pocketgpt.model import GPT, PRESETS, GPTConfig, preset


def test_presets_build_and_count():
    for name in PRESETS:
        cfg = preset(name, vocab_size=512)
        assert cfg.d_ff % 64 == 0 and cfg.d_model % cfg.n_head == 0
    model = GPT(preset("tiny", vocab_size=512))
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert model.num_params(embeddings=False) == model.num_params() - 512 * 64
    assert model.flops_per_token(64) > 6 * model.num_params(embeddings=False)


def test_hugging_face_names():
    names = set(GPT(preset("tiny", vocab_size=512, tie_embeddings=False)).state_dict())
    for expected in ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                     "model.layers.1.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight",
                     "model.layers.0.post_attention_layernorm.weight", "model.norm.weight", "lm_head.weight"]:
        assert expected in names


def test_loss_at_init_is_near_uniform(tiny_model):
    x = torch.randint(0, 512, (2, 32))
    loss = tiny_model(x, targets=torch.randint(0, 512, (2, 32)))
    assert abs(loss.item() - torch.log(torch.tensor(512.0)).item()) < 0.5


def test_ignore_index_and_all_masked_is_not_nan(tiny_model):
    x = torch.randint(0, 512, (2, 16))
    y = x.clone()
    y[0] = -1
    assert torch.isfinite(tiny_model(x, targets=y))
    assert tiny_model(x, targets=torch.full_like(x, -1), reduction="sum").item() == 0.0


def test_causality(tiny_model):
    x = torch.randint(0, 512, (1, 20))
    y = x.clone()
    y[0, 10:] = torch.randint(0, 512, (10,))
    a, b = tiny_model(x), tiny_model(y)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_matches_hugging_face_llama(tiny_model):
    import transformers

    from pocketgpt.interop.hf import to_hf_config

    hf = transformers.LlamaForCausalLM(to_hf_config(tiny_model.cfg)).eval()
    hf.load_state_dict(tiny_model.state_dict(), strict=False)
    hf.tie_weights()
    x = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(x), hf(x).logits, atol=1e-4, rtol=1e-4)


def test_config_errors():
    with pytest.raises(PocketError, match="divisible"):
        GPTConfig(d_model=100, n_head=3)
    with pytest.raises(PocketError, match="n_kv_head"):
        GPTConfig(d_model=64, n_head=4, n_kv_head=3)
    with pytest.raises(PocketError, match="unknown model preset"):
        preset("huge")
    with pytest.raises(PocketError, match="unknown model config keys"):
        GPTConfig.from_dict({"n_layers": 3})


def test_too_long_sequence(tiny_model):
    with pytest.raises(PocketError, match="max_seq_len"):
        tiny_model(torch.zeros(1, tiny_model.cfg.max_seq_len + 1, dtype=torch.long))
