"""The model's config.json: read on the login node when it is there; TP x PP checked against it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slurm_vllm.core import safefile
from slurm_vllm.core.errors import PlanError


def factorizations(total: int) -> list[tuple[int, int]]:
    return [(tp, total // tp) for tp in range(1, total + 1) if total % tp == 0]


def _model_numbers(config: dict[str, Any]) -> tuple[int | None, int | None, int | None]:
    """(attention heads, KV heads, layers) from a model's config.json (text_config first, for
    multimodal models); PlanError when one is there but not a positive whole number."""
    text = config.get("text_config") or config
    if not isinstance(text, dict):
        raise PlanError(f"model.path: config.json: text_config is {type(text).__name__}, not an object")
    out: list[int | None] = []
    for key in ("num_attention_heads", "num_key_value_heads", "num_hidden_layers"):
        value = text.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise PlanError(f"model.path: config.json: {key} is {value!r}, not a positive whole number")
        out.append(value)
    heads, kv_heads, layers = out
    return heads, kv_heads if kv_heads is not None else heads, layers


def check_model(config: dict[str, Any], tp: int, pp: int, total: int) -> None:
    heads, kv_heads, layers = _model_numbers(config)
    valid = [(t, p) for t, p in factorizations(total)
             if (not heads or heads % t == 0) and (not kv_heads or kv_heads % t == 0 or t % kv_heads == 0)
             and (not layers or layers >= p)]
    valid_text = ", ".join(f"TP{t}xPP{p}" for t, p in valid) or "none (use fewer GPUs)"
    if heads and heads % tp:
        raise PlanError(f"parallelism.tensor={tp}: the model's {heads} attention heads do not divide by "
                        f"{tp}; valid choices for this model: {valid_text}")
    if kv_heads and kv_heads % tp and tp % kv_heads:
        raise PlanError(f"parallelism.tensor={tp}: the model's {kv_heads} KV heads neither divide by nor "
                        f"divide {tp}; valid choices for this model: {valid_text}")
    if layers and layers < pp:
        raise PlanError(f"parallelism.pipeline={pp}: the model has only {layers} layers; "
                        f"valid choices for this model: {valid_text}")


MAX_MODEL_CONFIG = 4 << 20       # config.json of the largest models is some 10 KB


def read_model_config(model_path: str) -> dict[str, Any] | None:
    """The model's config.json when the login node sees one (None: not here, e.g. only inside the
    container or on the nodes, and the check is left to vLLM); PlanError when it is there but broken."""
    path = Path(model_path) / "config.json"
    try:
        if not path.exists():
            return None
    except OSError as exc:             # a path component over the file system's 255 bytes
        raise PlanError(f"model.path: {exc.strerror}: {model_path[:80]}…") from None
    try:
        raw = safefile.read_input(path, MAX_MODEL_CONFIG)
    except IsADirectoryError:
        raise PlanError(f"model.path: {path} is a folder, not the model's config file") from None
    except OSError as exc:
        raise PlanError(f"model.path: cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise PlanError(f"model.path: {path}: {exc}") from None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise PlanError(f"model.path: {path}: not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(data, dict):
        raise PlanError(f"model.path: {path}: a JSON {type(data).__name__}, not the model's config object")
    return data
