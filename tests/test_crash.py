"""Crash recovery with real processes, killed by SIGKILL at every transition.

For each saga of `crashsagas` (1 to 6 steps, succeeding or failing at its last step) and
each driver (`execute`/`recover` or their asyncio forms), a child process first runs the
saga uninterrupted: the reference. Its number of store appends M is the number of crash
points: for every k < M, a fresh child runs the saga on a fresh SQLite file and is
SIGKILLed at its k-th append, either before the commit reaches the store or just after;
a fresh child then recovers it (with `recover()`, with the other driver's recovery, or by
executing the same saga id again, in rotation), and the outcome must be the reference's:

- the same final status, error, report runs, fields and journal (timestamps aside);
- a transition is committed before anything acts on it: every side effect of a killed
  process belongs to a run whose start it had committed;
- a run recorded as finished never runs again; only a run in flight at a crash runs
  again, once per process at most, with the same idempotency key;
- every side effect happened, in the reference's order once repeats are dropped, so
  compensations ran once each, in reverse completion order (checked on the reference).

Children are forked from small fork servers (`crashsagas.serve`) that import everything
once and never open a store; a few crash points and the two-recoverers test use fresh
interpreters instead. The journal entries' layout (kind, run, action, role, target,
fields) is read directly: it is how the harness knows which runs were in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import itertools
import json
import os
import queue
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import crashsagas
import pytest

from declsaga import Executor
from declsaga.stores import MemoryStore, SQLiteStore
from declsaga.testing import CrashingStore

TESTS = Path(__file__).resolve().parent
CHILD = "import crashsagas; crashsagas.main()"
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(
        [str(TESTS), str(TESTS.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    ),
}
WORKERS = 4  # fork servers, and threads driving them: 2 cores, but children wait on I/O
TIMEOUT = 60  # seconds: the bound for any child, enforced by SIGALRM or subprocess
KILLED = -signal.SIGKILL
WHENS = ("before", "after")
DRIVERS = ("sync", "async")


# -- child processes ------------------------------------------------------------------------


class ForkServer:
    """A `crashsagas.serve` process: forks one child per request."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", CHILD, "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=ENV,
            cwd=TESTS,
            text=True,
        )

    def run(self, request: dict[str, Any]) -> int:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        assert answer, f"the fork server died (exit code {self.process.poll()})"
        return int(answer)

    def close(self) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()  # the server's loop ends
        self.process.wait(TIMEOUT)
        self.process.stdout.close()


class Children:
    """Runs tasks in child processes: forked by a free server, or in a fresh interpreter."""

    def __init__(self, workers: int) -> None:
        self.servers: queue.Queue[ForkServer] = queue.Queue()
        for _ in range(workers):
            self.servers.put(ForkServer())
        self.workers = workers
        self._names = itertools.count()

    def close(self) -> None:
        while not self.servers.empty():
            self.servers.get().close()

    def request(self, workdir: Path, task: str, **args: Any) -> dict[str, Any]:
        name = f"{task}-{next(self._names)}"
        return {
            "task": task,
            "args": args,
            "effects": str(workdir / "effects.jsonl"),
            "out": str(workdir / f"{name}.json"),
            "err": str(workdir / f"{name}.err"),
        }

    def run(self, request: dict[str, Any], *, fresh: bool = False) -> int:
        """The child's exit code (negative: the signal that ended it)."""
        if fresh:
            with open(request["err"], "w") as err:
                done = subprocess.run(
                    [sys.executable, "-c", CHILD, json.dumps(request)],
                    env=ENV,
                    cwd=TESTS,
                    stdin=subprocess.DEVNULL,
                    stdout=err,
                    stderr=err,
                    timeout=TIMEOUT,
                    check=False,
                )
            return done.returncode
        server = self.servers.get()
        try:
            return server.run(request)
        finally:
            self.servers.put(server)

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(fn, items))


def result_of(request: dict[str, Any], code: int) -> dict[str, Any]:
    """The JSON result of a child that ended normally; its stderr otherwise."""
    err = Path(request["err"])
    errors = err.read_text() if err.exists() else ""
    assert code == 0, f"the {request['task']} child exited with {code}:\n{errors}"
    result: dict[str, Any] = json.loads(Path(request["out"]).read_text())
    return result


@pytest.fixture(scope="module")
def children() -> Iterator[Children]:
    pool = Children(WORKERS)
    try:
        yield pool
    finally:
        pool.close()


