"""Named text sources: each yields documents (strings). A mixture draws from several by weight.

Built-in sources: the synthetic world's encyclopedia (`world`), worked arithmetic (`math`), drills of
one-step number facts (`facts`) and of repeating what was just said (`repeats`, both not in the default
mixture), spelled words (`spelling`), task conversations in the chat format
(`chat`, so the model meets the chat template during pretraining, like nanochat's midtraining), and
real text present on every machine that has Python: the standard library's documentation (`docs`)
and source code (`code`). Users add their own: a folder of text files, JSONL with a text field or
Parquet with a text column (a file or a folder of them), or a Hugging Face dataset on disk (`hf`:
what `Dataset.save_to_disk` wrote, or a folder of data files; needs the `datasets` package). Every
kind streams its documents, so a source may be larger than memory.

A document is a string, or for `chat` a conversation (a list of messages) that the mixture renders
with the tokenizer's chat template.

A source is described by a small dict (from TOML), e.g.

    {"kind": "jsonl", "path": "data/chats.jsonl", "field": "text", "weight": 0.3}
    {"kind": "hf", "path": "~/datasets/fineweb-sample", "field": "text", "split": "train"}
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from ..common import PocketError, iter_jsonl

# The settings beyond the common ones that each file-reading kind takes; the generated kinds (world, math,
# ...) take their generator's own (`generator_settings`).
PLAIN_OPTIONS = {"docs": (), "code": (), "text": (), "jsonl": (), "parquet": (), "hf": ("split",)}

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".html", ".tex")


@dataclass
class SourceSpec:
    name: str
    kind: str  # docs | code | text | jsonl | parquet | hf | world | math | facts | spelling | chat
    weight: float = 1.0
    path: str = ""
    field: str = "text"
    max_docs: int = 0  # 0 = all
    max_bytes: int = 0  # 0 = all; caps large sources (the stdlib's code is ~30 MB)
    options: dict = dataclasses.field(default_factory=dict)  # kind-specific settings (e.g. the world's size)

    @classmethod
    def from_dict(cls, name: str, d: dict) -> SourceSpec:
        d = dict(d)
        # The name is its shards' folder in RUN/data: ".." named the run itself, whose files were then cleared
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
            raise PocketError(f"data source {name!r}: a name is letters, digits, '_', '-' and '.' (not first), "
                              "as it names the source's folder in RUN/data")
        known = {"kind", "weight", "path", "field", "max_docs", "max_bytes"}
        options = {k: d.pop(k) for k in list(d) if k not in known}
        if "kind" not in d:
            raise PocketError(f"data source {name!r} has no 'kind' (one of {', '.join(KINDS)})")
        if d["kind"] not in KINDS:
            raise PocketError(f"data source {name!r}: unknown kind {d['kind']!r}; known: {', '.join(KINDS)}")
        weight = d.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < math.inf:
            raise PocketError(f"data source {name!r}: weight must be a number >= 0 (0 leaves the source out), "
                              f"not {weight!r}")
        for key, kind, rule in (("max_docs", int, "a whole number >= 0"), ("max_bytes", int, "a whole number >= 0"),
                                ("path", str, "a string"), ("field", str, "a string")):
            value = d.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, kind)
                                      or (kind is int and value < 0)):
                raise PocketError(f"data source {name!r}: {key} must be {rule}, not {value!r}")
        takes = PLAIN_OPTIONS[d["kind"]] if d["kind"] in PLAIN_OPTIONS else generator_settings(d["kind"])
        stray = sorted(set(options) - set(takes))
        if stray:  # a misspelt setting ("wieght") would otherwise be kept and never read
            raise PocketError(f"data source {name!r}: unknown setting {stray[0]!r} (a {d['kind']} source takes "
                              f"{', '.join(sorted(known | set(takes)))})")
        return cls(name=name, options=options, **d)


def generator_settings(kind: str) -> tuple[str, ...]:
    """The settings a generated kind takes: its generator's keyword arguments (the world's: its config)."""
    from .mathtext import fact_documents, math_documents
    from .repeats import repeat_documents
    from .tasks.swiss_cheese import spelling_documents
    from .world import WorldConfig

    if kind == "world":
        return tuple(f.name for f in dataclasses.fields(WorldConfig))
    if kind == "chat":
        return ("tasks",)
    generator = {"math": math_documents, "facts": fact_documents, "repeats": repeat_documents,
                 "spelling": spelling_documents}[kind]
    return tuple(inspect.signature(generator).parameters)


def document_text(doc: str | list[dict]) -> str:
    """The text of a document (a conversation's message contents, one per line)."""
    return doc if isinstance(doc, str) else "\n".join(m.get("content") or "" for m in doc)


def iter_documents(spec: SourceSpec) -> Iterator:
    """A source's documents one at a time, in a stable order, after the size caps; an empty source is an
    error (raised once the stream is exhausted)."""
    count, size = 0, 0
    for doc in KINDS[spec.kind](spec):
        text = document_text(doc)
        if not text.strip():
            continue
        if spec.max_bytes and size >= spec.max_bytes:
            break
        if spec.max_docs and count >= spec.max_docs:
            break
        yield doc
        count += 1
        size += len(text.encode("utf-8"))
    if not count:
        where = f" at {spec.path}" if spec.path else ""
        raise PocketError(f"data source {spec.name!r} ({spec.kind}{where}) has no documents")


def read_documents(spec: SourceSpec) -> list:
    """All documents of a source in a list (for sources known to be small; the mixture streams them)."""
    return list(iter_documents(spec))


def source_hash(spec: SourceSpec) -> str:
    """What a source's documents are made from: its settings (the weight aside: it picks rows, not
    tokens) and, for files on disk, each file's path, size and modification time, so an edited file
    counts as a new source without reading the data."""
    files = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in _source_files(spec)]
    blob = json.dumps({**asdict(spec), "weight": None, "files": files}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _source_files(spec: SourceSpec) -> list[Path]:
    """The files a source reads, which its hash covers: one file whatever its name, or in a folder the ones its
    kind reads (text: the text suffixes, anywhere below; jsonl and parquet: their own, at the top; a Hugging
    Face dataset: all). A README, a _SUCCESS marker or an editor's swap file beside the data re-tokenized it all."""
    if spec.kind not in FILE_KINDS:
        return []
    path = _existing(spec)
    if path.is_file():
        return [path]
    found = {"text": (p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES), "jsonl": path.glob("*.jsonl"),
             "parquet": path.glob("*.parquet")}.get(spec.kind, path.rglob("*"))
    return sorted(p for p in found if p.is_file())  # a folder named like a file (a Spark "x.parquet") is not one


# ----------------------------------------------------------------------------- kinds


def _python_docs(spec: SourceSpec) -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]


