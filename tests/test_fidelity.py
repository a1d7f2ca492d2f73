"""The fidelity benchmark's machinery on a handful of steps (the benchmark itself is not a test)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow

VARIANT_NAMES = ["16-bit LoRA", "NF4 + DQ", "NF4", "FP4 + DQ"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("fidelity")
    proc = subprocess.run(
        [sys.executable, "benchmarks/fidelity.py", "--steps", "3", "--eval-every", "2", "--seeds", "7",
         "--out", str(out), "trainer.eval_generate_examples=4", "trainer.eval_max_new_tokens=4"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_table_has_every_variant_and_the_claims(bench):
    out, stdout = bench
    rows = [line for line in stdout.splitlines() if line.startswith("| ") and not line.startswith("| variant")
            and not line.startswith("| ---")]
    assert [r.split(" | ")[0].lstrip("| ") for r in rows] == VARIANT_NAMES
    assert not any("failed" in r for r in rows)
    assert (out / "table.md").read_text().strip() in stdout
    claims = [line for line in stdout.splitlines() if line.startswith("- [")]
    # NF4+DQ and NF4 vs 16-bit, FP4 vs NF4 after and before tuning, double quantization
    assert len(claims) == 5


def test_results_measure_what_each_variant_holds(bench):
    out, _ = bench
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert list(rows) == VARIANT_NAMES
    # Same LoRA everywhere; the base is what differs: 16-bit weights, 4-bit + constants.
    assert len({r["trainable_params"] for r in rows.values()}) == 1
    ref = rows["16-bit LoRA"]
    assert ref["base_bytes_per_param"] == {"bfloat16": 2.0, "float16": 2.0, "float32": 4.0}[ref["precision"]]
    assert rows["NF4"]["base_bytes_per_param"] == pytest.approx(0.5625, abs=1e-4)
    assert rows["NF4 + DQ"]["base_bytes_per_param"] == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), abs=1e-4)
    assert rows["FP4 + DQ"]["base_bytes_per_param"] == rows["NF4 + DQ"]["base_bytes_per_param"]
    for r in rows.values():
        # Eval curves from step 0 to the last step; a few steps already lower the eval loss.
        steps = sorted(int(s) for s in r["curves"]["eval_loss"])
        assert steps == [0, 2, 3]
        assert r["eval_loss"]["mean"] < r["eval_loss_before"]["mean"]
        assert r["peak_mb_per_rank"] > 0


def test_reruns_read_finished_runs_and_draw_the_curves(bench):
    out, _ = bench
    png = out / "fidelity.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/seed-7/summary.json")}
    assert len(before) == 4
    proc = subprocess.run(
        [sys.executable, "benchmarks/fidelity.py", "--steps", "3", "--eval-every", "2", "--seeds", "7",
         "--out", str(out), "--variants", "nf4-dq,nf4",
         "trainer.eval_generate_examples=4", "trainer.eval_max_new_tokens=4"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training" not in proc.stdout  # both read back, none retrained
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed-7/summary.json")} == before
    # Finished runs made with other settings are refused, never mixed into the table.
    proc = subprocess.run(
        [sys.executable, "benchmarks/fidelity.py", "--steps", "4", "--seeds", "7", "--out", str(out),
         "--variants", "nf4"], cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| NF4 | failed: " in proc.stdout and "other overrides" in proc.stdout