# -- reading the store and the effects -------------------------------------------------------


@attrs.frozen
class Snapshot:
    """A saga as stored at one moment, with what the harness needs to know about runs."""

    commits: int
    status: str | None  # None: not stored at all
    entries: tuple[dict[str, Any], ...]
    fields: Any

    @property
    def started(self) -> dict[int, str]:
        """Each started run's action."""
        return {e["run"]: e["action"] for e in self.entries if e["kind"] == "run_started"}

    @property
    def finished(self) -> set[int]:
        """The runs recorded as succeeded or failed."""
        return {e["run"] for e in self.entries if e["kind"] in ("run_succeeded", "run_failed")}

    @property
    def journal(self) -> list[dict[str, Any]]:
        """The entries without their timestamps: equal for equal executions."""
        return [{k: v for k, v in e.items() if k != "at"} for e in self.entries]


def assert_same_journal(got: Snapshot, want: Snapshot) -> None:
    """The journals are equal but for timestamps; else a diff, one entry per line."""
    if got.journal != want.journal:
        diff = difflib.unified_diff(
            [json.dumps(entry)[:300] for entry in want.journal],
            [json.dumps(entry)[:300] for entry in got.journal],
            "uninterrupted",
            "recovered",
            lineterm="",
            n=1,
        )
        raise AssertionError("the journal is not the uninterrupted run's:\n" + "\n".join(diff))


def snapshot(db: Path, saga_id: str) -> Snapshot:
    with SQLiteStore(db) as store:
        stored = store.load(saga_id)
        unfinished = store.unfinished()
    if stored is None:
        return Snapshot(0, None, (), None)
    assert (saga_id in unfinished) == (stored.status in ("running", "compensating"))
    fields = stored.header.fields
    for entry in stored.entries:
        fields = entry.get("fields", fields)
    return Snapshot(stored.seq, stored.status, stored.entries, fields)


@attrs.frozen
class Effect:
    action: str
    key: str
    pid: int

    @property
    def run(self) -> int:
        return int(self.key.rsplit("/", 1)[1])

    @property
    def saga_id(self) -> str:
        return self.key.rsplit("/", 1)[0]


def effects(workdir: Path) -> list[Effect]:
    """The effects recorded in `workdir` so far, in order."""
    path = workdir / "effects.jsonl"
    return effects_at(path) if path.exists() else []


def effects_at(path: Path) -> list[Effect]:
    return [Effect(**json.loads(line)) for line in path.read_text().splitlines()]


# -- the reference: one uninterrupted run ------------------------------------------------------


@attrs.frozen
class Reference:
    saga: str  # a class name in crashsagas.SAGAS
    fail: bool
    driver: str
    saga_id: str
    appends: int  # the number of crash points
    result: dict[str, Any]  # what the child's execute returned or raised
    final: Snapshot
    effects: tuple[tuple[str, str], ...]  # (action, idempotency key), in order

    @property
    def name(self) -> str:
        return f"crashsagas.{self.saga}"

    @property
    def status(self) -> str:
        return "compensated" if self.fail else "completed"


def check_reference(ref: Reference, tmp: Path) -> None:
    """The uninterrupted durable run does what the saga means, and what a run without a
    store does: the harness compares everything else with it."""
    final = ref.final
    assert final.status == ref.status
    assert final.entries[-1]["kind"] == "saga_ended"
    assert final.entries[-1]["status"] == ref.status
    assert ref.result["reported"] == 1
    if ref.fail:
        failed = f"{crashsagas.SAGAS[ref.saga]().sequence()[-1]} failed"
        assert ref.result["error"] == {"type": "crashsagas.StepFailed", "message": failed}
    else:
        assert ref.result["error"] is None
    # Every run's effect once, under its own key, in the order the journal started them.
    started = final.started
    assert len(set(ref.effects)) == len(ref.effects)
    assert [key for _, key in ref.effects] == [f"{ref.saga_id}/{run}" for run in started]
    assert [action for action, _ in ref.effects] == list(started.values())
    assert final.finished == set(started)
    # The rollback compensated each succeeded run that has a compensator, newest first.
    roles = {e["run"]: e["role"] for e in final.entries if e["kind"] == "run_started"}
    succeeded = [e["run"] for e in final.entries if e["kind"] == "run_succeeded"]
    compensable = [
        run
        for run in succeeded
        if roles[run] != "compensation"
        and crashsagas.SAGAS[ref.saga]().compensator(started[run]) is not None
    ]
    targets = [e["target"] for e in final.entries if e.get("role") == "compensation"]
    if ref.fail:
        assert targets == compensable[::-1]
        assert "undo_flaky3" not in started.values()  # a failed run is never compensated
    else:
        assert targets == []
    # The same saga without a store: the same runs, effects and fields.
    crashsagas.EFFECTS = str(tmp / "memory-effects.jsonl")
    saga = crashsagas.SAGAS[ref.saga](fail=ref.fail)
    executor = Executor()
    try:
        if ref.driver == "async":
            report = asyncio.run(executor.execute_async(saga))
        else:
            report = executor.execute(saga)
        assert not ref.fail
    except crashsagas.StepFailed:
        assert ref.fail
    else:
        assert crashsagas.describe_runs(report) == ref.result["runs"]
    assert crashsagas.fields_of(saga) == ref.result["fields"] == final.fields
    in_memory = [effect.action for effect in effects_at(tmp / "memory-effects.jsonl")]
    assert in_memory == [action for action, _ in ref.effects]


