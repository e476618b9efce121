"""Checkpoints: safetensors weights + JSON config, written atomically, checked when loaded.

A model directory (e.g. runs/speedrun/base/) holds

    model.safetensors   weights under Hugging Face Llama names (a tied lm_head is not stored twice)
    blocks.safetensors  an imported GGUF's 4- and 8-bit weights as they were stored, for decoding
                        (blocks.py); only in a directory `pocketgpt import` made from such a file
    config.json         model config, the weights' SHA-256, the tokenizer's fingerprint, the chat
                        template's spec (none: ours), stage metadata
    tokenizer.json      the tokenizer (ours or Hugging Face's), so the directory is self-contained
    checkpoints/step_000500/   resumable training state: weights, optimizer, data position, RNG

Resuming needs only the newest training state, so a stage keeps one while it runs; when it
finishes, its final model.safetensors is all that later stages read, and its training state goes
too unless the run asked to keep it (`keep_checkpoints`): a 6M-parameter speedrun left 1.1 GB of
optimizer state behind before.

Every file is written to a temporary name and renamed, and a training checkpoint directory is
built under a temporary name and renamed when whole, so a crash can never leave something that
loads as if it were complete. Nothing is unpickled: weights are safetensors, the optimizer state is
loaded with `weights_only=True`. Weights are read lazily, tensor by tensor from the memory-mapped
file, into a model built without random initialisation: loading costs one copy of the model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .blocks import BlockWeight, attach, from_tensors, to_tensors
from .chat import ChatTemplate
from .common import PocketError, atomic_write_json, temp_dir, usual_file_mode
from .model import GPT, GPTConfig
from .stages import DEFAULT_ORDER
from .tokenizer import Tokenizer

FORMAT = "pocketgpt-model-v1"
BLOCKS_FILE = "blocks.safetensors"


def state_dict_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once (a tied lm_head is model.embed_tokens.weight)."""
    sd, seen = {}, set()
    for k, v in model.state_dict().items():
        if v.data_ptr() in seen and v.numel() > 0:
            continue
        seen.add(v.data_ptr())
        sd[k] = v.detach().contiguous().cpu()
    return sd


