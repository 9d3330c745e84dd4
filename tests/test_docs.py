"""The README's code blocks and the examples run, so the documentation cannot drift."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.M | re.S)


def test_readme_blocks_run_in_order(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = python_blocks(ROOT / "README.md")
    assert len(blocks) >= 5
    namespace: dict[str, object] = {"__name__": "readme"}
    for number, block in enumerate(blocks, 1):
        code = compile(block, f"README.md block {number}", "exec")
        exec(code, namespace)
    # The DefinitionError example prints its message: check it names class, method, value.
    printed = capsys.readouterr().out
    assert printed == (
        "Saga Broken: steps one and two both have order 1; give each step its own order.\n"
    )


def demo_output() -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "place_order.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def section(output: str, title: str) -> list[str]:
    """The lines of one `== ...` section of the demo's output."""
    lines = output.split("\n== ")
    found = [part for part in lines if part.startswith(title)]
    assert len(found) == 1, (title, output)
    return found[0].splitlines()[1:]


def services_said(lines: list[str]) -> list[tuple[str, str]]:
    """(pid, what) for the lines the in-memory services printed."""
    said = []
    for line in lines:
        if line.startswith("   [pid "):
            pid, _, what = line.removeprefix("   [pid ").partition("] ")
            said.append((pid, what))
    return said


def test_demo_completes_rolls_back_and_recovers_after_sigkill() -> None:
    output = demo_output()

    ok = section(output, "order o-1")
    assert [what for _, what in services_said(ok)] == [
        "inventory: reserved 1 x book-42",
        "payments: charged 2500 cents",
        "shipping: calling the carrier for o-1 (key order-o-1/3)",
        "shipping: shipped o-1",
    ]
    assert ok[-1] == "-> completed: tracking number trk-7"

    rolled_back = section(output, "order o-2")
    assert [what for _, what in services_said(rolled_back)] == [
        "inventory: reserved 1 x book-42",
        "payments: charged 2500 cents",
        "shipping: calling the carrier for o-2 (key order-o-2/3)",
        "payments: refunded ch-1",
        "inventory: released res-1",
    ]
    runs = [
        line.split()[:2] for line in rolled_back if line.startswith("   ") and "[pid" not in line
    ]
    assert runs == [
        ["reserve_stock", "run"],
        ["audit", "run"],
        ["charge_card", "run"],
        ["ship", "run"],
        ["refund_card", "compensation"],
        ["release_stock", "compensation"],
    ]

    crashed = section(output, "order o-3")
    said = services_said(crashed)
    assert [what for _, what in said] == [
        "inventory: reserved 1 x book-42",
        "payments: charged 2500 cents",
        "shipping: calling the carrier for o-3 (key order-o-3/3)",
    ]
    assert any("killed with SIGKILL in the middle of 'ship'" in line for line in crashed)
    assert "   journal of order-o-3 (status running):" in crashed
    assert crashed[-1].split() == ["run_started", "run=3", "action=ship", "role=step"]

    recovered = section(output, "a new process recovers")
    said_after = services_said(recovered)
    # Only the step in flight runs again, in another process, with the same key.
    assert [what for _, what in said_after] == [
        "shipping: calling the carrier for o-3 (key order-o-3/3)",
        "shipping: shipped o-3",
    ]
    assert {pid for pid, _ in said_after}.isdisjoint({pid for pid, _ in said})
    assert "-> recovered order-o-3: completed (completed)" in recovered
    assert "   journal of order-o-3 (status completed):" in recovered
    assert recovered[-2].split() == ["run_succeeded", "run=3", "tracking='trk-7'"]
    assert recovered[-1].split() == ["saga_ended", "status=completed"]
