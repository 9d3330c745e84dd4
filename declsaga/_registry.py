"""Saga definitions by name, so that a stored saga can be found again after a crash.

A definition is a `Saga` subclass or a named `new()` setup. Its fingerprint covers what
recovery depends on (the sequence, each action's compensator, the set of action names),
not the code and not the fields. A definition with parallel step groups adds them (a
journal with several steps in flight relies on them); one without has the fingerprint it
had before groups existed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

__all__ = ["Definition", "lookup", "register"]


@attrs.frozen
class Definition:
    """The shape of a saga definition that its stored journals rely on."""

    sequence: tuple[str, ...]
    compensators: tuple[tuple[str, str], ...]  # sorted (action, compensator) pairs
    actions: tuple[str, ...]  # sorted
    groups: tuple[tuple[str, ...], ...] = ()  # parallel step groups, in sequence order

    @classmethod
    def of(
        cls,
        sequence: Iterable[str],
        compensators: Mapping[str, str],
        actions: Iterable[str],
        groups: Iterable[tuple[str, ...]] = (),
    ) -> Definition:
        return cls(
            tuple(sequence),
            tuple(sorted((name, comp) for name, comp in compensators.items() if comp)),
            tuple(sorted(actions)),
            tuple(tuple(group) for group in groups),
        )

    def as_json(self) -> dict[str, Any]:
        shape: dict[str, Any] = {
            "sequence": list(self.sequence),
            "compensators": dict(self.compensators),
            "actions": list(self.actions),
        }
        if self.groups:  # absent without groups: such fingerprints stay what they were
            shape["groups"] = [list(group) for group in self.groups]
        return shape

    @functools.cached_property
    def fingerprint(self) -> str:
        # Cached: a durable executor records it with every saga it starts.
        canonical = json.dumps(self.as_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def differences(self, stored: Mapping[str, Any]) -> str:
        """What changed between a stored definition (as_json) and this one, in words."""
        now = self.as_json()
        changes = []
        if list(stored.get("sequence", [])) != now["sequence"]:
            changes.append(f"sequence {stored.get('sequence')} became {now['sequence']}")
        old_comps = dict(stored.get("compensators", {}))
        if old_comps != now["compensators"]:
            changes.append(f"compensators {old_comps} became {now['compensators']}")
        old_actions, new_actions = set(stored.get("actions", [])), set(now["actions"])
        if removed := sorted(old_actions - new_actions):
            changes.append(f"actions removed: {', '.join(removed)}")
        if added := sorted(new_actions - old_actions):
            changes.append(f"actions added: {', '.join(added)}")
        old_groups = [list(group) for group in stored.get("groups", [])]
        if old_groups != now.get("groups", []):
            changes.append(f"parallel groups {old_groups} became {now.get('groups', [])}")
        return "; ".join(changes) or "the stored definition is unreadable"


_lock = threading.Lock()
_definitions: dict[str, tuple[object, str]] = {}  # name -> (definition, identity)


def register(name: str, definition: object, identity: str, *, explicit: bool) -> str | None:
    """Register `definition` under `name`; return why not, if another one holds the name.

    `identity` tells a re-run of the same definition (a reload, a class statement run
    again in a test) from a different one: the first silently replaces the old entry. A
    default name is always replaced: it can only clash with a re-run.
    """
    with _lock:
        current = _definitions.get(name)
        if explicit and current is not None and current[1] != identity:
            return f"the name {name!r} is already registered by {current[1]}"
        _definitions[name] = (definition, identity)
        return None


def lookup(name: str) -> object | None:
    """The definition registered under `name`, or None."""
    with _lock:
        found = _definitions.get(name)
    return None if found is None else found[0]
