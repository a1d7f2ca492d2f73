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


@pytest.mark.parametrize("strategy", [["strategy=ddp"], ["strategy=fsdp", "strategy.shard_base=true"]])
def test_start_from_an_adapter_begins_where_it_ended(two_rank_run, tmp_path, strategy) -> None:
    """A new run from the shared run's adapter: its evaluation before training is the parent's
    after training (same eval set, precision and batching), under DDP and FSDP; its LoRA shape
    is the adapter's; the parent is untouched; a contradicting setting is refused before launch."""
    from conftest import FAST

    parent = json.loads((two_rank_run / "summary.json").read_text())
    adapter = two_rank_run / "adapter"
    before = {f.name: f.read_bytes() for f in adapter.iterdir()}
    child = tmp_path / "child"
    overrides = [f"run.dir={child}", "launcher.nproc_per_node=2", *FAST, "trainer.max_steps=2",
                 "trainer.eval_generate_examples=0", f"lora.init_from={adapter}", *strategy]
    proc = orchestrate("train", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((child / "summary.json").read_text())
    assert summary["init_from"] == str(adapter)
    assert summary["eval_loss_before"] == pytest.approx(parent["eval_loss_after"], rel=1e-4)
    assert {f.name: f.read_bytes() for f in adapter.iterdir()} == before  # the parent's adapter
    if strategy == ["strategy=ddp"]:  # the launcher's refusal does not depend on the strategy: once
        refused = orchestrate("train", f"run.dir={tmp_path / 'refused'}", *overrides[1:], "lora.r=8")
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
        assert "lora.r=8 contradicts the adapter's 16" in refused.stderr


def test_adapter_of_another_base_is_refused_before_launch(two_rank_run, tmp_path) -> None:
    from launch.model_checks import check_family
    from launch.prepare import UsageError, build_config
    from orchestrator.tiny.families import build

    other = build("gpt_neox", tmp_path / "neox")
    cfg = build_config([f"model.path={other}", f"lora.init_from={two_rank_run / 'adapter'}"])
    with pytest.raises(UsageError, match=r"adapts model\.layers\.0\..*which GPTNeoXForCausalLM .* does "
                                         r"not have; was it trained for another base\?"):
        check_family(cfg)
    with pytest.raises(UsageError, match="no adapter_config.json there"):
        check_family(build_config([f"lora.init_from={tmp_path}"]))
