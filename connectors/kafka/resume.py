"""Whether a consumer may resume from the checkpoints it finds: a resume is checked, never silent.

The consumer refuses to start (`CheckpointError`, one line naming the checkpoint's file or
state-topic key and the field) unless `--reset-model` tells it to start a fresh model:

- **Missing checkpoint, judged per partition.** Each instance learns its own model from the
  partitions it is given. When this instance has no checkpoint and the group has committed
  offsets, every partition with records before its committed offset must have been learned by
  some checkpoint of the group this consumer can see (another instance's offsets, or a keyed
  model's learned-through offsets). Then this instance's model starts fresh at the committed
  offsets, with a WARNING naming those checkpoints: that is the instance-model semantics (a
  newcomer, or a renamed instance, has a model of its own; a renamed instance does not take
  over its old model: give it its old `--instance-id` for that). A partition no visible
  checkpoint learned is refused: a fresh model would never learn the records before its
  committed offset (another `--checkpoint-dir`, a deleted key, or a newcomer whose
  `--checkpoint-dir` cannot see the other instances' checkpoints).
- **Model settings** (`checkpoint.MODEL_SETTINGS`) that differ from the flags, naming each.
  Only the names the checkpoint recorded are compared (a setting added in a later version
  is no difference to an older checkpoint). `seed` and `warmup` act only during the warm-up,
  so they are compared only while the stored model is cold. Features are compared as a set:
  the models map record fields by name, so `--features b,a` is the model of `a,b`; except
  with `--replicate`, whose statistics log holds rows by position.
- **Offsets** for another topic, a partition the input does not have, or past a partition's
  end. An offset before a partition's first offset (records deleted by retention) resumes at
  the first, with a warning.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from streamem_connectors.kafka.checkpoint import CheckpointError, PartitionOffset, model_settings
from streamem_connectors.kafka.settings import ConsumerSettings

__all__ = [
    "check_missing",
    "check_resume",
    "differing_settings",
    "refuse_or_reset",
    "resumed_or_reset",
    "settings_differences",
]

logger = logging.getLogger(__name__)
Partition = tuple[str, int]
_RESET_HINT = "add --reset-model to start a fresh model at the group's committed offsets instead"
WARM_UP_ONLY = ("seed", "warmup")  # settings that change nothing once the model is warm


def differing_settings(
    stored: dict[str, Any] | None, settings: ConsumerSettings, warm: bool = False
) -> list[tuple[str, Any, Any]]:
    """(name, checkpoint value, flags value) of each recorded model setting that makes another model."""
    if stored is None:
        return []
    current = model_settings(settings)
    found = []
    for name, value in stored.items():
        if name not in current or (warm and name in WARM_UP_ONLY):
            continue  # not a model setting of this version, or one that no longer acts
        if name == "features" and not settings.replicate and _same_names(value, current[name]):
            continue  # the models take each feature by name: another order is the same model
        if value != current[name]:
            found.append((name, value, current[name]))
    return found


def _same_names(stored: Any, current: list[str]) -> bool:
    return isinstance(stored, list) and len(stored) == len(current) and set(stored) == set(current)


def settings_differences(stored: dict[str, Any] | None, settings: ConsumerSettings, warm: bool = False) -> list[str]:
    """'name: checkpoint X, flags Y' for each model setting that differs (see `differing_settings`)."""
    return [
        f"{name}: checkpoint {old!r}, flags {new!r}" for name, old, new in differing_settings(stored, settings, warm)
    ]


def refuse_or_reset(
    settings: ConsumerSettings,
    error: CheckpointError,
    fresh: str = "a fresh model starts at the group's committed offsets",
) -> None:
    """Refuse to start (raise `error`, with the remedy) unless --reset-model; with it, say loudly
    what starts fresh."""
    if not settings.reset_model:
        raise CheckpointError(f"{error}; {_RESET_HINT}") from None
    logger.warning("%s; --reset-model: %s", error, fresh)


def resumed_or_reset(settings: ConsumerSettings, load, fresh: str | None = None):
    """`load()`, or None (a fresh model) when it raises CheckpointError and --reset-model allows that."""
    try:
        return load()
    except CheckpointError as error:
        refuse_or_reset(settings, error, *([fresh] if fresh else []))
        return None


def _committed_text(topic: str, committed: dict[int, int]) -> str:
    return ", ".join(f"{topic}[{p}]={o}" for p, o in sorted(committed.items()))


def _learned_partitions(topic: str, others: dict[str, bytes]) -> dict[int, list[str]]:
    """partition -> the keys of the group's checkpoints that have learned records of it (an instance's
    `offsets`, a keyed model's `learned_through`). An unreadable document covers nothing."""
    learned: dict[int, list[str]] = {}
    for key, raw in others.items():
        try:
            document = orjson.loads(raw)
            entries = document.get("offsets") or document.get("learned_through") or []
            partitions = {e["partition"] for e in entries if e["topic"] == topic and e["offset"] > 0}
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
            continue
        for partition in partitions:
            learned.setdefault(partition, []).append(key)
    return learned


