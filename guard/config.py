"""The guard-specific part of a Qwen3Guard-Stream config.json, checked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from guard.errors import CheckpointError

__all__ = ["GuardLabels", "check_backbone_fields", "guard_labels"]

# (config field with the class count, config field with the names) per head
_HEADS = {
    "risk_level": ("num_risk_level", "response_risk_level_map"),
    "category": ("num_category", "response_category_map"),
    "query_risk_level": ("num_query_risk_level", "query_risk_level_map"),
    "query_category": ("num_query_category", "query_category_map"),
}
# Older names of the map fields: one SGLang revision of the model files read
# ``risk_level_map``, so a config written for it may carry only that name.
_ALIASES = {"response_risk_level_map": "risk_level_map"}
_REQUIRED_RISK_LEVELS = ("Safe", "Unsafe", "Controversial")
# Sizes the backbone is built from. transformers checks their types too, but
# its message is a multi-line dataclass error; ours names the field and the fix.
_POSITIVE_INTS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "head_dim",
)
_FIX = "correct it, or use the original checkpoint's config.json"


@dataclass(frozen=True, slots=True)
class GuardLabels:
    """Names of each head's classes, in logit order, read from the config."""

    inner_size: int
    risk_levels: tuple[str, ...]
    categories: tuple[str, ...]
    query_risk_levels: tuple[str, ...]
    query_categories: tuple[str, ...]


def _positive_int(config: dict[str, Any], field: str, where: str) -> int:
    value = config[field]
    # bool is an int to Python, and "2" or 2.0 would be silently accepted by int()
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{where}: {field} must be a positive integer, got {value!r}; {_FIX}")
    return value


def check_backbone_fields(config: dict[str, Any], where: str = "config.json") -> None:
    """Refuse backbone sizes of the wrong type, naming the field."""
    for field in _POSITIVE_INTS:
        if config.get(field) is not None:
            _positive_int(config, field, where)
    eps = config.get("rms_norm_eps")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, int | float) or eps <= 0):
        raise CheckpointError(f"{where}: rms_norm_eps must be a positive number, got {eps!r}; {_FIX}")


def _names(config: dict[str, Any], head: str, where: str) -> tuple[str, ...]:
    count_field, map_field = _HEADS[head]
    if map_field not in config and _ALIASES.get(map_field) in config:
        map_field = _ALIASES[map_field]
    missing = [field for field in (count_field, map_field) if field not in config]
    if missing:
        raise CheckpointError(
            f"{where} lacks {' and '.join(missing)}: this is not a Qwen3Guard-Stream config "
            "(a Qwen3ForCausalLM export drops the guard fields); use the original checkpoint's config.json"
        )
    count, mapping = _positive_int(config, count_field, where), config[map_field]
    if not isinstance(mapping, dict) or not all(isinstance(name, str) for name in mapping.values()):
        raise CheckpointError(
            f'{where}: {map_field} must be a JSON object mapping class indices to names, like {{"0": "Safe"}}, '
            f"got {mapping!r}; {_FIX}"
        )
    by_index = {}
    for key, name in mapping.items():
        try:
            by_index[int(key)] = name
        except ValueError as error:
            raise CheckpointError(f"{where}: {map_field} has the key {key!r}, not a class index; {_FIX}") from error
    if sorted(by_index) != list(range(count)):
        raise CheckpointError(
            f"{where}: {map_field} names classes {sorted(by_index)} but {count_field} is {count}; "
            f"every class 0..{count - 1} needs exactly one name"
        )
    return tuple(by_index[index] for index in range(count))


def guard_labels(config: dict[str, Any], where: str = "config.json") -> GuardLabels:
    if "guard_inner_size" not in config:
        raise CheckpointError(
            f"{where} lacks guard_inner_size: this is not a Qwen3Guard-Stream config "
            "(a Qwen3ForCausalLM export drops the guard fields); use the original checkpoint's config.json"
        )
    labels = GuardLabels(
        inner_size=_positive_int(config, "guard_inner_size", where),
        risk_levels=_names(config, "risk_level", where),
        categories=_names(config, "category", where),
        query_risk_levels=_names(config, "query_risk_level", where),
        query_categories=_names(config, "query_category", where),
    )
    for field, names in (
        ("response_risk_level_map", labels.risk_levels),
        ("query_risk_level_map", labels.query_risk_levels),
    ):
        absent = [name for name in _REQUIRED_RISK_LEVELS if name not in names]
        if absent:
            raise CheckpointError(f"{where}: {field} has no {', '.join(absent)} (has {', '.join(names)})")
    return labels