def save_model(model: GPT, directory: str | Path, chat: ChatTemplate | None = None,
               meta: dict | None = None, blocks: dict[str, BlockWeight] | None = None) -> Path:
    """Write weights first, then config.json (which names the weights' hash): config last means complete.
    `blocks`: the source's block-quantized weights for decoding (blocks.py), by weight name."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sha = write_safetensors(state_dict_for_saving(model), directory / "model.safetensors")
    blocks_sha = write_safetensors(to_tensors(blocks), directory / BLOCKS_FILE) if blocks else None
    if chat is not None:
        chat.tokenizer.save(directory / "tokenizer.json")
    atomic_write_json(directory / "config.json", {
        "format": FORMAT,
        "model": model.cfg.to_dict(),
        "weights_sha256": sha,
        "blocks_sha256": blocks_sha,
        "tokenizer_fingerprint": chat.tokenizer.fingerprint() if chat else None,
        "chat_template": chat.spec() if chat else None,
        "meta": meta or {},
    })
    # The model is complete: a training state the trainer marked as replaced by it has no use left.
    latest = latest_training_state(directory)
    if latest is not None and read_training_state(latest).get("replaced_by_model"):
        delete_training_states(directory)
    return directory


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> str:
    """Write tensors to a temp file and rename it into place; the file's SHA-256. The file is written
    straight from the tensors (no bytes copy of the whole model in memory)."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, tmp)
        usual_file_mode(tmp)
        sha = file_sha256(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return sha


def is_model_dir(directory: Path) -> bool:
    """Whether `directory` holds one of our models (a Hugging Face folder has a config.json too)."""
    try:
        cfg = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("format") == FORMAT


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.exists():
        raise PocketError(f"{directory} holds no model (no config.json)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PocketError(f"{path}: corrupt config ({e.msg} at line {e.lineno})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        found = cfg.get("format") if isinstance(cfg, dict) else type(cfg).__name__
        raise PocketError(f"{path}: unknown checkpoint format {found!r}, expected {FORMAT!r}")
    if not isinstance(cfg.get("model"), dict):
        raise PocketError(f"{path}: no model table (the model's shape) in the config")
    return cfg


def imported_source(directory: Path) -> str | None:
    """Where the model in `directory` was imported from (`pocketgpt import`), or None for one we trained
    or no model at all."""
    if not is_model_dir(directory):
        return None
    meta = read_config(directory).get("meta", {})
    return meta.get("summary", {}).get("source") if meta.get("stage") == "imported" else None


def stored_params(directory: Path) -> int:
    """How many parameters a model directory holds, counted from its safetensors header (nothing is
    loaded): the summary a stage writes need not say, and a reward model has its score head too."""
    path = Path(directory) / "model.safetensors"
    try:
        with safe_open(path, framework="pt") as f:
            return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    except (SafetensorError, OSError) as e:
        raise PocketError(f"{path}: not a valid safetensors file ({e})") from None


def file_sha256(path: Path) -> str:
    """Hash a file in 16 MB pieces: a multi-GB checkpoint is never in memory twice."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 24):
            h.update(piece)
    return h.hexdigest()


def read_safetensors(path: Path, expected_sha: str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, read from the memory-mapped file one at a time."""
    if not path.is_file():
        raise PocketError(f"{path} is missing: the model directory is incomplete")
    if expected_sha and file_sha256(path) != expected_sha:
        raise PocketError(f"{path}: weights do not match the hash in config.json (corrupt or half-written)")
    try:
        with safe_open(path, framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise PocketError(f"{path}: not a valid safetensors file ({e})") from None


def load_weights(model: torch.nn.Module, path: Path, expected_sha: str | None = None) -> None:
    """Load safetensors into an existing `model`, naming every missing, unexpected or mis-shaped tensor."""
    sd = read_safetensors(path, expected_sha)
    check_state_dict(model, sd, str(path))
    model.load_state_dict(sd, strict=False)


def expected_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor a model of this config stores (built on "meta": no memory)."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    if cfg.tie_embeddings:  # stored once, as model.embed_tokens.weight
        del shapes["lm_head.weight"]
    return shapes


def check_state_dict(model_or_cfg: torch.nn.Module | GPTConfig, sd: dict[str, torch.Tensor], where: str) -> None:
    if isinstance(model_or_cfg, GPTConfig):
        expected = expected_shapes(model_or_cfg)
    else:
        expected = {k: tuple(v.shape) for k, v in state_dict_for_saving(model_or_cfg).items()}
    problems = []
    for name in sorted(set(expected) - set(sd)):
        problems.append(f"missing {name}")
    for name in sorted(set(sd) - set(expected)):
        problems.append(f"unexpected {name}")
    for name in sorted(set(sd) & set(expected)):
        if tuple(sd[name].shape) != expected[name]:
            problems.append(f"{name}: checkpoint has {tuple(sd[name].shape)}, config expects {expected[name]}")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
        raise PocketError(f"{where} does not match the model config: {shown}")


def resolve_model_dir(path: str | Path) -> Path:
    """A model dir, or a run dir (the most post-trained stage in it wins)."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    for stage in DEFAULT_ORDER:
        if (path / stage / "config.json").exists():
            return path / stage
    if not path.exists():
        raise PocketError(f"{path} does not exist")
    raise PocketError(f"{path} holds no model: expected config.json or one of the stages {DEFAULT_ORDER}")


def load_model(path: str | Path, device="cpu", dtype: torch.dtype | None = torch.float32, blocks: bool = False,
               policy: bool = False) -> tuple[GPT, ChatTemplate, dict]:
    """Load a model directory (or the best stage of a run directory): model, chat template (which
    holds the tokenizer), config. Weights are cast to `dtype` (None: as stored).
    `blocks`: for inference only, give the layers the block-quantized weights the directory keeps (an
    imported GGUF's), which the decode step then reads (blocks.py); a model that is trained must not
    have them, since they would not follow its weights. `policy`: the model must write text (a reward model
    is refused)."""
    directory = resolve_model_dir(path)
    cfg = read_config(directory)
    tokenizer = Tokenizer.load(directory / "tokenizer.json")
    check_tokenizer(tokenizer, cfg, directory)
    chat = ChatTemplate.from_spec(tokenizer, cfg.get("chat_template"))
    try:
        model_cfg = GPTConfig.from_dict(cfg["model"])
    except PocketError as e:
        raise PocketError(f"{directory / 'config.json'}: {e}") from None
    if policy and model_cfg.score_head:  # chat, sample, eval and GRPO took one, and talked with its LM head
        raise PocketError(f"{directory} is a reward model: it scores text, it does not write it")
    weights = read_safetensors(directory / "model.safetensors", cfg.get("weights_sha256"))
    check_state_dict(model_cfg, weights, str(directory / "model.safetensors"))
    for name in weights if dtype is not None else ():  # one tensor at a time: never two copies of the model
        weights[name] = weights[name].to(dtype)
    model = GPT.from_weights(model_cfg, weights)
    if dtype is not None:  # the RoPE tables too: a step computes in one dtype
        model = model.to(dtype)
    model = model.to(device).eval()
    if blocks and cfg.get("blocks_sha256"):  # after the cast: checked against the weights as they will be used
        tied = {"lm_head.weight": "model.embed_tokens.weight"} if model_cfg.tie_embeddings else {}
        path = directory / BLOCKS_FILE
        if not path.exists():
            raise PocketError(f"{directory}: config.json names {BLOCKS_FILE}, which is missing")
        attach(model, from_tensors(read_safetensors(path, cfg["blocks_sha256"])), str(path), tied)
    return model, chat, cfg


def check_tokenizer(tokenizer: Tokenizer, cfg: dict, where) -> None:
    fp = cfg.get("tokenizer_fingerprint")
    if fp and fp != tokenizer.fingerprint():
        raise PocketError(f"{where}: the tokenizer differs from the one the model was trained with "
                          f"(fingerprint {tokenizer.fingerprint()} != {fp})")
    if cfg["model"]["vocab_size"] < tokenizer.vocab_size:
        raise PocketError(f"{where}: model vocab_size {cfg['model']['vocab_size']} is smaller than the "
                          f"tokenizer's {tokenizer.vocab_size}")


# ----------------------------------------------------------------------------- training checkpoints


def save_training_state(directory: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        state: dict, keep: int = 1) -> Path:
    """checkpoints/step_N/ with weights, optimizer and JSON state; built in a temp dir, renamed when whole.
    Then all but the newest `keep` are deleted: whenever a kill comes, one whole state is on disk.

    `state["replaced_by_model"]`: the training has finished, and the stage's final model (written next
    by `save_model`) replaces this state, which `save_model` then deletes."""
    root = Path(directory) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp_*"):  # what a kill during an earlier save or delete left behind
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:07d}"
    tmp = temp_dir(root, ".tmp_")
    try:
        write_safetensors(state_dict_for_saving(model), tmp / "model.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "rng": rng_state()}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        replaced = final.rename(root / f".tmp_replaced_{final.name}") if final.exists() else None
        tmp.rename(final)  # the step saved again (a resumed, finished stage): swapped in two renames
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    for old in sorted(root.glob("step_*"))[:-keep]:
        _delete(old)
    return final


def delete_training_states(directory: Path) -> None:
    """Remove a stage's training checkpoints."""
    root = Path(directory) / "checkpoints"
    if root.exists():
        _delete(root)


def _delete(path: Path) -> None:
    """Rename out of the way, then delete: a kill mid-delete leaves a .tmp_ name nothing loads, never
    a half-deleted checkpoint under a name that looks whole."""
    doomed = path.with_name(f".tmp_deleted_{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)  # left by a kill during an earlier delete
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def latest_training_state(directory: Path) -> Path | None:
    steps = sorted((Path(directory) / "checkpoints").glob("step_*"))
    return steps[-1] if steps else None


def read_training_state(path: Path) -> dict:
    """A training checkpoint's state.json (its step, the objective's state, what it was trained with), read
    before anything is loaded so that a resume can be refused while the model is untouched."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PocketError(f"{path / 'state.json'} is unreadable ({e}): {_start_over(path)}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise PocketError(f"{path / 'state.json'} holds no training step: {_start_over(path)}")
    return state


def load_training_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a checkpoint's weights, optimizer state and random streams into `model` and `optimizer`."""
    load_weights(model, path / "model.safetensors")
    try:
        blob = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(blob["optimizer"])
        set_rng_state(blob["rng"])
    except Exception as e:  # cut short, not a torch file, or another optimizer's state
        raise PocketError(f"{path / 'optimizer.pt'} cannot be loaded ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else 'damaged'}): {_start_over(path)}") from None


def _start_over(checkpoint: Path) -> str:
    return f"delete {checkpoint.parent.parent} to train the stage from the start"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
