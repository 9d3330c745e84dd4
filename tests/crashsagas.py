"""Sagas for the crash harness (tests/test_crash.py), and the child processes that run them.

`Steps1` ... `Steps6` have 1 to 6 steps, each with a compensator; from two steps on, steps
also make nested `ctx.run` calls (some with compensators, one that fails and is caught,
one nested two deep), sync and async actions are mixed, and one compensator makes a
nested call of its own, so that crashes also happen inside nested runs and inside the
rollback. The field `fail=True` makes the last step raise after doing its work.
`HoldsAField` adds a step that holds a field's list across a nested call.

Every action first records its side effect as one line of JSON (action, idempotency key,
pid) appended to the file `EFFECTS` with a single `write` on an `O_APPEND` descriptor:
the line is in the file the moment the call returns, whatever kills the process next.
Then it changes the fields: `trail` lists every action that ran, in order, and `total`
adds (steps, calls) or subtracts (compensators) each action's amount.

Child processes: the parent runs `python -c "import crashsagas; crashsagas.main()" REQUEST`
for one task in a fresh interpreter, or `... main() serve` for a fork server that reads
one request per line on stdin, forks a child for it, and answers with the child's exit
code (negative: the signal that ended it). Forking from a process that has imported
everything, but never opened a store, is what keeps hundreds of crash points fast; each
child is still a separate process that SIGKILL ends for real. A request names a task, its
arguments, the effects file and the file that receives the task's JSON result.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

import attrs

from declsaga import Context, Executor, Report, Saga, action, compensates, step
from declsaga.stores import SQLiteStore
from declsaga.testing import CrashingStore

EFFECTS = ""  # where `effect` appends its lines; set by the task runner
CHILD_TIMEOUT = 60  # seconds: a forked child still alive then is killed by SIGALRM

AMOUNTS = {
    "step1": 1,
    "step2": 2,
    "nested2": 20,
    "step3": 3,
    "flaky3": 30,
    "audit3": 0,
    "step4": 4,
    "nested4": 40,
    "deep4": 400,
    "step5": 5,
    "nested5a": 50,
    "nested5b": 500,
    "step6": 6,
    "nested6": 60,
    "remember": 7,
    "fetch": 70,
}


def effect(ctx: Context) -> None:
    """Record this run's side effect durably, in one write."""
    line = json.dumps({"action": ctx.action.name, "key": ctx.idempotency_key, "pid": os.getpid()})
    fd = os.open(EFFECTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


class StepFailed(Exception):
    """Raised by the last step of a saga built with fail=True."""


class Flaky(Exception):
    """Raised by the nested action flaky3, which step3 catches."""


class Steps1(Saga):
    fail: bool = False
    trail: list[str] = attrs.field(factory=list)
    total: int = 0

    def work(self, ctx: Context) -> None:
        """An action's effect and field changes."""
        effect(ctx)
        self.trail.append(ctx.action.name)
        self.total += AMOUNTS[ctx.action.name]

    def undo(self, ctx: Context, target: str) -> None:
        """A compensator's effect and field changes."""
        effect(ctx)
        self.trail.append(ctx.action.name)
        self.total -= AMOUNTS[target]

    def end_step(self, ctx: Context) -> None:
        if self.fail and ctx.action.name == self.sequence()[-1]:
            raise StepFailed(f"{ctx.action.name} failed")

    @step(order=1)
    def step1(self, ctx: Context) -> None:
        self.work(ctx)
        self.end_step(ctx)

    @compensates("step1")
    def undo_step1(self, ctx: Context) -> None:
        self.undo(ctx, "step1")


class Steps2(Steps1):
    @step(order=2)
    async def step2(self, ctx: Context) -> None:
        self.work(ctx)
        # Not `self.trail.append(await ...)`: see HoldsAField.
        result = await ctx.run_async("nested2")  # a sync call from an async step
        self.trail.append(result)
        self.end_step(ctx)

    @compensates("step2")
    async def undo_step2(self, ctx: Context) -> None:
        self.undo(ctx, "step2")

    @action
    def nested2(self, ctx: Context) -> str:
        self.work(ctx)
        return "nested2 returned"

    @compensates("nested2")
    def undo_nested2(self, ctx: Context) -> None:
        self.undo(ctx, "nested2")


class Steps3(Steps2):
    @step(order=3)
    def step3(self, ctx: Context) -> None:
        self.work(ctx)
        try:
            ctx.run("flaky3")
        except Flaky as error:  # a failed nested run: never compensated, never run again
            self.trail.append(f"caught {error}")
        self.end_step(ctx)

    @compensates("step3")
    def undo_step3(self, ctx: Context) -> None:
        self.undo(ctx, "step3")
        ctx.run("audit3")  # a nested run inside the rollback

    @action
    def flaky3(self, ctx: Context) -> None:
        self.work(ctx)
        raise Flaky("flaky3 failed")

    @compensates("flaky3")
    def undo_flaky3(self, ctx: Context) -> None:
        self.undo(ctx, "flaky3")  # must never run: its run failed

    @action
    def audit3(self, ctx: Context) -> None:
        self.work(ctx)


class Steps4(Steps3):
    @step(order=4)
    def step4(self, ctx: Context) -> None:
        self.work(ctx)
        result = ctx.run("nested4")  # an async call from a sync step
        self.trail.append(result)
        self.end_step(ctx)

    @compensates("step4")
    async def undo_step4(self, ctx: Context) -> None:
        self.undo(ctx, "step4")

    @action
    async def nested4(self, ctx: Context) -> str:
        self.work(ctx)
        deep = await ctx.run_async("deep4")  # two deep
        return f"nested4 got {deep}"

    @compensates("nested4")
    async def undo_nested4(self, ctx: Context) -> None:
        self.undo(ctx, "nested4")

    @action
    def deep4(self, ctx: Context) -> str:
        self.work(ctx)
        return "deep4 returned"

    @compensates("deep4")
    def undo_deep4(self, ctx: Context) -> None:
        self.undo(ctx, "deep4")


class Steps5(Steps4):
    @step(order=5)
    async def step5(self, ctx: Context) -> None:
        self.work(ctx)
        first = await ctx.run_async("nested5a")
        second = await ctx.run_async("nested5b")
        self.trail.append(f"{first} then {second}")
        self.end_step(ctx)

    @compensates("step5")
    def undo_step5(self, ctx: Context) -> None:
        self.undo(ctx, "step5")

    @action
    async def nested5a(self, ctx: Context) -> str:
        self.work(ctx)
        return "5a"

    @compensates("nested5a")
    def undo_nested5a(self, ctx: Context) -> None:
        self.undo(ctx, "nested5a")

    @action
    def nested5b(self, ctx: Context) -> str:
        self.work(ctx)
        return "5b"

    @compensates("nested5b")
    async def undo_nested5b(self, ctx: Context) -> None:
        self.undo(ctx, "nested5b")


class Steps6(Steps5):
    @step(order=6)
    def step6(self, ctx: Context) -> None:
        self.work(ctx)
        ctx.run("nested6")  # a call without a compensator: skipped by the rollback
        self.end_step(ctx)

    @compensates("step6")
    async def undo_step6(self, ctx: Context) -> None:
        self.undo(ctx, "step6")

    @action
    def nested6(self, ctx: Context) -> None:
        self.work(ctx)


class HoldsAField(Steps1):
    """A step that holds a field's list across a nested call, as plain Python invites:
    `self.trail.append(ctx.run(...))` evaluates `self.trail` before the call runs."""

    @step(order=2)
    def remember(self, ctx: Context) -> None:
        self.work(ctx)
        self.trail.append(ctx.run("fetch"))
        self.end_step(ctx)

    @compensates("remember")
    def forget(self, ctx: Context) -> None:
        self.undo(ctx, "remember")

    @action
    def fetch(self, ctx: Context) -> str:
        self.work(ctx)
        return "fetch returned"


SAGAS: dict[str, type[Steps1]] = {
    cls.__name__: cls for cls in (Steps1, Steps2, Steps3, Steps4, Steps5, Steps6, HoldsAField)
}


# -- what a task reports ------------------------------------------------------------------


def describe_error(error: BaseException | None) -> dict[str, str] | None:
    if error is None:
        return None
    cls = type(error)
    return {"type": f"{cls.__module__}.{cls.__qualname__}", "message": str(error)}


def describe_runs(report: Report | None) -> list[list[str | None]] | None:
    """Each run of a report: action, error type (or None), compensating action (or None)."""
    if report is None:
        return None
    return [
        [
            run.action,
            None if run.error is None else type(run.error).__qualname__,
            None if run.compensated_by is None else run.compensated_by.action,
        ]
        for run in report.runs
    ]


def fields_of(saga: Steps1) -> dict[str, Any]:
    return {"fail": saga.fail, "trail": list(saga.trail), "total": saga.total}


# -- tasks --------------------------------------------------------------------------------


def crashing(db: str, kill_at: int | None, when: str) -> CrashingStore:
    """The store of a task: SQLite, SIGKILLing this process at append `kill_at` if given.

    synchronous=NORMAL: a killed process loses nothing that reached the OS, whatever the
    setting (only a power loss tells them apart), and skipping the fsync of every commit
    keeps hundreds of crash points fast."""
    sqlite = SQLiteStore(db, synchronous="NORMAL")
    return CrashingStore(sqlite, kill_at=kill_at, when="after" if when == "after" else "before")


def run_saga(
    *,
    db: str,
    saga_id: str,
    saga: str,
    fail: bool,
    driver: str,
    kill_at: int | None = None,
    when: str = "before",
) -> dict[str, Any]:
    """Execute (or resume, or answer for) a saga."""
    store = crashing(db, kill_at, when)
    reports: list[Report] = []
    executor = Executor(store=store, reporter=reports.append)
    instance = SAGAS[saga](fail=fail)
    report = error = None
    try:
        if driver == "async":
            report = asyncio.run(executor.execute_async(instance, saga_id=saga_id))
        else:
            report = executor.execute(instance, saga_id=saga_id)
    except Exception as raised:
        error = raised
    if report is None and reports:
        report = reports[-1]
    return {
        "appends": store.appends,
        "error": describe_error(error),
        "runs": describe_runs(report),
        "reported": len(reports),
        "fields": fields_of(instance),
    }


def recover(
    *,
    db: str,
    driver: str,
    kill_at: int | None = None,
    when: str = "before",
    barrier: bool = False,
) -> dict[str, Any]:
    """Recover every unfinished saga of `db`."""
    store = crashing(db, kill_at, when)
    reports: list[Report] = []
    executor = Executor(store=store, reporter=reports.append)
    if barrier:
        # Wait for the parent's go, so that two recovering processes really overlap.
        print("ready", flush=True)
        sys.stdin.readline()
    recovered = asyncio.run(executor.recover_async()) if driver == "async" else executor.recover()
    return {
        "appends": store.appends,
        "pid": os.getpid(),
        "reported": len(reports),
        "recovered": [
            {
                "saga_id": item.saga_id,
                "name": item.name,
                "status": item.status,
                "error": describe_error(item.error),
                "refused": item.refused,
                "runs": describe_runs(item.report),
            }
            for item in recovered
        ],
    }


TASKS: dict[str, Callable[..., dict[str, Any]]] = {"run": run_saga, "recover": recover}


def perform(request: dict[str, Any]) -> None:
    """Run one task and write its result, as JSON, to the request's "out" file."""
    global EFFECTS  # a child process runs exactly one task
    EFFECTS = request["effects"]
    result = TASKS[request["task"]](**request["args"])
    partial = request["out"] + ".partial"
    with open(partial, "w") as file:
        json.dump(result, file)
    os.replace(partial, request["out"])


def _forked(request: dict[str, Any]) -> None:
    """The forked child of the server: run the request, then leave without cleanup."""
    code = 0
    try:
        signal.alarm(CHILD_TIMEOUT)
        # The server's stdin and stdout carry its protocol: hands off. Output goes to the
        # request's own file, so that a failure shows what this child printed.
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        err = os.open(request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(err, 1)
        os.dup2(err, 2)
        perform(request)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    """The fork server: one request per line in, one exit code per line out."""
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _forked(request)
        _, status = os.waitpid(pid, 0)
        sys.stdout.write(f"{os.waitstatus_to_exitcode(status)}\n")
        sys.stdout.flush()


def main() -> None:
    if sys.argv[1:] == ["serve"]:
        serve()
    else:
        perform(json.loads(sys.argv[1]))