_references: dict[tuple[str, bool, str], Reference] = {}


def reference(
    children: Children, tmp_factory: pytest.TempPathFactory, saga: str, fail: bool, driver: str
) -> Reference:
    """The uninterrupted run of a saga, made once per module."""
    key = (saga, fail, driver)
    if key not in _references:
        workdir = tmp_factory.mktemp(f"reference-{saga}-{fail}-{driver}")
        saga_id = f"{saga.lower()}-{'fails' if fail else 'succeeds'}"
        request = children.request(
            workdir,
            "run",
            db=str(workdir / "sagas.db"),
            saga_id=saga_id,
            saga=saga,
            fail=fail,
            driver=driver,
        )
        result = result_of(request, children.run(request))
        ref = Reference(
            saga,
            fail,
            driver,
            saga_id,
            result["appends"],
            result,
            snapshot(workdir / "sagas.db", saga_id),
            tuple((e.action, e.key) for e in effects(workdir)),
        )
        check_reference(ref, workdir)
        _references[key] = ref
    return _references[key]


# -- one crash scenario ------------------------------------------------------------------------


@attrs.frozen
class Phase:
    """One child process: "run" executes the saga, "recover" calls recover(); killed at
    its `kill_at`-th append (`when` it lands), or left to finish when kill_at is None."""

    task: str
    driver: str
    kill_at: int | None = None
    when: str = "before"

    def __str__(self) -> str:
        what = "execute" if self.task == "run" else "recover"
        what += "_async" if self.driver == "async" else ""
        if self.kill_at is None:
            return what
        return f"{what} killed {self.when} append {self.kill_at}"


@attrs.frozen
class Played:
    phases: list[Phase]  # as played: `until_done` repeats the last one
    result: dict[str, Any]  # what the last child returned
    snapshots: list[Snapshot]  # the saga as stored after each killed phase


