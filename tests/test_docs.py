"""The README's code blocks and the examples run, so the documentation cannot drift."""

from __future__ import annotations

import re
import runpy
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
    assert "Broken" in printed
    assert "two" in printed
    assert "1" in printed


def test_place_order_example(capsys: pytest.CaptureFixture[str]) -> None:
    module = runpy.run_path(str(ROOT / "examples" / "place_order.py"), run_name="example")
    ledger_ok = module["place"]("o-1", carrier_up=True)
    assert ledger_ok == [
        "inventory: reserved 1 x book-42",
        "payments: charged 2500 cents",
        "shipping: shipped o-1",
    ]
    ledger_failed = module["place"]("o-2", carrier_up=False)
    assert ledger_failed == [
        "inventory: reserved 1 x book-42",
        "payments: charged 2500 cents",
        "payments: refunded ch-1",
        "inventory: released res-1",
    ]
    out = capsys.readouterr().out
    run_lines = [line.split()[0:2] for line in out.splitlines() if line.startswith("   ")]
    assert ["ship", "run"] in run_lines
    assert ["refund_card", "compensation"] in run_lines
    assert "-> rolled back after CarrierUnavailable" in out


def test_demo_runs_as_a_script() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "place_order.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("   ")]
    # The failing order: steps, the failed ship, then the compensations newest first.
    failed_order = lines[lines.index("reserve_stock", 3) :]
    assert failed_order[:6] == [
        "reserve_stock",
        "audit",
        "charge_card",
        "ship",
        "refund_card",
        "release_stock",
    ]
