"""Configs are dataclasses; a TOML file and `--set key=value` overrides fill them in.

    pocketgpt pretrain RUN --config my.toml --set pretrain.train.lr=1e-3 --set pretrain.model.n_layer=4

Nested dataclasses are TOML tables; dict fields (like the data sources) take whole tables.
Unknown keys are errors that name the known ones, so a typo never passes silently.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, TypeVar

from .common import PocketError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


def parse_value(text: str) -> Any:
    """'3' -> 3, '1e-3' -> 0.001, 'true' -> True, '[1,2]' -> [1, 2]; anything else stays a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def update(obj: T, values: dict, where: str = "") -> T:
    """Set fields of a dataclass from a dict, recursing into nested dataclasses."""
    known = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in known:
            raise PocketError(f"unknown config key {where + key!r}; known: {', '.join(sorted(known))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise PocketError(f"config key {where}{key} is a table, got {value!r}")
            update(current, value, f"{where}{key}.")
        elif isinstance(current, dict) and isinstance(value, dict):
            setattr(obj, key, deep_merge(current, value))
        else:
            setattr(obj, key, _coerce(current, value, f"{where}{key}"))
    if hasattr(obj, "check_values"):  # a config that knows its bounds says so now, not steps later
        obj.check_values()
    return obj


def require(section: str, rules: dict[str, tuple[Any, bool, str]]) -> None:
    """A stage config's `check_values`: refuse the first setting whose check failed, {name: (value, ok, what it
    must be)}, when it is set (`update` calls check_values after --set) rather than as a traceback steps later."""
    for name, (value, ok, rule) in rules.items():
        if not ok:
            raise PocketError(f"{section}.{name} must be {rule}, not {value!r}")


def _coerce(current: Any, value: Any, name: str) -> Any:
    if isinstance(current, bool) and not isinstance(value, bool):
        raise PocketError(f"config key {name} expects true/false, got {value!r}")
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if current is not None and not isinstance(value, type(current)):
        raise PocketError(f"config key {name} expects {type(current).__name__}, got {value!r}")
    return value


def deep_merge(base: dict, extra: dict) -> dict:
    """Tables merge key by key (so `--set sources.code.weight=2` keeps the other sources)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def set_path(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def load(obj: T, path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Fill `obj` from a TOML file, then from 'a.b=value' overrides (later wins)."""
    if path:
        path = Path(path)
        if not path.is_file():
            raise PocketError(f"config file {path} {'is a directory' if path.is_dir() else 'does not exist'}")
        try:
            update(obj, tomllib.loads(path.read_text(encoding="utf-8")))
        except tomllib.TOMLDecodeError as e:
            raise PocketError(f"{path}: {e}") from None
        except UnicodeDecodeError as e:
            raise PocketError(f"{path} is not UTF-8 text (byte {e.start}), as a TOML file must be") from None
    for item in overrides:
        if "=" not in item:
            raise PocketError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        tree: dict = {}
        set_path(tree, key.strip(), parse_value(text.strip()))
        update(obj, tree)
    return obj