def _python_code(spec: SourceSpec) -> Iterator[str]:
    """The standard library's own .py files (tests and vendored packages left out), sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "__pycache__"}
    for path in sorted(root.rglob("*.py")):
        if skip.intersection(path.relative_to(root).parts):
            continue
        try:
            yield path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def _text_files(spec: SourceSpec) -> Iterator[str]:
    for p in _source_files(spec):
        try:
            yield p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise PocketError(f"{p}: not UTF-8 text (byte {e.start})") from None


def _jsonl(spec: SourceSpec) -> Iterator[str]:
    """A JSONL file, or a folder of them (sorted by name), read line by line."""
    for p in _source_files(spec):
        for lineno, record in iter_jsonl(p):
            if not isinstance(record, dict) or not isinstance(record.get(spec.field), str):
                raise PocketError(f"{p}:{lineno}: expected an object with a string field {spec.field!r}")
            yield record[spec.field]


def _parquet(spec: SourceSpec) -> Iterator[str]:
    """Rows of the text column, read a record batch at a time (a file may be larger than memory)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PocketError("Parquet sources need pyarrow: pip install 'pocketgpt[parquet]'") from None
    for p in _source_files(spec):
        try:
            parquet = pq.ParquetFile(p)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise PocketError(f"{p}: not a Parquet file ({e})") from None
        if spec.field not in parquet.schema_arrow.names:
            raise PocketError(f"{p}: no column {spec.field!r} (columns: {parquet.schema_arrow.names})")
        for batch in parquet.iter_batches(batch_size=1024, columns=[spec.field]):
            yield from _texts(batch.column(0).to_pylist(), f"{p}: column {spec.field!r}")


# The `datasets` builder that reads one data file, by its suffix.
HF_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text",
                    ".arrow": "arrow"}


