"""Reading a llama.cpp GGUF file into what a Hugging Face model folder holds, without transformers.

A GGUF file is one little-endian blob:

    header      magic "GGUF", version, tensor count, metadata count
    metadata    key -> typed value: the model's shape under "{arch}.*" keys (llama.block_count, ...),
                the tokenizer under "tokenizer.ggml.*" (tokens, token types, merges, special ids) and
                the chat template under "tokenizer.chat_template"
    tensor table   name, dims (fastest-moving first), ggml type, offset into the data section
    data        the tensors, aligned; quantized types are runs of fixed-size blocks, e.g. Q4_1 packs
                32 weights as an f16 scale, an f16 minimum and 16 bytes of 4-bit values

`gguf.GGUFReader` parses the header, metadata and table and memory-maps the data, so `read_gguf`
(config, tokenizer, names) reads no weights and `iter_gguf_tensors` dequantizes one tensor at a time.

llama.cpp's tensor names (blk.0.attn_q.weight) become Hugging Face's (model.layers.0.self_attn.q_proj
.weight). Its converter also reorders the rows of the Llama/Mistral query and key projections, so that
its rotary embedding can rotate adjacent pairs where Hugging Face rotates the two halves of each head;
that reordering is undone here. Qwen2 is converted without it.

The tokenizer is rebuilt the way transformers builds it from the same file (its
`integrations/gguf/gguf_tokenizer_mapping.py`), so both give the same token ids.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from ..blocks import BlockWeight, from_gguf
from ..common import PocketError
from ..tokenizer import bytes_to_unicode

GGMLType = gguf.GGMLQuantizationType
SUPPORTED_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1)
_SUPPORTED_NAMES = ", ".join(t.name for t in SUPPORTED_TYPES)

# GGUF general.architecture -> Hugging Face model class. llama.cpp writes Mistral 7B as "llama"
# (Hugging Face's Llama runs it: the same blocks, without the sliding window v0.2+ dropped anyway).
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
_PERMUTED = {"llama", "mistral"}  # llama.cpp's LlamaModel.permute ran on their attn_q / attn_k

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Not a weight: llama.cpp's per-frequency RoPE factors, turned back into rope_scaling below.
_ROPE_FREQS = "rope_freqs.weight"

# llama.cpp token types (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED = 3, 4


@dataclass
class GGUFContents:
    """Everything needed to write a Hugging Face model folder for a GGUF file, weights aside."""

    path: Path
    architecture: str  # GGUF general.architecture: "llama", "qwen2" or "mistral"
    hf_config: dict  # config.json
    tokenizer_json: str  # tokenizer.json (a serialized `tokenizers.Tokenizer`)
    tokenizer_config: dict  # tokenizer_config.json
    tensor_names: list[str]  # Hugging Face weight names, in the order iter_gguf_tensors yields them


def read_gguf(path) -> GGUFContents:
    """Config, tokenizer and weight names of a GGUF file, checked for consistency; no weight is read."""
    path = Path(path)
    reader = _open(path)
    meta = _metadata(path, reader)
    arch = _get(path, meta, "general.architecture", str)
    if arch not in ARCHITECTURES:
        raise PocketError(f"{path}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")

    tensors = {t.name: t for t in reader.tensors}
    config = _hf_config(path, arch, meta, tensors)
    shapes = _expected_shapes(config)
    names = _name_table(config["num_hidden_layers"])
    present = set()
    for t in reader.tensors:
        if t.name == _ROPE_FREQS:  # already folded into the config's rope_scaling
            continue
        hf_name = names.get(t.name)
        if hf_name not in shapes:
            raise PocketError(f"{path}: tensor {t.name} has no counterpart in a Hugging Face {arch} model")
        if t.tensor_type not in SUPPORTED_TYPES:
            raise PocketError(f"{path}: tensor {t.name} is {t.tensor_type.name}, supported: {_SUPPORTED_NAMES}")
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest-moving first
        if shape != shapes[hf_name]:
            raise PocketError(
                f"{path}: tensor {t.name} has shape {list(shape)}, the metadata implies {list(shapes[hf_name])}"
            )
        present.add(hf_name)
    missing = [n for n in shapes if n not in present and n != "lm_head.weight" and not n.endswith(".bias")]
    if missing:
        raise PocketError(f"{path}: tensor {_gguf_name(missing[0])} is missing ({len(missing)} missing in all)")
    _check_biases(path, arch, present, config["num_hidden_layers"])

    tokenizer, tokenizer_config = _tokenizer(path, meta, config["vocab_size"])
    return GGUFContents(
        path=path,
        architecture=arch,
        hf_config=config,
        tokenizer_json=tokenizer.to_str(),
        tokenizer_config=tokenizer_config,
        tensor_names=[n for n in shapes if n in present],
    )


def iter_gguf_tensors(contents: GGUFContents) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face name, tensor) one at a time, dequantized and in Hugging Face layout.

    F32, F16 and BF16 keep their dtype; quantized types come out as float32. Only the tensor being
    yielded is in memory: the file is memory-mapped, and each tensor is copied out when its turn comes.
    """
    path, config = contents.path, contents.hf_config
    tensors = {t.name: t for t in _open(path).tensors}
    n_head, n_kv_head = config["num_attention_heads"], config["num_key_value_heads"]
    for hf_name in contents.tensor_names:
        name = _gguf_name(hf_name)
        if name not in tensors:
            raise PocketError(f"{path}: tensor {name} is missing (was the file changed since it was read?)")
        weight = _dequantize(path, tensors[name])
        if contents.architecture in _PERMUTED and ".attn_q." in name:
            weight = undo_llama_permute(weight, n_head)
        elif contents.architecture in _PERMUTED and ".attn_k." in name:
            weight = undo_llama_permute(weight, n_kv_head)
        yield hf_name, weight


