"""Hugging Face interop: our weight names are Llama's, so only the config needs translating."""

from __future__ import annotations

from .model import GPTConfig


def to_hf_config(cfg: GPTConfig):
    """The `transformers.LlamaConfig` of the same architecture (same RoPE, norms, GQA, tying)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, attention_bias=False,
        mlp_bias=False, hidden_act="silu",
    )