def play(
    children: Children,
    workdir: Path,
    ref: Reference,
    phases: Sequence[Phase],
    *,
    fresh: bool = False,
    until_done: bool = False,
) -> Played:
    """Run the phases, one child each, and check everything against the reference.

    With `until_done`, the last phase repeats, still killed, until a child survives it."""
    db = workdir / "sagas.db"
    saga_id = ref.saga_id
    snapshots: list[Snapshot] = []  # after each killed phase
    segments: list[list[Effect]] = []  # the effects of each phase
    played: list[Phase] = []
    seen = 0
    before = snapshot(db, saga_id)
    index = 0
    while True:
        phase = phases[min(index, len(phases) - 1)]
        index += 1
        last = index >= len(phases) and not until_done
        args: dict[str, Any] = {"db": str(db), "driver": phase.driver}
        if phase.task == "run":
            args.update(saga_id=saga_id, saga=ref.saga, fail=ref.fail)
        if phase.kill_at is not None:
            args.update(kill_at=phase.kill_at, when=phase.when)
        request = children.request(workdir, phase.task, **args)
        code = children.run(request, fresh=fresh)
        played.append(phase)
        now = effects(workdir)
        segment, seen = now[seen:], len(now)
        segments.append(segment)
        assert len({effect.pid for effect in segment}) <= 1, "one process per phase"
        if phase.kill_at is None or (until_done and code != KILLED):
            result = result_of(request, code)
            break
        assert code == KILLED, f"{phase}: the child exited with {code}, not by SIGKILL"
        after = snapshot(db, saga_id)
        # The store got exactly the commits made before the kill, and nothing else.
        landed = phase.kill_at + (1 if phase.when == "after" else 0)
        assert after.commits == before.commits + landed, f"{phase}: {after.commits} commits"
        assert after.entries[: len(before.entries)] == before.entries
        # Committed before acted on: every effect belongs to a run whose start is stored.
        for effect in segment:
            assert effect.run in after.started, f"{phase}: {effect} ran before its start landed"
        snapshots.append(after)
        before = after
        if last:
            raise AssertionError("the last phase must not be killed")

    final = snapshot(db, saga_id)
    if final.status is None:
        # Killed before the first commit landed: nothing started, nothing to recover.
        assert all(not segment for segment in segments)
        assert result.get("recovered", []) == []
        more = play(children, workdir, ref, [Phase("run", ref.driver)], fresh=fresh)
        return Played(played + more.phases, more.result, snapshots)

    # The end the uninterrupted run reached.
    assert final.status == ref.status
    assert final.fields == ref.final.fields
    assert_same_journal(final, ref.final)

    # Side effects: the reference's, in its order, once repeats are dropped; a run repeats
    # only if it was in flight at a crash, and at most once per process.
    everything = [effect for segment in segments for effect in segment]
    assert list(dict.fromkeys((e.action, e.key) for e in everything)) == list(ref.effects)
    for number, segment in enumerate(segments):
        counts = Counter((e.action, e.key) for e in segment)
        assert max(counts.values(), default=0) <= 1, f"phase {number}: {counts}"
        for effect in segment:
            for earlier, stored in enumerate(snapshots[:number]):
                assert effect.run not in stored.finished, (
                    f"{effect.action} (run {effect.run}) ran again in phase {number}, but "
                    f"phase {earlier} had recorded its outcome"
                )

    # What the last child said.
    finished_before = before.status in ("completed", "compensated", "failed")
    last_phase = played[-1]
    if last_phase.task == "recover":
        if finished_before:
            assert result["recovered"] == []
            assert result["reported"] == 0
        else:
            assert result["recovered"] == [
                {
                    "saga_id": saga_id,
                    "name": ref.name,
                    "status": ref.status,
                    "error": ref.result["error"],
                    "refused": None,
                    "runs": ref.result["runs"],
                }
            ]
            assert result["reported"] == 1
    else:
        assert result["error"] == ref.result["error"]
        assert result["fields"] == ref.result["fields"]
        assert result["reported"] == (0 if finished_before else 1)
        if result["reported"] or ref.result["error"] is None:
            assert result["runs"] == ref.result["runs"]
    return Played(played, result, snapshots)


def recovery(driver: str, number: int) -> Phase:
    """How crash point `number` is recovered: in rotation, recover() with the same driver,
    with the other one, or by executing the same saga id again."""
    choice = number % 3
    if choice == 0:
        return Phase("recover", driver)
    if choice == 1:
        return Phase("recover", "async" if driver == "sync" else "sync")
    return Phase("run", driver)


def run_all(
    children: Children, tmp: Path, ref: Reference, scenarios: Sequence[Sequence[Phase]]
) -> None:
    """Play every scenario in its own directory, in parallel; report every failure."""

    def one(item: tuple[int, Sequence[Phase]]) -> str | None:
        number, phases = item
        workdir = tmp / f"scenario-{number}"
        workdir.mkdir()
        try:
            play(children, workdir, ref, phases)
        except AssertionError as error:
            label = " -> ".join(str(phase) for phase in phases)
            return f"{label}:\n    {error}".replace("\n", "\n    ")
        return None

    failures = [f for f in children.map(one, list(enumerate(scenarios))) if f is not None]
    if failures:
        shown = "\n".join(failures[:8])
        pytest.fail(
            f"{ref.saga}(fail={ref.fail}) with {ref.driver}: {len(failures)} of "
            f"{len(scenarios)} crash scenarios failed:\n{shown}",
            pytrace=False,
        )


