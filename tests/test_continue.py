"""Continuing a run (issue #29): a finished run extended to more steps in its own directory
resumes from its last checkpoint, and under a constant schedule ends exactly where a run
trained to the new total in one go ends (2 ranks, the default dropout, fp32); a fork of one of
its checkpoints goes on exactly as the parent would have, or from its adapter alone with a
fresh optimizer, and the parent is never written."""

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
    # Shrinking, or changing anything else along with the length, is still a different run
    # (the launcher's check, in-process: the same function a launch calls before any rank).
    from launch.prepare import UsageError, build_config, prepare_run_dir

    for bad in (["trainer.max_steps=3"], ["trainer.max_steps=6", "optim.lr=1e-3"]):
        overrides = [f"run.dir={extended}", *COMMON, *bad]
        with pytest.raises(UsageError, match="belongs to a run with a different config"):
            prepare_run_dir(build_config(overrides), overrides)
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
    _fork(extended, one_go, tmp_path)


def _tree(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _fork(parent: Path, one_go: Path, tmp_path: Path) -> None:
    """Forks of ``parent`` (trained 4 steps, then extended to 6; ``one_go`` trained 6 at once)."""
    import numpy as np
    import torch

    untouched = _tree(parent)
    at4 = parent / "checkpoints" / "step-00000004"
    # With its optimizer, step, data position and RNG, the DDP parent's checkpoint read under
    # FSDP: step 5 (the parent's adapter on the parent's next batch, the same dropout) is
    # exact; step 6 (after an update from the restored Adam moments) is as close as FSDP and
    # DDP ever are, where fresh moments would be ~1e-3 off.
    same = orchestrate("train", f"run.dir={tmp_path / 'same'}", f"run.fork_from={at4}",
                       "trainer.max_steps=6", *COMMON, "strategy=fsdp")
    assert same.returncode == 0, same.stderr[-3000:]
    assert f"forked from {at4} at its step 4, with its optimizer, step and data position" in same.stderr
    (s5, l5), (s6, l6) = _losses(tmp_path / "same")
    assert (s5, l5) == _losses(one_go)[4] and s6 == 6 and l6 == pytest.approx(_losses(one_go)[5][1], rel=1e-6)
    a = load_file(str(tmp_path / "same" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(one_go / "adapter" / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in b)
    summary = json.loads((tmp_path / "same" / "summary.json").read_text())
    assert summary["forked_from"] == {"checkpoint": str(at4), "run": str(parent), "step": 4, "optimizer": True}

    # Its adapter alone (the run directory names its latest, step 6), another lr: step 1 is a
    # fresh Adam's first step, which moves every weight by the lr (m/sqrt(v) = g/|g|).
    fresh = orchestrate("train", f"run.dir={tmp_path / 'fresh'}", f"run.fork_from={parent}",
                        "run.fork_optimizer=false", "trainer.max_steps=1", *COMMON, "optim.lr=1e-3")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert [(m["step"], m["lr"]) for m in read_metrics(tmp_path / "fresh") if "lr" in m] == [(1, 1e-3)]
    before = load_file(str(parent / "adapter" / "adapter_model.safetensors"))
    after = load_file(str(tmp_path / "fresh" / "adapter" / "adapter_model.safetensors"))
    moved = np.concatenate([(after[k] - before[k]).abs().flatten().numpy() for k in before])
    assert np.median(moved) == pytest.approx(1e-3, rel=1e-3), np.median(moved)
    assert json.loads((tmp_path / "fresh" / "summary.json").read_text())["forked_from"]["step"] == 6

    assert _tree(parent) == untouched  # read, never written
    _fork_refusals(parent, tmp_path)


def _fork_refusals(parent: Path, tmp_path: Path) -> None:
    """What a fork cannot take, refused before launch with one line (in-process)."""
    from launch.fork import check_fork
    from launch.prepare import UsageError, build_config

    at4 = parent / "checkpoints" / "step-00000004"
    child = f"run.dir={tmp_path / 'refused'}"
    cases = {
        f"{tmp_path / 'nowhere'} does not exist": [f"run.fork_from={tmp_path / 'nowhere'}"],
        "step-00000005 does not exist; complete checkpoints beside it: step-00000004, step-00000006":
            [f"run.fork_from={parent / 'checkpoints' / 'step-00000005'}"],
        "neither a complete checkpoint .* nor a run directory": [f"run.fork_from={parent / 'adapter'}"],
        "is a checkpoint of run.dir itself": [f"run.fork_from={at4}", f"run.dir={parent / 'x' / '..'}"],
        "lora.r=8 contradicts the parent's 16": [f"run.fork_from={at4}", "lora.r=8"],
        "continues the parent's data order, but data.max_seq_len, trainer.global_batch_size differ":
            [f"run.fork_from={at4}", "data.max_seq_len=64", "trainer.global_batch_size=16"],
        "is at step 4 and trainer.max_steps=4: nothing to train": [f"run.fork_from={at4}", "trainer.max_steps=4"],
        "written by strategy=fsdp or ddp, whose checkpoints strategy=deepspeed cannot read":
            [f"run.fork_from={at4}", "strategy=deepspeed"],
    }
    common = [c for c in COMMON if not c.startswith("launcher.")]
    for message, overrides in cases.items():
        cfg = build_config([child, *common, "trainer.max_steps=8", *overrides])
        with pytest.raises(UsageError, match=message):
            check_fork(cfg)
    from orchestrator.tiny.families import build

    other = build("gpt_neox", tmp_path / "neox")
    cfg = build_config([child, *common, "trainer.max_steps=8", f"run.fork_from={at4}", f"model.path={other}"])
    with pytest.raises(UsageError, match=r"was trained on model.path=.*tiny-llama, not on model.path=.*neox "
                                         r"\(their config.json differ\); a fork keeps its base"):
        check_fork(cfg)
    cfg = build_config([child, *common, "trainer.max_steps=8", f"run.fork_from={parent}", "lora.alpha=64",
                        "run.fork_optimizer=false", "data.max_seq_len=64"])
    with pytest.raises(UsageError, match="lora.alpha=64 contradicts the parent's 32"):
        check_fork(cfg)  # another data order is fine without the optimizer; another shape is not


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
        from launch.model_checks import check_family
        from launch.prepare import UsageError, build_config

        with pytest.raises(UsageError, match="^lora.r=8 contradicts the adapter's 16 at lora.init_from="):
            check_family(build_config([f"run.dir={tmp_path / 'refused'}", *overrides[1:], "lora.r=8"]))


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


def test_a_loaded_optimizer_takes_this_runs_hyperparameters_at_the_resumed_step() -> None:
    """A fork with another optim.* (or an extension to another total) loads an optimizer state
    saved under the parent's values; from the first step on the child's must hold."""
    import torch

    from orchestrator.config import OptimConfig
    from orchestrator.optim import build_optimizer, build_scheduler, continue_schedule, lr_factor

    w = torch.nn.Parameter(torch.ones(3))
    parent_cfg = OptimConfig(lr=2e-3, scheduler="cosine", warmup_steps=2, weight_decay=0.0)
    opt = build_optimizer([w], parent_cfg)
    sched = build_scheduler(opt, parent_cfg, total_steps=10)
    for _ in range(4):
        w.grad = torch.ones(3)
        opt.step()
        sched.step()
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()

    child_cfg = OptimConfig(lr=1e-3, scheduler="linear", warmup_steps=2, weight_decay=0.1, betas=[0.8, 0.9])
    child_opt = build_optimizer([w], child_cfg)
    child_sched = build_scheduler(child_opt, child_cfg, total_steps=20)
    child_opt.load_state_dict(saved_opt)
    child_sched.load_state_dict(saved_sched)
    continue_schedule(child_opt, child_sched, child_cfg, 20, 4)
    group = child_opt.param_groups[0]
    assert group["lr"] == child_cfg.lr * lr_factor(4, child_cfg, 20) and group["betas"] == (0.8, 0.9)
    assert group["weight_decay"] == 0.1 and child_opt.state[w]["exp_avg"].abs().sum() > 0  # moments kept
    child_sched.step()
    assert child_sched.last_epoch == 5 and child_opt.param_groups[0]["lr"] == pytest.approx(
        child_cfg.lr * lr_factor(5, child_cfg, 20), rel=1e-12)