def _hf_dataset(spec: SourceSpec) -> Iterator[str]:
    """A Hugging Face dataset on disk, never downloaded: a folder `save_to_disk` wrote (its Arrow files
    are memory-mapped), or a folder of data files `load_dataset` recognises (streamed from the files)."""
    try:
        import datasets
    except ImportError:
        raise PocketError(f"data source {spec.name!r} (hf) needs the Hugging Face `datasets` package: "
                          "pip install datasets") from None
    path = _existing(spec)
    split = spec.options.get("split", "train")
    saved = any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json"))
    if path.is_file():  # one data file: read by its format's builder (a bare file path would be a Hub name)
        builder = HF_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise PocketError(f"data source {spec.name!r}: {path} is a file `datasets` cannot read by its suffix "
                              f"({', '.join(HF_FILE_BUILDERS)}); give the folder a dataset was saved to")
    try:
        if saved:
            ds = datasets.load_from_disk(str(path))
        elif path.is_file():
            ds = datasets.load_dataset(builder, data_files=str(path), split=split, streaming=True)
        else:
            ds = datasets.load_dataset(str(path), split=split, streaming=True)
    except (ValueError, FileNotFoundError) as e:
        raise PocketError(f"{path}: not a Hugging Face dataset ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise PocketError(f"{path}: no split {split!r} (splits: {', '.join(ds)})")
        ds = ds[split]
    elif saved and "split" in spec.options and str(ds.split) != split:
        # one saved Dataset is one split: another split asked of it was read as the whole
        raise PocketError(f"{path}: a saved dataset of one split ({ds.split or 'unnamed'}), not {split!r}: "
                          "leave `split` out to read it")
    if ds.column_names is not None and spec.field not in ds.column_names:
        raise PocketError(f"{path}: no column {spec.field!r} (columns: {ds.column_names})")
    for batch in ds.select_columns([spec.field]).iter(batch_size=1024):
        yield from _texts(batch[spec.field], f"{path}: column {spec.field!r}")


def _texts(values: list, where: str) -> Iterator[str]:
    """A column's documents; a missing value (null) is no document, a value of another type is an error
    (an int column was read as "no documents")."""
    for value in values:
        if isinstance(value, str):
            yield value
        elif value is not None:
            raise PocketError(f"{where} holds {type(value).__name__} values, not text (e.g. {str(value)[:40]!r})")


def _world(spec: SourceSpec) -> Iterator[str]:
    from .world import WorldConfig, generate_world

    yield from generate_world(WorldConfig(**spec.options)).pretraining_documents()


def _math(spec: SourceSpec) -> Iterator[str]:
    from .mathtext import math_documents

    yield from math_documents(**{"n": 2000, "seed": 0, **spec.options})


def _facts(spec: SourceSpec) -> Iterator[str]:
    from .mathtext import fact_documents

    yield from fact_documents(**{"n": 3000, "seed": 0, **spec.options})


def _repeats(spec: SourceSpec) -> Iterator[str]:
    from .repeats import repeat_documents

    yield from repeat_documents(**{"n": 3000, "seed": 0, **spec.options})


def _spelling(spec: SourceSpec) -> Iterator[str]:
    from .tasks.swiss_cheese import spelling_documents

    yield from spelling_documents(**{"n": 3000, "seed": 0, **spec.options})


# The tasks' train splits in the renderings an assistant uses; facts only where well attested (head).
DEFAULT_CHAT_TASKS = {"factqa": "sentence", "arithmetic": ["cot", "tool"], "compare_decimals": "cot",
                      "count_letter": "cot", "spell": "direct", "multihop": "cot", "structured": "direct"}


def _chat(spec: SourceSpec) -> Iterator[list[dict]]:
    """Task conversations from the train splits. Only head facts: tail facts stay rare, unseen ones unseen.

    A task's entry is a style (or a list that takes turns), or `{style = ..., also = [...]}`: the same
    examples rendered once more in each style of `also` (multi-hop worked out and, again, with its tools)."""
    from .tasks import get_task

    for name, entry in spec.options.get("tasks", DEFAULT_CHAT_TASKS).items():
        task = get_task(name)
        examples = [e for e in task.examples("train") if e.meta.get("tier", "head") == "head"]
        if hasattr(task, "phrasings"):
            examples = [p for e in examples for p in task.phrasings(e)]
        rendering = entry if isinstance(entry, dict) else {"style": entry}
        unknown = set(rendering) - {"style", "also"}
        if unknown or "style" not in rendering:
            raise PocketError(f"data source {spec.name!r}: task {name!r} takes a style or "
                              f"{{style = ..., also = [...]}}, not {entry!r}")
        for style in [rendering["style"], *rendering.get("also", [])]:
            yield from task.render_each(examples, style)


def _existing(spec: SourceSpec) -> Path:
    if not spec.path:
        raise PocketError(f"data source {spec.name!r} ({spec.kind}) needs a 'path'")
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise PocketError(f"data source {spec.name!r}: {path} does not exist")
    return path


KINDS = {
    "docs": _python_docs,
    "code": _python_code,
    "text": _text_files,
    "jsonl": _jsonl,
    "parquet": _parquet,
    "hf": _hf_dataset,
    "world": _world,
    "math": _math,
    "facts": _facts,
    "repeats": _repeats,
    "spelling": _spelling,
    "chat": _chat,
}
# The kinds whose documents come from files the user names (their sizes and times enter source_hash).
FILE_KINDS = ("text", "jsonl", "parquet", "hf")
