"""scripts/soak.py, the long-run memory check, runs and reports; its 500-step records are in docs/benchmarks/."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_short_soak_writes_every_steps_rss_and_stays_flat(tmp_path):
    out = tmp_path / "soak"
    result = subprocess.run([sys.executable, "scripts/soak.py", "--steps", "40", "--algorithm", "grpo", "--out",
                             str(out), "--run-dir", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.with_suffix(".json").read_text())
    assert [s["step"] for s in record["samples"]] == list(range(1, 41))
    assert all(s["rss_bytes"] > 0 for s in record["samples"])
    assert abs(record["growth_percent"]) < 10  # a leak of a rollout per step on tiny-llama already shows here
    assert "growth" in out.with_suffix(".md").read_text()
