"""Hugging Face configs <-> ours. Our weight names are Llama's, so only the config needs translating.

Supported families: Llama (1, 2, 3.x: TinyLlama, Llama-3.2), Mistral without a sliding window, and
Qwen2 (q/k/v biases: Qwen2.5). Anything our model cannot compute exactly is refused, naming the
field that differs, rather than imported into a model that silently computes something else.
"""

from __future__ import annotations

from ..common import PocketError
from ..model import ROPE_TYPES, GPTConfig

FAMILIES = ("llama", "mistral", "qwen2")
# The config.json keys without which the model's shape is unknown
REQUIRED = ("vocab_size", "num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size")


def gpt_config_from_hf(hf: dict, where: str) -> GPTConfig:
    """A Hugging Face config.json (as a dict) -> our GPTConfig, or a PocketError naming what differs."""
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        arch = ", ".join(hf.get("architectures") or []) or kind
        raise PocketError(f"{where}: architecture {arch!r} is not supported; supported families: {', '.join(FAMILIES)}")

    def refuse(field: str, value, why: str):
        raise PocketError(f"{where}: {field}={value!r} is not supported ({why})")

    act = hf.get("hidden_act", "silu")
    if act != "silu":
        refuse("hidden_act", act, "the MLP is SwiGLU")
    if hf.get("mlp_bias"):
        refuse("mlp_bias", True, "the MLP has no biases")
    if kind == "llama" and hf.get("attention_bias"):
        refuse("attention_bias", True, "Llama's option also puts a bias on o_proj")
    window = hf.get("sliding_window")
    if window is not None and (kind == "mistral" or hf.get("use_sliding_window")) and \
            window < hf.get("max_position_embeddings", 0):
        refuse("sliding_window", window, "attention is full, not windowed")
    # transformers 5 writes RoPE settings as rope_parameters; older files as rope_theta + rope_scaling.
    rope = {**(hf.get("rope_parameters") or {}), **(hf.get("rope_scaling") or {})}
    theta = float(hf.get("rope_theta") or rope.pop("rope_theta", 10000.0))
    rope.pop("rope_theta", None)
    rope["rope_type"] = rope.get("rope_type", rope.pop("type", "default"))
    if rope["rope_type"] not in ROPE_TYPES:
        refuse("rope_scaling.rope_type", rope["rope_type"], f"supported: {', '.join(ROPE_TYPES)}")
    scaling = None if rope["rope_type"] == "default" else rope
    missing = [key for key in REQUIRED if key not in hf]
    if missing:
        raise PocketError(f"{where}: no {', '.join(missing)} (the model's shape)")
    heads = hf["num_attention_heads"]
    try:
        return GPTConfig(
            vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=heads,
            n_kv_head=hf.get("num_key_value_heads") or heads, d_model=hf["hidden_size"], d_ff=hf["intermediate_size"],
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            max_seq_len=hf.get("max_position_embeddings", 2048), rope_theta=theta, rope_scaling=scaling, attention_bias=kind == "qwen2",
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            # transformers' default differs by family: Qwen2's tie_word_embeddings is read as given, Llama's is False
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
    except PocketError as e:  # a shape GPTConfig refuses, a rope_scaling table without what its kind reads
        raise PocketError(f"{where}: {e}") from None


def hf_config_dict(cfg: GPTConfig) -> dict:
    """The config.json transformers reads for the same architecture: Llama, or Qwen2 when q/k/v have biases."""
    if cfg.smear_keys:
        raise PocketError("this model smears its keys (model.smear_keys = true), which neither Llama nor Qwen2 "
                          "can express: transformers and llama.cpp would compute a different model. The speedrun "
                          "smears them by default; train with --set 'pretrain.model={smear_keys=false}' to export")
    kind = "qwen2" if cfg.attention_bias else "llama"
    d = {
        "model_type": kind, "architectures": ["Qwen2ForCausalLM" if kind == "qwen2" else "LlamaForCausalLM"],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling, "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu", "torch_dtype": "float32",
    }
    if kind == "llama":
        d.update(attention_bias=False, mlp_bias=False)
    return d


def to_hf_config(cfg: GPTConfig):
    """The transformers config object of the same architecture (for tests and benchmarks)."""
    from transformers import AutoConfig

    d = hf_config_dict(cfg)
    kind = d.pop("model_type")
    d.pop("architectures")
    return AutoConfig.for_model(kind, **d)
