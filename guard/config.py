"""The guard-specific part of a Qwen3Guard-Stream config.json, checked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from guard.errors import CheckpointError

__all__ = ["GuardLabels", "guard_labels"]

# (config field with the class count, config field with the names) per head
_HEADS = {
    "risk_level": ("num_risk_level", "response_risk_level_map"),
    "category": ("num_category", "response_category_map"),
    "query_risk_level": ("num_query_risk_level", "query_risk_level_map"),
    "query_category": ("num_query_category", "query_category_map"),
}
_REQUIRED_RISK_LEVELS = ("Safe", "Unsafe", "Controversial")


@dataclass(frozen=True, slots=True)
class GuardLabels:
    """Names of each head's classes, in logit order, read from the config."""

    inner_size: int
    risk_levels: tuple[str, ...]
    categories: tuple[str, ...]
    query_risk_levels: tuple[str, ...]
    query_categories: tuple[str, ...]


def _names(config: dict[str, Any], head: str, where: str) -> tuple[str, ...]:
    count_field, map_field = _HEADS[head]
    missing = [field for field in (count_field, map_field) if field not in config]
    if missing:
        raise CheckpointError(
            f"{where} lacks {' and '.join(missing)}: this is not a Qwen3Guard-Stream config "
            "(a Qwen3ForCausalLM export drops the guard fields); use the original checkpoint's config.json"
        )
    count, mapping = config[count_field], config[map_field]
    try:
        by_index = {int(key): str(value) for key, value in mapping.items()}
    except (AttributeError, ValueError) as error:
        raise CheckpointError(f"{where}: {map_field} must map class indices to names, got {mapping!r}") from error
    if sorted(by_index) != list(range(count)):
        raise CheckpointError(
            f"{where}: {map_field} names classes {sorted(by_index)} but {count_field} is {count}; "
            "every class 0..{count_field}-1 needs exactly one name"
        )
    return tuple(by_index[index] for index in range(count))


def guard_labels(config: dict[str, Any], where: str = "config.json") -> GuardLabels:
    if "guard_inner_size" not in config:
        raise CheckpointError(
            f"{where} lacks guard_inner_size: this is not a Qwen3Guard-Stream config "
            "(a Qwen3ForCausalLM export drops the guard fields); use the original checkpoint's config.json"
        )
    labels = GuardLabels(
        inner_size=int(config["guard_inner_size"]),
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
