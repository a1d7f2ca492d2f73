"""The planner plans the data the run will see, and ``auto`` micro-batch size / checkpointing:
resolved once by the launcher, frozen into config.yaml, reused on resume. One short real run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from conftest import orchestrate

from launch.prepare import UsageError, build_config
from orchestrator import plan as P
from orchestrator.data import StepSampler, collate, prepare
from orchestrator.model import load_tokenizer

GIB = 2**30


def _rows(path: Path, n: int, words: int) -> str:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"instruction": "Echo the words.",
                                "output": " ".join(f"w{i + k}" for k in range(words))}) + "\n")
    return str(path)


def _prepared(tmp_path: Path, name: str, words: int, extra: tuple[str, ...] = ()):
    cfg = build_config(["data=jsonl", f"data.path={_rows(tmp_path / f'{name}.jsonl', 64, words)}",
                        f"data.cache_dir={tmp_path / 'cache'}", "data.max_seq_len=128",
                        "trainer.max_steps=6", "trainer.global_batch_size=16",
                        "trainer.micro_batch_size=4", "plan.device=cpu", *extra])
    return cfg, prepare(cfg.data, load_tokenizer(cfg.model))


def test_planner_reads_the_widest_micro_batch_the_run_forms(tmp_path):
    short_cfg, short = _prepared(tmp_path, "short", words=4)  # ~50 of 128 tokens
    full_cfg, full = _prepared(tmp_path, "full", words=60)  # cut to max_seq_len
    lengths = P.data_lengths(short_cfg, short.train, short.eval)
    # Exactly the widest batch the sampler and collate form over the run's 6 steps.
    samplers = [StepSampler(len(short.train), 16, 4, 2, rank, short_cfg.trainer.seed) for rank in (0, 1)]
    widths = [collate([short.train[i] for i in mb], 0)["input_ids"].shape[1]
              for step in range(6) for sampler in samplers for mb in sampler.micro_batches(step)]
    assert lengths.train == max(widths) < 128 and lengths.eval == 0
    assert P.data_lengths(full_cfg, full.train).train == 128

    def train_items(cfg, data):
        return P.phase_total(P.plan_for_run(cfg, 2, "cpu", 2, data=data), "train")

    short_plan = train_items(short_cfg, lengths)
    assert short_plan < train_items(short_cfg, None)  # planned at max_seq_len without the data
    assert train_items(full_cfg, P.data_lengths(full_cfg, full.train)) == train_items(full_cfg, None)
    plan = P.plan_for_run(short_cfg, 2, "cpu", 2, data=lengths)
    assert plan.setup.train_width == lengths.train
    assert f"seq {lengths.train} (the data: longest row drawn" in P.format_plan(plan)
    # Packing fills rows towards the token budget: planned at the budget.
    packed = replace(short_cfg, data=replace(short_cfg.data, packing=True))
    assert P.data_lengths(packed, short.train).train == 128


def test_auto_order_and_refusal():
    # Checkpointing off before on; within each, the larger micro-batch first.
    assert P.candidates(8, "auto", "auto") == [(8, False), (4, False), (2, False), (1, False),
                                               (8, True), (4, True), (2, True), (1, True)]
    assert P.candidates(8, 2, "auto") == [(2, False), (2, True)]
    assert P.candidates(6, "auto", True) == [(6, True), (3, True), (2, True), (1, True)]
    cfg = build_config(["trainer.micro_batch_size=auto", "model.gradient_checkpointing=auto",
                        "plan.device=cpu", "plan.host_memory_gb=0.1"])
    with pytest.raises(P.PlanError, match=r"micro_batch_size and model.gradient_checkpointing=auto: "
                                          r"no setting fits 0.05 GiB per rank \(plan.host_memory_gb=0.1 GiB / 2 rank"):
        P.resolve_auto(cfg, 2)
    for bad, msg in (("trainer.micro_batch_size=abc", "an integer > 0 or auto"),
                     ("trainer.micro_batch_size=0", "an integer > 0 or auto"),
                     ("model.gradient_checkpointing=sometimes", "true, false, auto")):
        with pytest.raises(UsageError, match=msg):
            build_config([bad])


def _budget_between(overrides: list[str], world: int, big: int, small: int) -> float:
    """A host budget (GiB) that fits micro-batch ``small`` but not ``big`` (checkpointing off)."""
    cfg = build_config(overrides)
    peaks = {}
    for m in (big, small):
        cfg.trainer.micro_batch_size, cfg.model.gradient_checkpointing = m, False
        peaks[m] = P.plan_for_run(cfg, world, "cpu", data=P.data_lengths(
            cfg, *(lambda s: (s.train, s.eval))(prepare(cfg.data, load_tokenizer(cfg.model))))).peak_bytes
    assert peaks[small] < peaks[big]
    return (peaks[small] + peaks[big]) / 2 / GIB


def test_auto_is_resolved_once_frozen_and_reused_on_resume(tmp_path):
    run_dir = tmp_path / "run"
    common = ["trainer.micro_batch_size=auto", "model.gradient_checkpointing=auto",
              "trainer.max_steps=2", "trainer.eval_generate_examples=0", "logger.console=false",
              "data.eval_path=null"]
    local = ["launcher.nproc_per_node=1", *common]
    budget = _budget_between(local, 1, big=16, small=8)
    proc = orchestrate("train", f"run.dir={run_dir}", f"plan.host_memory_gb={budget:.4f}", *local)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "auto: trainer.micro_batch_size=8 model.gradient_checkpointing=false: planned peak" in proc.stdout
    frozen = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert frozen["trainer"]["micro_batch_size"] == 8 and frozen["model"]["gradient_checkpointing"] is False
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2  # the ranks trained with it

    # Resumed with the same overrides under a budget where planning again would choose
    # differently: the frozen values are kept (the launcher does not re-plan; a dry-run Slurm
    # launch stands in for the relaunch, rendering the job without running it).
    tighter = _budget_between(local, 1, big=8, small=4)
    # plan.enforce=false: the frozen micro-batch no longer fits the tighter budget, which the
    # launcher's memory check would refuse; what is tested here is that auto is not re-planned.
    tight = ["launcher=slurm", "launcher.dry_run=true", f"plan.host_memory_gb={tighter:.4f}",
             "plan.enforce=false", *common]
    fresh = orchestrate("train", f"run.dir={tmp_path / 'fresh'}", *tight)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert yaml.safe_load((tmp_path / "fresh" / "config.yaml").read_text())["trainer"]["micro_batch_size"] == 4
    again = orchestrate("train", f"run.dir={run_dir}", *tight)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "auto: resuming with trainer.micro_batch_size=8 model.gradient_checkpointing=false" in again.stderr
    frozen = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert frozen["trainer"]["micro_batch_size"] == 8 and frozen["model"]["gradient_checkpointing"] is False