# -- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("fail", [False, True], ids=["succeeds", "fails"])
@pytest.mark.parametrize("n", range(1, 7))
def test_a_crash_at_every_commit_is_recovered(
    *,
    children: Children,
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
    n: int,
    fail: bool,
    driver: str,
) -> None:
    """The issue's harness: every crash point of every saga, recovered in a fresh process."""
    ref = reference(children, tmp_path_factory, f"Steps{n}", fail, driver)
    run_all(children, tmp_path, ref, every_crash_point(ref))


def every_crash_point(ref: Reference) -> list[list[Phase]]:
    """Killed before and after each append of the reference run, then recovered."""
    points = [(k, when) for k in range(ref.appends) for when in WHENS]
    return [
        [Phase("run", ref.driver, k, when), recovery(ref.driver, number)]
        for number, (k, when) in enumerate(points)
    ]


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_field_held_across_a_replayed_call(
    children: Children, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, driver: str
) -> None:
    """`self.trail.append(ctx.run("fetch"))` evaluates `self.trail` first: when the step
    runs again after a crash and its call is replayed, the append must still reach the
    saga's field, as it did in the uninterrupted run."""
    ref = reference(children, tmp_path_factory, "HoldsAField", False, driver)
    run_all(children, tmp_path, ref, every_crash_point(ref))


