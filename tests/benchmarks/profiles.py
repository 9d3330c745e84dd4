"""Profiles of the slowest paths relative to their baselines, with cProfile.

    .venv/bin/python tests/benchmarks/profiles.py failure     # in memory, step 10 fails
    .venv/bin/python tests/benchmarks/profiles.py postgres    # durable steps on PostgreSQL
    .venv/bin/python tests/benchmarks/profiles.py recovery    # recover() of interrupted sagas

Each prints the wall time per step or per saga, then the functions that took the most
time of their own. Not part of `make test` or `make bench`.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import benchsagas
import postgres

import declsaga
from declsaga import Context

HERE = Path(__file__).parent


def profiled(what: str, prepare: Callable[[], Callable[[], object]], per: int) -> None:
    """Time `prepare()()` once as it is, then once under cProfile."""
    fn = prepare()
    begin = time.perf_counter()
    fn()
    print(f"{what}: {(time.perf_counter() - begin) / per * 1e6:.1f} us (unprofiled)")
    profile = cProfile.Profile()
    profile.runcall(prepare())
    pstats.Stats(profile).sort_stats("tottime").print_stats(15)


def failure() -> None:
    def noop(ctx: Context) -> None:
        return None

    def fail(ctx: Context) -> None:
        raise RuntimeError("step 10 fails")

    names = [f"s{i}" for i in range(10)]
    actions: dict[str, Callable[[Context], None]] = dict.fromkeys(names, noop)
    actions.update({f"undo-{name}": noop for name in names})
    actions["s9"] = fail
    setup = declsaga.new(
        actions, sequence=names, compensators={name: f"undo-{name}" for name in names}
    )
    executor = declsaga.Executor(compensate_timeout=float("inf"))

    def sagas() -> None:
        for _ in range(1000):
            try:  # noqa: SIM105 - cheaper than contextlib.suppress in a timed loop
                executor.execute(setup)
            except RuntimeError:
                pass

    profiled("failure path, per step", lambda: sagas, 1000 * 10)


def on_postgres() -> None:
    with (
        postgres.fresh_schema() as schema,
        declsaga.PostgresStore(postgres.DSN, schema=schema) as store,
    ):
        executor = declsaga.Executor(store=store)

        def sagas() -> None:
            for _ in range(200):
                executor.execute(benchsagas.TEN)

        profiled("durable step on PostgreSQL", lambda: sagas, 200 * benchsagas.STEPS)


def recovery() -> None:
    with tempfile.TemporaryDirectory() as directory:
        made = iter(range(2))

        def prepare() -> Callable[[], object]:
            """2,000 sagas left by a killed process, in a file of their own."""
            path = Path(directory) / f"recovery-{next(made)}.db"
            env = {**os.environ, "PYTHONPATH": str(HERE)}
            subprocess.run(
                [sys.executable, str(HERE / "orphans.py"), f"sqlite:///{path}", "2000"],
                env=env,
                check=True,
            )
            return declsaga.Executor(store=declsaga.SQLiteStore(path)).recover

        profiled("recover(), per saga", prepare, 2000)


PATHS = {"failure": failure, "postgres": on_postgres, "recovery": recovery}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in PATHS:
        sys.exit(f"usage: profiles.py {'|'.join(PATHS)}")
    PATHS[sys.argv[1]]()
