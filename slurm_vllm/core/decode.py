"""One strict decoder for the spec and every job-folder record: typed dataclasses from plain data.

YAML or JSON data becomes the annotated frozen dataclasses (nested ones, unions, literals, enums,
`dict[str, T]`, `tuple[T, ...]`), or one error of the caller's class naming the key path: an
unknown key (with the valid keys and their defaults), a missing one, a value of the wrong type (the
value shown), a number that is not finite. A hook lets the spec adjust or refuse a value by its
path (numbers as env strings, an unquoted time) and check every text (control characters).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

T = TypeVar("T")
Hook = Callable[[Any, Any, str], Any]        # (type, value, path) -> the value to decode, or raise
TextCheck = Callable[[str, str], None]       # (text, path): raise if the text is not allowed there


def show(value: Any, limit: int = 60) -> str:
    """VALUE's repr, cut to LIMIT characters (an error message stays one short line)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) if not isinstance(a, str) else a for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    if origin is dict:
        return "a mapping"
    if origin is tuple:
        return "a list of strings" if get_args(tp)[0] is str else "a list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def default_text(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        return f"{f.name} (default {f.default!r})" if f.default is not None else f"{f.name} (default null)"
    if f.default_factory is not dataclasses.MISSING:
        if dataclasses.is_dataclass(f.default_factory):
            return f"{f.name} (a section)"
        return f"{f.name} (default {f.default_factory()!r})"
    return f"{f.name} (required)"


class Decoder:
    """Decodes plain data into dataclasses, raising ERROR(message) with the key path."""

    def __init__(self, error: type[Exception], hook: Hook | None = None, text: TextCheck | None = None,
                 root: str = "the document") -> None:
        self.error, self.hook, self.text, self.root = error, hook, text, root

    def build(self, cls: type[T], data: Any, path: str = "") -> T:
        """DATA (a mapping) as the dataclass CLS; a missing section (null) is its defaults."""
        where = path or self.root
        if data is None and path:
            data = {}
        if not isinstance(data, dict):
            raise self.error(f"{where}: expected a mapping, got {show(data)}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}       # type: ignore[arg-type]
        for key in data:
            if key not in fields:
                valid = ", ".join(default_text(f) for f in fields.values())
                raise self.error(f"{path + '.' if path else ''}{key}: unknown key; valid keys: {valid}")
        kwargs = {}
        for name, f in fields.items():
            sub = f"{path}.{name}" if path else name
            if name in data:
                kwargs[name] = self.convert(hints[name], data[name], sub)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise self.error(f"{sub}: required key is missing")
        return cls(**kwargs)

    def convert(self, tp: Any, value: Any, path: str) -> Any:
        if self.hook is not None:
            value = self.hook(tp, value, path)
        origin = get_origin(tp)
        if origin in (Union, types.UnionType):
            return self._union(tp, value, path)
        if origin is Literal:
            if value in get_args(tp):
                return value
            allowed = ", ".join(map(str, get_args(tp)))
            raise self.error(f"{path}: expected one of {allowed}, got {show(value)}")
        if tp is type(None):
            if value is None:
                return None
            raise self.error(f"{path}: expected null, got {show(value)}")
        if dataclasses.is_dataclass(tp):
            return self.build(tp, value, path)   # type: ignore[arg-type]
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            try:
                return tp(value)
            except ValueError:
                raise self.error(f"{path}: {show(value)} is not one of "
                                 f"{', '.join(str(m.value) for m in tp)}") from None
        if origin is dict:
            return self._mapping(get_args(tp)[1], value, path)
        if origin is tuple:
            inner = get_args(tp)[0]
            if not isinstance(value, list) or (inner is str and not all(isinstance(v, str) for v in value)):
                raise self.error(f"{path}: expected {type_name(tp)}, got {show(value)}")
            return tuple(self.convert(inner, v, f"{path}[{i}]") for i, v in enumerate(value))
        return self._scalar(tp, value, path)

    def _union(self, tp: Any, value: Any, path: str) -> Any:
        for option in get_args(tp):
            try:
                return self.convert(option, value, path)
            except self.error:
                if type(value) is option:
                    raise                      # the right type with a wrong value: say why
        raise self.error(f"{path}: expected {type_name(tp)}, got {show(value)}")

    def _mapping(self, value_tp: Any, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(f"{path}: expected a mapping, got {show(value)}")
        for k in value:
            if not isinstance(k, str):        # `~:`, `true:`, `1:` are YAML null/bool/int, not names
                raise self.error(f"{path}: key {show(k)} is not a string (YAML reads ~, true, 1 "
                                 f"unquoted as null, boolean, number): quote it")
            if self.text is not None:
                self.text(k, f"{path} key")
        return {k: self.convert(value_tp, v, f"{path}.{k}") for k, v in value.items()}

    def _scalar(self, tp: Any, value: Any, path: str) -> Any:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if tp is bool and isinstance(value, bool):
            return value
        if tp is int and number and isinstance(value, int):
            return value
        if tp is float and number:
            if not math.isfinite(value):      # .nan/.inf: no setting means that
                raise self.error(f"{path}: {value} is not a finite number")
            return float(value)
        if tp is str and isinstance(value, str):
            if self.text is not None:
                self.text(value, path)
            return value
        if tp not in (bool, int, float, str):  # pragma: no cover - a schema bug, not input
            raise TypeError(f"unsupported type {tp!r} at {path}")
        raise self.error(f"{path}: expected {type_name(tp)}, got {show(value)}")
