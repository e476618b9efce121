"""`pocketgpt export`: a model directory becomes a Hugging Face folder; our tokenizer also becomes a
tiktoken rank file.

The folder is what `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` read,
and so what PEFT, vLLM and llama.cpp's converter read too:

    config.json              the architecture (interop/hf.py) + the chat template's bos/eos/pad ids
    model.safetensors        the weights: our names are already Llama's; a tied lm_head is stored once
                             as model.embed_tokens.weight and re-tied by transformers (tie_word_embeddings)
    generation_config.json   every id that ends an assistant turn, so `generate` stops where our Engine does
    tokenizer.json           a Hugging Face `tokenizers` file giving exactly our ids: an imported model's
                             own file, or our BPE rewritten as byte-level BPE with merges
                             (`hf_tokenizer_from_bpe`)
    tokenizer_config.json    the bos/eos/pad strings and the chat template as Jinja (`jinja_template`):
                             `apply_chat_template` gives the ids chat.py's render() gives

The folder is built under a temporary name next to the destination and renamed when complete, so a
failed export leaves nothing that looks like a model.

`export_tiktoken` writes tiktoken's own format: one "base64(bytes) rank" line per learned token,
plus a JSON sidecar with what that format cannot hold (the split pattern and the special tokens).
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from ..chat import ChatMLTemplate, ChatTemplate, PocketTemplate
from ..checkpoint import load_model, state_dict_for_saving
from ..common import PocketError, atomic_write_json, atomic_write_text, temp_dir, usual_file_mode
from ..model import GPT
from ..tokenizer import BPETokenizer, HFTokenizer, Tokenizer, bytes_to_unicode
from .hf import hf_config_dict


def export_hf(model_dir: str | Path, out_dir: str | Path) -> Path:
    """A model directory (or a run directory: its most post-trained stage) -> a Hugging Face folder."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise PocketError(f"{out_dir} already exists and is not empty: export into a new or empty directory")
    model, chat, _ = load_model(model_dir, dtype=None)  # weights keep the dtype they were saved in
    if model.cfg.score_head:
        raise PocketError("export of reward models is not supported (transformers has no causal LM with a "
                          "scalar head; export the SFT model it was trained from)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out_dir.parent, f".{out_dir.name}.tmp_")
    try:
        _write_folder(tmp, model, chat)
        if out_dir.exists():  # empty, checked above: rename cannot replace a directory on every OS
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_folder(folder: Path, model: GPT, chat: ChatTemplate) -> None:
    tok = chat.tokenizer
    bos = chat.document_start[0] if chat.document_start else None  # ChatML models may have none
    ids = {"bos_token_id": bos, "eos_token_id": chat.stop_ids[0], "pad_token_id": chat.pad_id}

    config = {**hf_config_dict(model.cfg), **ids}
    # transformers loads in the dtype the config names: say what the weights really are (bf16 stays bf16).
    config["torch_dtype"] = str(model.lm_head.weight.dtype).removeprefix("torch.")
    atomic_write_json(folder / "config.json", config)
    save_file(state_dict_for_saving(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    usual_file_mode(folder / "model.safetensors")
    atomic_write_json(folder / "generation_config.json", {**ids, "eos_token_id": list(chat.stop_ids)})

    if isinstance(tok, HFTokenizer):
        tokenizer_json = tok.hf.to_str()
    elif isinstance(tok, BPETokenizer):
        tokenizer_json = hf_tokenizer_from_bpe(tok).to_str()
    else:
        raise PocketError(f"cannot export a {type(tok).__name__} as a Hugging Face tokenizer")
    atomic_write_text(folder / "tokenizer.json", tokenizer_json)

    def text(i: int | None) -> str | None:
        return None if i is None else _token_text(tok, i)

    atomic_write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": text(bos), "eos_token": text(chat.stop_ids[0]), "pad_token": text(chat.pad_id),
        # The chat template writes every special token itself; encode() must not add any.
        "add_bos_token": False, "add_eos_token": False,
        # transformers 4 would otherwise "clean up" decoded text (" ." -> "."): decoding must be lossless.
        "clean_up_tokenization_spaces": False,
        "model_max_length": model.cfg.max_seq_len,
        "chat_template": jinja_template(chat),
    })


def _token_text(tok: Tokenizer, i: int) -> str:
    return tok.token_bytes()[i].decode("utf-8")


# ----------------------------------------------------------------------------- our BPE as HF tokenizers


def hf_tokenizer_from_bpe(tok: BPETokenizer):
    """Our tiktoken-style BPE as a Hugging Face `tokenizers.Tokenizer` that gives the same ids.

    tiktoken keeps only ranks (token bytes -> id) and merges, within a chunk, the adjacent pair whose
    joined bytes rank lowest; Hugging Face's BPE needs the merges themselves. Each token's merge is
    recovered by running tiktoken's loop on the token's own bytes with only lower-ranked tokens: the
    two pieces left are the pair that training merged (one merge per token, in rank order).
    Tokens are byte-level strings (GPT-2's printable character per byte); the chunks come from our
    split regex, then ByteLevel maps bytes to those characters without splitting again.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    char_of = bytes_to_unicode()

    def chars(b: bytes) -> str:
        return "".join(char_of[x] for x in b)

    vocab = {chars(b): r for b, r in tok.ranks.items()}
    merges = []
    for token, rank in sorted(tok.ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        pieces = _bpe(tok.ranks, token, max_rank=rank)
        if len(pieces) != 2:
            raise PocketError(f"token {rank} ({token!r}) is not the merge of two lower-ranked tokens: "
                              f"not a BPE vocabulary")
        merges.append((chars(pieces[0]), chars(pieces[1])))

    # ignore_merges: a chunk that is itself a token is taken whole, as tiktoken does.
    hf = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tok.pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    # Added in id order, they take the ids after the learned tokens: exactly where ours are.
    specials = sorted(tok.special_ids, key=tok.special_ids.get)
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    moved = {s: hf.token_to_id(s) for s in specials if hf.token_to_id(s) != tok.special_ids[s]}
    if moved:
        raise PocketError(f"special tokens would change ids in the Hugging Face tokenizer: {moved}")
    return hf


def _bpe(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's merge loop on `token`'s bytes, allowed only the tokens ranked below `max_rank`."""
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best[1]):
                best = (i, r)
        if best is None:
            return parts
        i = best[0]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