def iter_gguf_blocks(contents: GGUFContents) -> Iterator[tuple[str, BlockWeight]]:
    """Yield (Hugging Face name, blocks) for each 4- or 8-bit weight, as stored (blocks.py), one at a time,
    with the same query/key row reordering undone as for the dense weights."""
    path, config = contents.path, contents.hf_config
    tensors = {t.name: t for t in _open(path).tensors}
    heads = {".attn_q.": config["num_attention_heads"], ".attn_k.": config["num_key_value_heads"]}
    for hf_name in contents.tensor_names:
        t = tensors[_gguf_name(hf_name)]
        if len(t.shape) != 2:
            continue
        weight = from_gguf(t.tensor_type.name, np.array(t.data), tuple(int(d) for d in reversed(t.shape)))
        if weight is None:
            continue
        n_head = next((n for part, n in heads.items() if part in t.name), None)
        if contents.architecture in _PERMUTED and n_head is not None:
            weight = weight.take_rows(undo_llama_permute(torch.arange(weight.shape[0]), n_head))
        yield hf_name, weight


def undo_llama_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's `LlamaModel.permute` on a query/key weight or bias.

    llama.cpp interleaves the two rotary halves of each head (rows 0..d/2-1 and d/2..d-1 become pairs
    0,1 / 2,3 / ...), as `reshape(n_head, 2, d/2, ...).swapaxes(1, 2)`; this swaps them back.
    """
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


# ----------------------------------------------------------------------------- file and metadata


def _open(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise PocketError(f"{path}: no such file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # a parser fed arbitrary bytes: ValueError, IndexError, OverflowError, MemoryError...
        raise PocketError(f"{path}: not a readable GGUF file, truncated or corrupt ({type(e).__name__}: {e})") from None
    if reader.byte_order != "I":
        # the reader swaps metadata, but gguf.quants would read the blocks' f16 scales the wrong way round
        raise PocketError(f"{path}: big-endian GGUF files are not supported")
    return reader


def _metadata(path: Path, reader: gguf.GGUFReader) -> dict:
    meta = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as e:
            raise PocketError(f"{path}: metadata {key} is unreadable ({e})") from None
    return meta


_MISSING = object()


def _get(path: Path, meta: dict, key: str, kind: type, default=_MISSING):
    """meta[key], checked to be a `kind` (an int passes as a float; a bool is not an int)."""
    if key not in meta:
        if default is _MISSING:
            raise PocketError(f"{path}: metadata {key} is missing")
        return default
    value = meta[key]
    kinds = (int, float) if kind is float else kind
    if not isinstance(value, kinds) or (kind is not bool and isinstance(value, bool)):
        raise PocketError(f"{path}: metadata {key} should be {kind.__name__}, is {value!r:.80}")
    return kind(value)


def _name_table(n_layer: int) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face name, for every tensor a model of this depth can have."""
    table = dict(_GLOBAL_NAMES)
    for i in range(n_layer):
        table.update({f"blk.{i}.{g}": f"model.layers.{i}.{h}" for g, h in _LAYER_NAMES.items()})
    return table