def check_missing(settings: ConsumerSettings, where: str, positions, others: dict[str, bytes]) -> None:
    """No checkpoint for this consumer: CheckpointError when a partition has records before the group's
    committed offset that none of the group's other checkpoints (`others`, key -> document) learned;
    a WARNING when they all did (this instance's model starts fresh at the committed offsets)."""
    before = {
        p: offset for p, offset in positions.committed.items() if offset > positions.ranges.get(p, (0, 0))[0]
    }  # partitions with records before the committed offset (none: nothing to have learned)
    if not before:
        return
    learned = _learned_partitions(positions.topic, others)
    unlearned = {p: offset for p, offset in before.items() if p not in learned}
    if unlearned:
        seen = f"; the group's other checkpoints ({', '.join(sorted(others)[:5])}) did not learn them" if others else ""
        raise CheckpointError(
            f"consumer group {settings.group_id!r} has committed offsets "
            f"{_committed_text(positions.topic, unlearned)} but there is no checkpoint ({where}){seen}: "
            "a fresh model would never learn the records before them"
        )
    keys = sorted({key for p in before for key in learned[p]})
    logger.warning(
        "no checkpoint %s: this instance's model starts fresh at the group's committed offsets %s; the records "
        "before them were learned by the models of %s (each instance learns its own model: to resume one of "
        "those, start with its --instance-id)",
        where,
        _committed_text(positions.topic, before),
        ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else ""),
    )


def check_resume(
    settings: ConsumerSettings,
    where: str,
    stored_settings: dict | None,
    offsets: list[PartitionOffset],
    positions,
    warm: bool = False,
    field: str = "offsets",
) -> dict[Partition, int]:
    """The offsets to resume from; CheckpointError (one line naming each problem and the field) for
    other model settings than the flags' (`differing_settings`; `warm`: the stored model is past
    its warm-up), offsets on another topic or on a partition the input does not have (the
    checkpoint belongs to another input: records would be learned twice or never), and offsets
    past a partition's end (the input was recreated, or the checkpoint is not this input's).
    An offset before a partition's first offset (records deleted by retention) is only a
    warning: the model resumes at the first record still there. Without `positions` the offsets
    are taken as they are.
    """
    problems = []
    differences = settings_differences(stored_settings, settings, warm)
    if differences:
        problems.append("written with other model settings (" + "; ".join(differences) + ")")
    resume: dict[Partition, int] = {}
    for entry in offsets:
        tp = (entry.topic, entry.partition)
        if positions is None:
            resume[tp] = entry.offset
            continue
        if entry.topic != positions.topic:
            problems.append(
                f"field {field!r}: offsets of topic {entry.topic!r}, not of the input topic {positions.topic!r} "
                f"(partition {entry.partition} offset {entry.offset})"
            )
            continue
        if entry.partition not in positions.ranges:
            problems.append(
                f"field {field!r}: offset {entry.offset} for partition {entry.topic}[{entry.partition}], "
                f"which does not exist (the topic has {len(positions.ranges)} partitions)"
            )
            continue
        first, end = positions.ranges[entry.partition]
        if entry.offset > end:
            problems.append(
                f"field {field!r}: offset {entry.offset} for {entry.topic}[{entry.partition}] is past its end {end}"
            )
            continue
        if entry.offset < first:
            logger.warning(
                "checkpoint %s: offset %d for %s[%d] is before its first offset %d (records deleted): "
                "resuming at %d; the deleted records were never learned",
                where,
                entry.offset,
                entry.topic,
                entry.partition,
                first,
                first,
            )
            resume[tp] = first
            continue
        resume[tp] = entry.offset
    if problems:
        raise CheckpointError(f"checkpoint {where}: " + "; ".join(problems))
    return resume
