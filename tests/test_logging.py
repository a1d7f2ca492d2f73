"""Weights & Biases (offline), metrics.jsonl and secrets, on a real 2-rank run."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

import orchestrator
from conftest import FAST, orchestrate, read_metrics, rewind
from wandb_reader import read_config, read_history, run_ids

pytestmark = pytest.mark.slow

SECRET = "local-" + "0123456789abcdef" * 2 + "deadbeef"


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("wandb") / "run"
    proc = orchestrate(
        "train", f"run.dir={run_dir}", "launcher.nproc_per_node=2", "logger=wandb",
        "logger.wandb.mode=offline", "logger.wandb.group=g1", "trainer.save_every=6", *FAST,
        env={"WANDB_API_KEY": SECRET, "HF_TOKEN": "hf_" + SECRET},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc.stdout + proc.stderr


def _run_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


def _close(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def test_wandb_has_every_logged_value(wandb_run) -> None:
    run_dir, _ = wandb_run
    files = _run_files(run_dir)
    assert len(files) == 1  # exactly one W&B run: only rank 0 logs
    by_step: dict[int, dict] = {}
    for row in read_history(files[0]):
        by_step.setdefault(row["_step"], {}).update(row)
    local = read_metrics(run_dir)
    assert {m["step"] for m in local} == set(by_step)
    for record in local:
        row = by_step[record["step"]]
        for key, value in record.items():
            if key == "step":
                continue
            if isinstance(value, list):
                for i, v in enumerate(value):
                    assert _close(row[f"{key}/rank{i}"], v), (key, i)
            else:
                assert _close(row[key], value), (record["step"], key, row.get(key), value)
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "non_pad_share", "step_time_s"):
        assert key in by_step[1]
    assert "peak_memory_mb/rank1" in by_step[1] and "tokens_per_s_per_rank/rank1" in by_step[1]
    assert "eval_loss" in by_step[0] and "eval_accuracy" in by_step[12]


def test_wandb_run_config_records_provenance(wandb_run) -> None:
    run_dir, _ = wandb_run
    config = read_config(_run_files(run_dir)[0])
    assert config["strategy"]["name"] == "ddp"
    assert "logger.wandb.group=g1" in config["overrides"]
    assert config["hardware"]["world_size"] == 2 and config["hardware"]["cpu"]
    assert "torch" in config["versions"] and "peft" in config["versions"]
    assert config["git_commit"] and config["version"] == orchestrator.__version__


def test_secrets_never_written(wandb_run) -> None:
    run_dir, output = wandb_run
    assert SECRET not in output
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_resumed_run_continues_same_wandb_run(wandb_run, tmp_path) -> None:
    import shutil

    src, _ = wandb_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    rewind(run_dir, 6)
    proc = orchestrate(
        "train", f"run.dir={run_dir}", "launcher.nproc_per_node=2", "logger=wandb",
        "logger.wandb.mode=offline", "logger.wandb.group=g1", "trainer.save_every=6", *FAST,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = _run_files(run_dir)
    assert len(files) == 2
    ids = set().union(*(run_ids(f) for f in files))
    assert ids == {(run_dir / "wandb_run_id").read_text().strip()}
    resumed_steps = {row["_step"] for row in read_history(files[-1])}
    assert min(resumed_steps) == 7 and max(resumed_steps) == 12