def _gguf_name(hf_name: str) -> str:
    for g, h in _GLOBAL_NAMES.items():
        if hf_name == h:
            return g
    _, _, i, rest = hf_name.split(".", 3)  # model.layers.{i}.{rest}
    return f"blk.{i}." + next(g for g, h in _LAYER_NAMES.items() if h == rest)


def _dequantize(path: Path, t) -> torch.Tensor:
    # np.array copies the tensor out of the memory map; gguf.quants.dequantize returns a new array
    if t.tensor_type == GGMLType.F32:
        return torch.from_numpy(np.array(t.data, dtype=np.float32))
    if t.tensor_type == GGMLType.F16:
        return torch.from_numpy(np.array(t.data, dtype=np.float16))
    if t.tensor_type == GGMLType.BF16:  # numpy has no bfloat16: the reader hands over the raw bytes
        return torch.from_numpy(np.array(t.data, dtype=np.uint8)).view(torch.bfloat16)
    if t.tensor_type in SUPPORTED_TYPES:
        return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))
    raise PocketError(f"{path}: tensor {t.name} is {t.tensor_type.name}, supported: {_SUPPORTED_NAMES}")


# ----------------------------------------------------------------------------- config


def _hf_config(path: Path, arch: str, meta: dict, tensors: dict) -> dict:
    def get(key, kind, default=_MISSING):
        return _get(path, meta, f"{arch}.{key}", kind, default)

    hidden = get("embedding_length", int)
    n_head = get("attention.head_count", int)
    n_layer = get("block_count", int)
    if "token_embd.weight" not in tensors or len(tensors["token_embd.weight"].shape) != 2:
        raise PocketError(f"{path}: tensor token_embd.weight is missing or not a matrix")
    vocab_size = int(tensors["token_embd.weight"].shape[1])  # dims are stored fastest-moving first
    if get("vocab_size", int, vocab_size) != vocab_size:
        raise PocketError(
            f"{path}: metadata {arch}.vocab_size is {meta[f'{arch}.vocab_size']}, token_embd has {vocab_size} rows"
        )
    # key_length is the head width when written; else llama.cpp derives it from the width and head count
    head_dim = get("attention.key_length", int, hidden // n_head if n_head else 0)
    if n_head <= 0 or head_dim <= 0:
        raise PocketError(f"{path}: metadata gives {n_head} attention heads of width {head_dim}")
    if get("rope.dimension_count", int, head_dim) != head_dim:
        raise PocketError(
            f"{path}: RoPE on {meta[f'{arch}.rope.dimension_count']} of {head_dim} head dimensions "
            "(partial rotary) is not supported"
        )
    rope_theta = get("rope.freq_base", float, 10000.0)  # llama.cpp's default when absent

    config = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length", int),
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": get("attention.head_count_kv", int, n_head),
        "head_dim": head_dim,
        "max_position_embeddings": get("context_length", int),
        "rope_theta": rope_theta,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", float),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "rope_scaling": _rope_scaling(path, arch, meta, tensors.get(_ROPE_FREQS), rope_theta, head_dim),
        "hidden_act": "silu",
        "bos_token_id": _get(path, meta, "tokenizer.ggml.bos_token_id", int, None),
        "eos_token_id": _get(path, meta, "tokenizer.ggml.eos_token_id", int, None),
        "pad_token_id": _get(path, meta, "tokenizer.ggml.padding_token_id", int, None),
    }
    n_kv_head = config["num_key_value_heads"]
    if n_kv_head <= 0 or n_head % n_kv_head:
        raise PocketError(f"{path}: {n_head} attention heads cannot share {n_kv_head} key/value heads")
    if arch == "mistral":  # Hugging Face's Mistral defaults to a 4096-token window; say what the file says
        config["sliding_window"] = get("attention.sliding_window", int, None)
    return config


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> shape, for every tensor this config can have, in the order to yield them."""
    h, v, f = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(config["num_hidden_layers"]):
        layer = {
            "input_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h),
            "self_attn.q_proj.bias": (q,),
            "self_attn.k_proj.weight": (kv, h),
            "self_attn.k_proj.bias": (kv,),
            "self_attn.v_proj.weight": (kv, h),
            "self_attn.v_proj.bias": (kv,),
            "self_attn.o_proj.weight": (h, q),
            "self_attn.o_proj.bias": (h,),
            "post_attention_layernorm.weight": (h,),
            "mlp.gate_proj.weight": (f, h),
            "mlp.up_proj.weight": (f, h),
            "mlp.down_proj.weight": (h, f),
        }
        if config["model_type"] == "qwen2":  # Qwen2's q/k/v always have biases, its o_proj never
            del layer["self_attn.o_proj.bias"]
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in layer.items()})
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def _check_biases(path: Path, arch: str, present: set[str], n_layer: int) -> None:
    """Attention biases must be where a Hugging Face config can say they are: on every layer or none.

    Llama's attention_bias puts them on q, k, v and o; a missing o_proj bias then loads as zeros, the
    same function. Qwen2 has them on q, k and v only (its o_proj never); Mistral has none.
    """
    counts = {p: sum(f"model.layers.{i}.self_attn.{p}_proj.bias" in present for i in range(n_layer)) for p in "qkvo"}
    if arch == "mistral" and any(counts.values()):
        raise PocketError(f"{path}: Hugging Face Mistral has no attention biases, but the file has them")
    partial = any(c not in (0, n_layer) for c in counts.values())
    if partial or len({counts[p] for p in "qkv"}) > 1 or counts["o"] > counts["q"]:
        raise PocketError(
            f"{path}: attention biases on some layers or projections only; Hugging Face {arch} takes q, k and v "
            "biases on every layer or on none (and an o_proj bias only with them)"
        )


def _rope_scaling(path: Path, arch: str, meta: dict, rope_freqs, theta: float, head_dim: int) -> dict | None:
    """Hugging Face's rope_scaling for the file's rope.scaling.* keys or rope_freqs tensor; None if unscaled."""
    prefix = f"{arch}.rope.scaling."
    keys = {k.removeprefix(prefix): v for k, v in meta.items() if k.startswith(prefix)}
    kind = keys.pop("type", "none")
    factor = keys.pop("factor", None)
    if f"{arch}.rope.scale_linear" in meta:  # the key older llama.cpp wrote for linear scaling
        kind, factor = "linear", meta[f"{arch}.rope.scale_linear"]
    keys.pop("finetuned", None)  # informational only
    if keys.get("attn_factor") == 1.0:  # the neutral value: Hugging Face's default attention factor
        keys.pop("attn_factor")
    if rope_freqs is not None:
        if kind != "none" or keys:
            raise PocketError(f"{path}: both rope_freqs.weight and rope.scaling keys; cannot tell which applies")
        return _llama3_rope_scaling(path, rope_freqs, theta, head_dim)
    if kind == "none" or (kind == "linear" and factor == 1.0):
        scaling = None
    elif kind == "linear" and factor and not keys:
        scaling = {"rope_type": "linear", "factor": float(factor)}
    elif kind == "yarn" and factor and set(keys) <= {"original_context_length"}:
        scaling = {"rope_type": "yarn", "factor": float(factor)}
        if "original_context_length" in keys:
            scaling["original_max_position_embeddings"] = int(keys["original_context_length"])
    else:
        raise PocketError(
            f"{path}: rope scaling {kind!r} (factor {factor}, other keys {sorted(keys)}) "
            "has no Hugging Face equivalent here"
        )
    return scaling


def _llama3_rope_scaling(path: Path, tensor, theta: float, head_dim: int) -> dict | None:
    """Hugging Face's "llama3" rope_scaling for llama.cpp's per-frequency factors (rope_freqs.weight).

    llama.cpp bakes Llama 3.1's frequency scaling into one factor per rotary pair: 1 for short
    wavelengths, `factor` for long ones and in between 1 / ((1 - s) / factor + s), with
    s = a / wavelength + b, a = original_context / (high - low), b = -low / (high - low). The pairs in
    between give a and b back; every (low, high, original_context) with the same a and b scales the
    same way, so low_freq_factor is taken as 1 (what Llama 3.x uses), and the result is checked.
    """
    if tensor.tensor_type != GGMLType.F32 or tuple(tensor.shape) != (head_dim // 2,):
        raise PocketError(f"{path}: rope_freqs.weight should be F32 of shape [{head_dim // 2}]")
    factors = np.array(tensor.data, dtype=np.float64)
    if np.allclose(factors, 1.0):
        return None
    wavelength = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    factor = float(factors.max())
    middle = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    if middle.sum() >= 2 and factor > 1:
        s = (1 / factors[middle] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(1 / wavelength[middle], s, 1)
        if a > 0 and b < 0:
            span = -1 / b
            scaling = {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": 1.0,
                "high_freq_factor": round(1 + span, 4),
                "original_max_position_embeddings": round(a * span),
            }
            if np.allclose(_llama3_factors(scaling, wavelength), factors, rtol=1e-4):
                return scaling
    raise PocketError(f"{path}: rope_freqs.weight is not Llama 3 rope scaling; no Hugging Face equivalent")


def _llama3_factors(scaling: dict, wavelength: np.ndarray) -> np.ndarray:
    """The per-pair divisors of the rotary frequencies for a "llama3" rope_scaling (as Hugging Face computes)."""
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    s = np.clip((scaling["original_max_position_embeddings"] / wavelength - low) / (high - low), 0, 1)
    return 1 / ((1 - s) / scaling["factor"] + s)


# ----------------------------------------------------------------------------- tokenizer

# Pre-tokenizer regexes by tokenizer.ggml.pre, as transformers picks them. Any other value (SmolLM2's
# "smollm", GPT-2's "gpt-2", ...) keeps the byte-level pre-tokenizer's own GPT-2 regex.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano", "dbrx", "smaug-bpe"],
        _LLAMA3_SPLIT,
    ),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O_SPLIT),
}


def _tokenizer(path: Path, meta: dict, vocab_size: int) -> tuple[Tokenizer, dict]:
    """The tokenizer the file's tokenizer.ggml.* keys describe, and its tokenizer_config.json."""
    if "tokenizer.ggml.tokens" not in meta:
        raise PocketError(f"{path}: no tokenizer (metadata tokenizer.ggml.tokens is missing)")
    tokens = _get(path, meta, "tokenizer.ggml.tokens", list)
    if len(tokens) != vocab_size:
        raise PocketError(f"{path}: the tokenizer has {len(tokens)} tokens, token_embd has {vocab_size} rows")
    token_types = _get(path, meta, "tokenizer.ggml.token_type", list, [])
    merges = _get(path, meta, "tokenizer.ggml.merges", list, None)
    kind = _get(path, meta, "tokenizer.ggml.model", str, None)
    scores = _get(path, meta, "tokenizer.ggml.scores", list, None)
    if kind not in ("gpt2", "llama"):
        raise PocketError(f"{path}: tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    if kind == "llama" and merges is None and scores is None:
        raise PocketError(f"{path}: sentencepiece tokenizer with neither merges nor scores")
    try:
        if kind == "gpt2":
            tokenizer = _byte_level_bpe(tokens, merges, meta.get("tokenizer.ggml.pre"))
        else:
            tokenizer = _sentencepiece_bpe(tokens, merges, scores)
    except Exception as e:  # tokenizers rejects e.g. a merge of a token not in the vocabulary
        raise PocketError(f"{path}: the tokenizer in the metadata is inconsistent ({e})") from None
    # transformers builds these through GPT2Tokenizer and LlamaTokenizer, whose defaults are special too
    default_specials = ["<|endoftext|>"] if kind == "gpt2" else ["<unk>", "<s>", "</s>"]

    def special(name: str) -> str | None:
        token_id = _get(path, meta, f"tokenizer.ggml.{name}_token_id", int, None)
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise PocketError(f"{path}: tokenizer.ggml.{name}_token_id {token_id} is not a token id")
        return None if token_id is None else tokens[token_id]

    config = {
        "bos_token": special("bos"),
        "eos_token": special("eos"),
        "unk_token": special("unknown"),
        "pad_token": special("padding"),
        # llama.cpp adds BOS for a sentencepiece vocabulary unless the file says otherwise
        "add_bos_token": _get(path, meta, "tokenizer.ggml.add_bos_token", bool, kind == "llama"),
        "add_eos_token": _get(path, meta, "tokenizer.ggml.add_eos_token", bool, False),
        "chat_template": _get(path, meta, "tokenizer.chat_template", str, None),
    }
    _add_special_tokens(tokenizer, kind, tokens, token_types, default_specials + [
        config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if config[k] is not None
    ])
    # BOS / EOS around every encoding, as the flags ask (transformers' update_post_processor)
    bos, eos = config["bos_token"], config["eos_token"]
    config["add_bos_token"] = config["add_bos_token"] and bos is not None and tokenizer.token_to_id(bos) is not None
    config["add_eos_token"] = config["add_eos_token"] and eos is not None and tokenizer.token_to_id(eos) is not None
    before = [bos] if config["add_bos_token"] else []
    after = [eos] if config["add_eos_token"] else []
    single = [f"{t}:0" for t in before] + ["$A:0"] + [f"{t}:0" for t in after]
    pair = single + [f"{t}:1" for t in before] + ["$B:1"] + [f"{t}:1" for t in after]
    ids = [(t, tokenizer.token_to_id(t)) for t in before + after]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=" ".join(single), pair=" ".join(pair), special_tokens=ids
    )
    return tokenizer, config