def test_crash_points_in_fresh_interpreters(
    children: Children, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """A few crash points without the fork server: every child a new interpreter."""
    ref = reference(children, tmp_path_factory, "Steps3", True, "async")
    for number, (k, when) in enumerate([(1, "after"), (ref.appends // 2, "before")]):
        workdir = tmp_path / f"scenario-{number}"
        workdir.mkdir()
        phases = [Phase("run", "async", k, when), Phase("recover", "sync")]
        play(children, workdir, ref, phases, fresh=True)


@pytest.mark.parametrize("status", ["running", "compensating"])
def test_a_crash_during_recovery_is_recovered(
    children: Children, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, status: str
) -> None:
    """Killed going forward or in the rollback, then killed again at every commit of the
    recovery, then recovered."""
    ref = reference(children, tmp_path_factory, "Steps6", True, "sync")
    first = Phase("run", "sync", 8 if status == "running" else ref.appends - 6, "after")
    counting = tmp_path / "counting"
    counting.mkdir()
    played = play(children, counting, ref, [first, Phase("recover", "sync")])
    assert [snapshot.status for snapshot in played.snapshots] == [status]
    recovery_appends = played.result["appends"]
    assert recovery_appends > 1
    scenarios = [
        [first, Phase("recover", DRIVERS[(j + i) % 2], j, when), Phase("recover", "sync")]
        for j in range(recovery_appends)
        for i, when in enumerate(WHENS)
    ]
    run_all(children, tmp_path, ref, scenarios)


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("fail", [False, True], ids=["succeeds", "fails"])
def test_a_process_that_dies_after_every_commit(
    *,
    children: Children,
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
    fail: bool,
    driver: str,
) -> None:
    """Each process lands one commit and dies; the next one recovers: every transition
    is taken by a process that did not start the saga."""
    ref = reference(children, tmp_path_factory, "Steps6", fail, driver)
    played = play(
        children,
        tmp_path,
        ref,
        [Phase("run", driver, 0, "after"), Phase("recover", driver, 0, "after")],
        until_done=True,
    )
    # One process per commit, then one that finds nothing left to do.
    assert len(played.phases) == ref.appends + 1


@pytest.mark.parametrize("drivers", [("sync", "sync"), ("sync", "async")], ids="+".join)
def test_two_processes_recover_one_file_at_once(
    children: Children,
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
    drivers: tuple[str, str],
) -> None:
    """40 sagas, each killed somewhere; two fresh processes call recover() together.
    Each saga is driven by exactly one of them, and ends as uninterrupted."""
    db = tmp_path / "sagas.db"
    sagas: list[tuple[str, Reference]] = []
    for i in range(40):
        ref = reference(children, tmp_path_factory, f"Steps{1 + i % 6}", i // 6 % 2 == 1, "sync")
        sagas.append((f"many-{i}-{ref.saga_id}", ref))

    def crash(item: tuple[int, tuple[str, Reference]]) -> None:
        i, (saga_id, ref) = item
        # Crash points after the first commit landed and before the last one did.
        points = [(k, w) for k in range(ref.appends) for w in WHENS]
        k, when = points[1:-1][i * 7 % (len(points) - 2)]
        request = children.request(
            tmp_path,
            "run",
            db=str(db),
            saga_id=saga_id,
            saga=ref.saga,
            fail=ref.fail,
            driver="sync",
            kill_at=k,
            when=when,
        )
        assert children.run(request) == KILLED

    children.map(crash, list(enumerate(sagas)))
    with SQLiteStore(db) as store:
        assert sorted(store.unfinished()) == sorted(saga_id for saga_id, _ in sagas)
    crashed = len(effects(tmp_path))
    at_crash = {saga_id: snapshot(db, saga_id) for saga_id, _ in sagas}

    processes = []
    with contextlib.ExitStack() as stack:
        for driver in drivers:
            request = children.request(tmp_path, "recover", db=str(db), driver=driver, barrier=True)
            process = subprocess.Popen(
                [sys.executable, "-c", CHILD, json.dumps(request)],
                env=ENV,
                cwd=TESTS,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stack.enter_context(open(request["err"], "w")),
                text=True,
            )
            stack.enter_context(process)  # closes its pipes and waits for it
            processes.append((process, request))
        for process, _ in processes:  # both have imported everything and opened the store
            assert process.stdout is not None
            assert process.stdout.readline() == "ready\n"
        for process, _ in processes:  # then both start at once
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.close()
        for process, _ in processes:
            process.wait(TIMEOUT)
    results = [result_of(request, process.returncode) for process, request in processes]

    driven_by: dict[str, int] = {}
    for result in results:
        for item in result["recovered"]:
            assert item["saga_id"] not in driven_by, f"{item['saga_id']} recovered twice"
            driven_by[item["saga_id"]] = result["pid"]
        assert result["reported"] == len(result["recovered"])
        assert result["recovered"], "both processes took part in the recovery"
    assert sorted(driven_by) == sorted(saga_id for saga_id, _ in sagas)

    by_saga: dict[str, list[Effect]] = {}
    for effect in effects(tmp_path):
        by_saga.setdefault(effect.saga_id, []).append(effect)
    recovering = {effect.pid for effect in effects(tmp_path)[crashed:]}
    for saga_id, ref in sagas:
        final = snapshot(db, saga_id)
        assert final.status == ref.status
        assert final.fields == ref.final.fields
        assert_same_journal(final, ref.final)
        # Its recovery's effects: all by the process that recovered it, none for a run
        # recorded as finished at the crash, and with the crash's, the reference's.
        after = [effect for effect in by_saga[saga_id] if effect.pid in recovering]
        assert {effect.pid for effect in after} <= {driven_by[saga_id]}
        assert not {effect.run for effect in after} & at_crash[saga_id].finished
        runs = [(effect.action, effect.run) for effect in by_saga[saga_id]]
        assert list(dict.fromkeys(runs)) == [
            (action, int(key.rsplit("/", 1)[1])) for action, key in ref.effects
        ]
        recovered = [
            item for result in results for item in result["recovered"] if item["saga_id"] == saga_id
        ]
        assert recovered == [
            {
                "saga_id": saga_id,
                "name": ref.name,
                "status": ref.status,
                "error": ref.result["error"],
                "refused": None,
                "runs": ref.result["runs"],
            }
        ]


# -- the crash helper itself -----------------------------------------------------------------


def test_crashing_store_counts_the_commits_of_an_execution(tmp_path: Path) -> None:
    crashsagas.EFFECTS = str(tmp_path / "effects.jsonl")
    with MemoryStore() as inner:
        store = CrashingStore(inner)
        with pytest.raises(crashsagas.StepFailed):
            Executor(store=store).execute(crashsagas.Steps3(fail=True), saga_id="s")
        stored = inner.load("s")
        assert stored is not None
        assert (stored.status, stored.seq) == ("compensated", store.appends)
        assert store.appends == 11


def test_crashing_store_counts_and_validates(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "sagas.db") as inner:
        store = CrashingStore(inner)
        assert store.appends == 0
        assert store.pragmas() == inner.pragmas()  # other methods pass through
        assert repr(store) == f"CrashingStore({inner!r}, kill_at=None, when='before')"
    with pytest.raises(ValueError, match=r"^kill_at must be None or an int >= 0, got -1\.$"):
        CrashingStore(inner, kill_at=-1)
    with pytest.raises(ValueError, match=r"^when must be 'before' or 'after', got 'later'\.$"):
        CrashingStore(inner, kill_at=0, when="later")  # type: ignore[arg-type]
