"""YAML for specs: a safe loader without aliases, duplicate keys or deep nesting; errors name the line."""

from __future__ import annotations

from typing import Any

import yaml

from slurm_vllm.core.decode import show as _show
from slurm_vllm.core.errors import SpecError

MAX_DEPTH = 16                     # YAML nesting (a spec needs 4)


class _Loader(yaml.SafeLoader):
    """YAML for specs: no aliases (an alias bomb expands to gigabytes), no duplicate keys (the last
    would silently win), nesting at most MAX_DEPTH (no RecursionError)."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise SpecError(f"line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not "
                            f"allowed in a spec: write the value out")
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise SpecError(f"line {mark.line + 1}: nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise SpecError(f"line {key_node.start_mark.line + 1}: duplicate key {_show(key)}")
            seen.add(key if isinstance(key, str | int | float | bool) else id(key_node))
        return super().construct_mapping(node, deep=deep)


def loads(text: str) -> Any:
    """Parse spec YAML text with the spec loader; SpecError (line, what) on any problem."""
    try:
        return yaml.load(text, Loader=_Loader)   # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise SpecError(f"{where}not valid YAML: {getattr(exc, 'problem', exc)}") from None
    except (ValueError, OverflowError) as exc:    # a 5000-digit number: int() refuses it
        raise SpecError(f"a value YAML cannot hold: {str(exc)[:120]}") from None
