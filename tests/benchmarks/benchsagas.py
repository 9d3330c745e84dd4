"""The saga the store and worker benchmarks run: ten no-op steps, importable by workers."""

from __future__ import annotations

import declsaga
from declsaga import Context

STEPS = 10


def noop(ctx: Context) -> None:
    return None


NAMES = [f"s{i}" for i in range(STEPS)]
TEN = declsaga.new(dict.fromkeys(NAMES, noop), sequence=NAMES, name="bench.ten")