# ----------------------------------------------------------------------------- chat templates as Jinja

# A tool call as chat.tool_call_text writes it: json.dumps({"name": ..., "arguments": ...}) with the
# default separators and ensure_ascii=False (transformers' tojson filter is that json.dumps); arguments
# given as a JSON string are written as they are, by both.
_TOOL_CALL_MACRO = r"""
{%- macro tool_call_json(tool_call) -%}
  {%- set fn = tool_call.function if tool_call.function is defined else tool_call -%}
  {%- set name = fn.name if fn.name is defined else none -%}
  {%- set args = fn.arguments if fn.arguments is defined else {} -%}
  {%- if args is string -%}
    {%- set args_json = args if args | trim else '{}' -%}
  {%- else -%}
    {%- set args_json = args | tojson -%}
  {%- endif -%}
  {{- '{"name": ' + (name | tojson) + ', "arguments": ' + args_json + '}' -}}
{%- endmacro -%}
"""

# PocketTemplate.render: one bos, then <|role_start|>content<|role_end|> per message; a tool's result
# sits between <|tool_result_start|> and <|tool_result_end|>; tool calls end the assistant's content.
_POCKET_BODY = r"""
{{- bos -}}
{%- for message in messages -%}
  {%- if message.role not in starts -%}
    {{- raise_exception('unknown role ' + message.role | string) -}}
  {%- endif -%}
  {{- starts[message.role] + (message.content or '') -}}
  {%- if message.role == 'assistant' -%}
    {%- for tool_call in message.tool_calls or [] -%}
      {{- call_start + tool_call_json(tool_call) + call_end -}}
    {%- endfor -%}
  {%- endif -%}
  {{- ends[message.role] -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- starts['assistant'] -}}
{%- endif -%}
"""

# ChatMLTemplate.render: the default system message when the conversation has none; an assistant
# turn is its content and its tool calls joined by newlines; a tool's result is a user turn.
_CHATML_BODY = r"""
{%- if default_system is not none and (messages | length == 0 or messages[0].role != 'system') -%}
  {{- im_start + 'system\n' + default_system + im_end + '\n' -}}
{%- endif -%}
{%- for message in messages -%}
  {%- if message.role == 'assistant' -%}
    {{- im_start + 'assistant\n' + (message.content or '') -}}
    {%- for tool_call in message.tool_calls or [] -%}
      {%- if message.content or not loop.first -%}
        {{- '\n' -}}
      {%- endif -%}
      {{- call_open + tool_call_json(tool_call) + call_close -}}
    {%- endfor -%}
    {{- im_end + '\n' -}}
  {%- elif message.role == 'tool' -%}
    {{- im_start + 'user\n<tool_response>\n' + (message.content or '') + '\n</tool_response>' + im_end + '\n' -}}
  {%- elif message.role in ['system', 'user'] -%}
    {{- im_start + message.role + '\n' + (message.content or '') + im_end + '\n' -}}
  {%- else -%}
    {{- raise_exception('unknown role ' + message.role | string) -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- im_start + 'assistant\n' -}}
{%- endif -%}
"""


