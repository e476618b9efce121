"""`pocketgpt import SRC RUN`: a Hugging Face folder or a GGUF file becomes a run directory.

    SRC (config + weights + tokenizer + chat template)
      -> our GPTConfig (interop/hf.py refuses what our model cannot compute exactly)
      -> weights under our (= Llama's) names, checked against the config's shapes
      -> RUN/base/: model.safetensors, config.json, tokenizer.json (Hugging Face's), the chat template's spec,
         and for a GGUF its 4- and 8-bit weights as stored (blocks.safetensors: what decoding reads, blocks.py)

Everything is read and checked before anything is written, and RUN/base is built under a temporary
name and renamed when complete: a bad source leaves RUN untouched. Nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..blocks import BlockWeight
from ..chat import ChatMLTemplate, ChatTemplate, PocketTemplate
from ..checkpoint import check_state_dict, check_tokenizer, is_model_dir, save_model
from ..common import PocketError, console, temp_dir
from ..model import GPT, GPTConfig
from ..stages import STAGES
from ..tokenizer import HFTokenizer
from .hf import gpt_config_from_hf

STAGE = "base"  # an imported model is the run's starting point: sft, rm, grpo, eval read it from here


@dataclass
class Source:
    """What any source gives: the pieces of a Hugging Face folder, and its tensors one at a time."""
    where: str
    hf_config: dict
    tokenizer_json: str
    tokenizer_config: dict
    tensors: Iterator[tuple[str, torch.Tensor]]
    blocks: Iterator[tuple[str, BlockWeight]] = iter(())  # a GGUF's 4- and 8-bit weights as stored


# ----------------------------------------------------------------------------- reading sources


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PocketError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise PocketError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(value, dict):  # read as one with .get() below: an AttributeError traceback
        raise PocketError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def _safetensors_files(folder: Path) -> list[Path]:
    """model.safetensors, or the shards that model.safetensors.index.json names."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (folder / s).exists()]
        if missing:
            raise PocketError(f"{index} names shards that are missing: {', '.join(missing)}")
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise PocketError(f"{folder} has no safetensors weights (model.safetensors or an index of shards)")
    return files


def _iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise PocketError(f"{path}: not a valid safetensors file ({e})") from None


def read_hf_folder(folder: Path) -> Source:
    if not (folder / "tokenizer.json").exists():
        raise PocketError(f"{folder} has no tokenizer.json (a fast tokenizer is needed; "
                          "save one with transformers' tokenizer.save_pretrained)")
    tok_cfg_path = folder / "tokenizer_config.json"
    tokenizer_config = _read_json(tok_cfg_path) if tok_cfg_path.exists() else {}
    template = folder / "chat_template.jinja"  # newer transformers save the template on its own
    if template.exists() and not tokenizer_config.get("chat_template"):
        tokenizer_config["chat_template"] = template.read_text(encoding="utf-8")
    files = _safetensors_files(folder)
    return Source(str(folder), _read_json(folder / "config.json"), (folder / "tokenizer.json").read_text("utf-8"),
                  tokenizer_config, _iter_safetensors(files))


def read_gguf_file(path: Path) -> Source:
    from .gguf import iter_gguf_blocks, iter_gguf_tensors, read_gguf

    contents = read_gguf(path)
    return Source(str(path), contents.hf_config, contents.tokenizer_json, contents.tokenizer_config,
                  iter_gguf_tensors(contents), iter_gguf_blocks(contents))