def _byte_level_bpe(tokens: list[str], merges: list[str] | None, pre: str | None) -> Tokenizer:
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # a token written outside the byte alphabet (a raw "<|im_start|>" is inside it) is respelled byte by byte
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)
    }
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab, merges=[tuple(m.split(" ")) for m in merges or []], dropout=None,
            continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
        )
    )
    split = _PRE_TOKENIZER_SPLITS.get(pre)
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(tokens: list[str], merges: list[str] | None, scores: list[float] | None) -> Tokenizer:
    """A sentencepiece BPE vocabulary (Llama 2, TinyLlama) as a `tokenizers` BPE with byte fallback."""
    vocab = {t: i for i, t in enumerate(tokens)}
    if merges is not None:
        pairs = [tuple(m.split(" ")) for m in merges]
    else:
        pairs = _merges_from_scores(vocab, dict(zip(tokens, scores)))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True, dropout=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    )
    return tokenizer


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """The merges a sentencepiece vocabulary implies: every split of a token into two tokens, best score first.

    The same order as transformers' `generate_merges`: by the merged token's score, then the lengths of
    the left and right parts (all descending), ties by the order the tokens and splits were found.
    """
    merges = []
    for token, score in scores.items():
        splits = [(token[:k], token[k:], score) for k in range(1, len(token))]
        splits = [(left, right, score) for left, right, score in splits if left in vocab and right in vocab]
        merges += sorted(splits, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _add_special_tokens(tokenizer: Tokenizer, kind: str, tokens: list[str], token_types: list[int], named: list[str]):
    """Keep control tokens (<|im_start|>) and user-defined ones (<think>) whole, at their own ids.

    Control tokens and the named special tokens become special added tokens, user-defined ones plain
    added tokens. In a byte-level vocabulary a control token written outside the byte alphabet is a
    llama.cpp mislabel (transformers skips it too). A named token that is not in the vocabulary is left
    out: transformers would append it with an id past the model's embedding.
    """
    alphabet = set(bytes_to_unicode().values()) if kind == "gpt2" else None
    control = [
        t for t, kind_ in zip(tokens, token_types) if kind_ == _CONTROL and (alphabet is None or set(t) <= alphabet)
    ]
    vocab = tokenizer.get_vocab()
    user_defined = [t for t, kind_ in zip(tokens, token_types) if kind_ == _USER_DEFINED and t in vocab]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user_defined])
    added = set(control) | set(user_defined)
    named = [t for t in dict.fromkeys(named) if t not in added and t in vocab]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in named])
