"""The benchmark suite runs end to end with tiny numbers (``bench/run.py --quick``).

No timing is asserted here -- timing belongs to the benchmark itself. This only
checks that the fake upstream, NexLM and the load generator start, talk to each
other over /ws, /sse, /v1/chat/completions and the direct connection, and that the report has every row.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "bench" / "run.py"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the bench reads /proc")


def _row_ids() -> list[str]:
    spec = importlib.util.spec_from_file_location("bench_run", RUN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.ROW_IDS


def test_quick_bench_writes_every_row(tmp_path):
    out = tmp_path / "results.md"
    raw = tmp_path / "results.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--out", str(out), "--json", str(raw)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, f"bench failed:\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    report = out.read_text()
    assert "CPU:" in report and "Python" in report and "aiohttp" in report  # the machine it ran on
    table = [line for line in report.splitlines() if line.startswith(("| B", "| V1"))]
    ids = [line.split("|")[1].strip() for line in table]
    assert ids == _row_ids(), report
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[3], line  # a measured value in every row
        assert cells[3] != "not run", line
        assert cells[-1] in ("PASS", "FAIL"), line  # --quick runs every phase, so each row has a verdict
    # the same table is printed
    assert all(f"| {i} |" in proc.stdout for i in ids)


def _stores_row_ids() -> list[str]:
    spec = importlib.util.spec_from_file_location("bench_run", RUN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.STORES_ROW_IDS


def test_quick_stores_phase_writes_every_row(tmp_path):
    """``--only STORES`` (issue 13): memory, sqlite and a redis-server started by the bench, one column each;
    a dated section is added to an existing report and the rest is left. No timing is asserted."""
    out = tmp_path / "results.md"
    out.write_text("# an earlier report\n\nkept as it is\n")
    proc = subprocess.run([sys.executable, str(RUN), "--quick", "--only", "STORES", "--out", str(out)],
                          cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"bench failed:\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    report = out.read_text()
    assert report.startswith("# an earlier report\n\nkept as it is\n")
    assert "<!-- stores: begin" in report and "<!-- stores: end -->" in report
    table = [line for line in report.splitlines() if line.startswith("| S-")]
    assert [line.split("|")[1].strip() for line in table] == _stores_row_ids(), report
    for line in table:
        rid, what, memory, sqlite, redis, target, errors, result = [c.strip() for c in line.strip("|").split("|")]
        assert memory and redis and memory != "—" and redis != "—", line  # a figure for memory and redis in every row
        if rid != "S-fanout":
            assert sqlite and sqlite != "—", line
            assert result == "figure", line  # the issue gives no target here: plain figures
        else:
            assert result in ("PASS", "FAIL") and "×" in target, line  # the 1.5× CPU target
    assert "| S-fanout |" in proc.stdout