def jinja_template(chat: ChatTemplate) -> str:
    """The Jinja chat template (as `apply_chat_template` runs it) that renders what `chat.render`
    does. The token strings are taken from the tokenizer and set as variables at the top, so the
    body stays a fixed, readable text."""
    tok = chat.tokenizer
    if isinstance(chat, PocketTemplate):
        values = {
            "bos": _token_text(tok, chat.bos),
            "starts": {role: _token_text(tok, start) for role, (start, _) in chat.role_ids.items()},
            "ends": {role: _token_text(tok, end) for role, (_, end) in chat.role_ids.items()},
            "call_start": _token_text(tok, chat.call[0]), "call_end": _token_text(tok, chat.call[1]),
        }
        body = _POCKET_BODY
    elif isinstance(chat, ChatMLTemplate):
        values = {
            "im_start": _token_text(tok, chat.im_start), "im_end": _token_text(tok, chat.im_end),
            "default_system": chat.default_system,
            "call_open": chat.CALL_OPEN, "call_close": chat.CALL_CLOSE,
        }
        body = _CHATML_BODY
    else:
        raise PocketError(f"chat template {chat.name!r} has no Jinja equivalent")
    header = "".join(f"{{%- set {name} = {_jinja_literal(v)} -%}}\n" for name, v in values.items())
    return (header + _TOOL_CALL_MACRO + body).strip() + "\n"


def _jinja_literal(value) -> str:
    """A Jinja literal for a string, None or dict of strings. Jinja reads string escapes as Python does,
    and JSON's escapes (\\n, \\", \\\\, \\u0001) are a subset; non-ASCII characters stay as they are."""
    if value is None:
        return "none"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_jinja_literal(k)}: {_jinja_literal(v)}" for k, v in value.items()) + "}"
    return json.dumps(value, ensure_ascii=False)


# ----------------------------------------------------------------------------- tiktoken


def export_tiktoken(tokenizer: BPETokenizer, path: str | Path) -> Path:
    """Our BPE in tiktoken's rank-file format, plus `path + ".json"` holding the split pattern and the
    special tokens, which that format has no room for. Rebuild with

        meta = json.load(open(path + ".json"))
        ranks = tiktoken.load.load_tiktoken_bpe(path, expected_hash=meta["sha256"])
        enc = tiktoken.Encoding("name", pat_str=meta["pattern"], mergeable_ranks=ranks,
                                special_tokens=meta["special_tokens"])

    tiktoken caches every file it loads under a hash of its path (even a local one) in
    $TMPDIR/data-gym-cache: passing the sha256 makes it reread a file re-exported to the same path.
    """
    if not isinstance(tokenizer, BPETokenizer):
        raise PocketError(f"only our BPE tokenizer has a tiktoken form, not a {type(tokenizer).__name__}")
    path = Path(path)
    meta = Path(f"{path}.json")
    for existing in (path, meta):
        if (existing.exists() or existing.is_symlink()) and not _earlier_tiktoken_export(path):
            raise PocketError(f"{existing} already exists and is not an earlier tiktoken export: choose a new path")
    by_rank = sorted(tokenizer.ranks.items(), key=lambda kv: kv[1])
    text = "".join(f"{base64.b64encode(b).decode('ascii')} {r}\n" for b, r in by_rank)
    atomic_write_text(path, text)
    atomic_write_json(meta, {
        "pattern": tokenizer.pattern,
        "special_tokens": dict(tokenizer.special_ids),
        "sha256": hashlib.sha256(text.encode("ascii")).hexdigest(),
    })
    return path


def _earlier_tiktoken_export(path: Path) -> bool:
    """Whether `path` and `path.json` are what export_tiktoken wrote (the rank file's hash is the one its
    JSON records): such a pair is replaced by exporting again, anything else is the user's and kept."""
    try:
        meta = json.loads(Path(f"{path}.json").read_text(encoding="utf-8"))
        return isinstance(meta, dict) and meta.get("sha256") == hashlib.sha256(path.read_bytes()).hexdigest()
    except (OSError, ValueError):
        return False
