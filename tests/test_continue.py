"""Continuing a run (issue #29): a finished run extended to more steps in its own directory
resumes from its last checkpoint, and under a constant schedule ends exactly where a run
trained to the new total in one go ends (2 ranks, the default dropout, fp32)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import orchestrate, read_metrics

pytestmark = pytest.mark.slow

COMMON = ["launcher.nproc_per_node=2", "trainer.precision=fp32", "trainer.global_batch_size=8",
          "trainer.micro_batch_size=2", "trainer.eval_generate_examples=0", "optim.lr=2e-3",
          "optim.scheduler=constant", "optim.warmup_steps=0", "logger=basic", "logger.console=false",
          "trainer.save_every=0", "data.eval_path=null"]


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_metrics(run_dir) if "loss" in m]


def test_extend_a_finished_run_equals_training_to_the_new_total(tmp_path) -> None:
    extended, one_go = tmp_path / "extended", tmp_path / "one_go"
    first = orchestrate("train", f"run.dir={extended}", "trainer.max_steps=4", *COMMON)
    assert first.returncode == 0, first.stderr[-3000:]
    # Shrinking, or changing anything else along with the length, is still a different run.
    for bad in (["trainer.max_steps=3"], ["trainer.max_steps=6", "optim.lr=1e-3"]):
        refused = orchestrate("train", f"run.dir={extended}", *COMMON, *bad)
        assert refused.returncode == 2 and "belongs to a run with a different config" in refused.stderr, bad
    more = orchestrate("train", f"run.dir={extended}", "trainer.max_steps=6", *COMMON)
    assert more.returncode == 0, more.stderr[-3000:]
    assert ("extending the run: trainer.max_steps 4 -> 6; it resumes from its latest checkpoint and "
            "the learning-rate schedule is the new total's") in more.stdout
    assert "resuming at step 4" in more.stderr
    whole = orchestrate("train", f"run.dir={one_go}", "trainer.max_steps=6", *COMMON)
    assert whole.returncode == 0, whole.stderr[-3000:]

    assert [s for s, _ in _losses(extended)] == list(range(1, 7))  # the whole history, once
    assert _losses(extended) == _losses(one_go)
    a = load_file(str(extended / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(one_go / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    summary = json.loads((extended / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["train_loss_first"] == _losses(one_go)[0][1]