def read_source(src: str | Path) -> Source:
    src = Path(src)
    if not src.exists():
        raise PocketError(f"{src} does not exist (give a Hugging Face folder or a .gguf file; nothing is downloaded)")
    if src.is_dir():
        if is_model_dir(src):
            raise PocketError(f"{src} is already a pocketgpt model directory: serve, sample or fine-tune it as it is "
                              f"(`pocketgpt export` writes a Hugging Face folder from it)")
        stages = [s.name for s in STAGES if is_model_dir(src / s.name)]
        if stages:  # "has no tokenizer.json (save one with transformers...)" before
            raise PocketError(f"{src} is a pocketgpt run (its {', '.join(stages)}): serve, sample or fine-tune it as "
                              f"it is (`pocketgpt export {src / stages[-1]}` writes a Hugging Face folder)")
        return read_hf_folder(src)
    with open(src, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise PocketError(f"{src} is neither a Hugging Face folder nor a GGUF file (it does not start with 'GGUF')")
    return read_gguf_file(src)


# ----------------------------------------------------------------------------- the chat template


def _token_name(value) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def default_system_prompt(jinja: str, bos: str | None, eos: str | None) -> str | None:
    """The system message a template inserts when a conversation has none: render it for a lone
    user message and read what precedes that message (SmolLM2 and Qwen2.5 both insert one)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    probe = "\x00probe\x00"
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        text = env.from_string(jinja).render(messages=[{"role": "user", "content": probe}],
                                             add_generation_prompt=False, bos_token=bos or "", eos_token=eos or "")
    except Exception:  # a template that needs more than we give it: no default system message read
        return None
    head = "<|im_start|>system\n"
    if not text.startswith(head) or "<|im_end|>" not in text:
        return None
    return text[len(head):text.index("<|im_end|>")]


def chat_template_for(tokenizer: HFTokenizer, tokenizer_config: dict, where: str) -> ChatTemplate:
    """Ours when the tokenizer has every one of our role tokens (a model `pocketgpt export` wrote), ChatML
    when it has ChatML's (SmolLM2, Qwen2); other formats are refused by name."""
    jinja = tokenizer_config.get("chat_template") or ""
    if isinstance(jinja, list):  # several named templates: the default one is the chat format
        jinja = next((t["template"] for t in jinja if t.get("name") == "default"), "")
    specials = tokenizer.special_ids
    if set(PocketTemplate.SPECIALS) <= set(specials):
        return PocketTemplate(tokenizer)
    if not {"<|im_start|>", "<|im_end|>"} <= set(specials):
        raise PocketError(f"{where}: the chat format is not supported (no <|im_start|>/<|im_end|> tokens); "
                          "supported: ChatML (SmolLM2, Qwen2) and pocketgpt's own")
    bos = _token_name(tokenizer_config.get("bos_token"))
    eos = _token_name(tokenizer_config.get("eos_token"))
    add_bos = tokenizer_config.get("add_bos_token", False) and bos in specials
    system = default_system_prompt(jinja, bos, eos) if jinja else None
    return ChatMLTemplate(tokenizer, system, bos if add_bos else None, eos if eos in specials else None)


# ----------------------------------------------------------------------------- import


def load_weights(source: Source, cfg: GPTConfig, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The source's tensors under our names, cast to `dtype` one at a time (None: as stored)."""
    weights = {}
    for name, tensor in source.tensors:
        if name.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints store: we compute it
            continue
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        weights[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    check_state_dict(cfg, weights, source.where)
    return weights


def import_model(src: str | Path, run_dir: str | Path, dtype: str | None = None) -> dict:
    """Import SRC into RUN/base; returns a summary (what was imported, how long it took)."""
    t0 = time.time()
    run_dir = Path(run_dir)
    target = run_dir / STAGE
    if run_dir.exists() and not run_dir.is_dir():  # found when writing, after the whole source was read
        raise PocketError(f"{run_dir} is a file: import into a new run directory")
    if target.exists():
        raise PocketError(f"{target} already exists: import into a new run directory")
    if (run_dir / "tokenizer").exists():  # the run's own, which an imported model (with its own) would not read
        raise PocketError(f"{run_dir} holds a tokenizer of its own ({run_dir / 'tokenizer'}), which the imported "
                          "model would not use: import into a new run directory")
    source = read_source(src)
    cfg = gpt_config_from_hf(source.hf_config, source.where + " (config)")
    tokenizer = HFTokenizer.from_str(source.tokenizer_json, source.where + " (tokenizer)")
    chat = chat_template_for(tokenizer, source.tokenizer_config, source.where)
    check_tokenizer(tokenizer, {"model": cfg.to_dict()}, source.where)
    weights = load_weights(source, cfg, getattr(torch, dtype) if dtype else None)
    model = GPT.from_weights(cfg, weights)
    # Kept for the linear layers only: an untied embedding is looked up, never multiplied by.
    linear = {n for n, _ in model.named_parameters() if n.endswith("proj.weight")} | {"lm_head.weight"}
    if cfg.tie_embeddings:
        linear.add("model.embed_tokens.weight")
    blocks = {name: w for name, w in source.blocks if name in linear}
    if blocks and dtype not in (None, "float32"):
        # The blocks are the file's exact values, which weights rounded to 16 bits no longer equal: a model
        # decoding from them would not be the model its prefill and training compute.
        console.print(f"[yellow]--dtype {dtype} rounds the weights: the file's 4- and 8-bit weights are not kept "
                      "for decoding (import without --dtype to keep them)[/]")
        blocks = {}
    summary = {"source": str(Path(src).resolve()), "family": source.hf_config.get("model_type"),
               "params": model.num_params(), "dtype": str(next(iter(weights.values())).dtype).replace("torch.", ""),
               "chat_template": chat.spec(),
               "block_weights": {f"{bits}-bit": sum(w.bits == bits for w in blocks.values()) for bits in (4, 8)}}

    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(run_dir, ".import_")
    try:
        save_model(model, tmp, chat, {"stage": "imported", "summary": summary,
                                      "hf_config": source.hf_config}, blocks=blocks)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["seconds"] = time.time() - t0
    console.print(f"imported {summary['family']} ({summary['params'] / 1e6:.1f}M parameters, {summary['dtype']}) "
                  f"from {src} -> {target} in {summary['seconds']:.1f}s")
    return summary
