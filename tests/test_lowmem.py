"""Low-memory loading for a sharded 4-bit base: only rank 0 loads and quantizes, however long that
takes, the other ranks receive their shards, and training is the same as when every rank loads
the whole model.

The model is a ~95M-parameter random Llama (190 MB in bf16) so that the base, not the ~450 MB of
imported libraries, decides the difference in peak RSS at start-up.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import orchestrate, read_metrics

pytestmark = pytest.mark.slow


def _run(run_dir: Path, model: Path, low_memory: bool, *extra: str, env: dict | None = None) -> dict:
    proc = orchestrate(
        "train", f"run.dir={run_dir}", f"model.path={model}", "launcher.nproc_per_node=2",
        "strategy=fsdp", "strategy.shard_base=true", f"strategy.low_memory_load={low_memory}",
        "data.eval_path=null", "data.max_seq_len=128", "trainer.max_steps=2",
        "trainer.global_batch_size=2", "trainer.micro_batch_size=1", "trainer.precision=fp32",
        "lora.dropout=0.0", "logger=basic", "logger.console=false", *extra, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((run_dir / "summary.json").read_text())


def test_only_rank0_holds_the_whole_model_at_startup(tmp_path) -> None:
    from orchestrator.tiny.random_llama import build

    model = build(tmp_path / "model", hidden=1024, intermediate=2816, layers=8)
    file_mb = (model / "model.safetensors").stat().st_size / 2**20

    # Rank 0's loading outlasts the collective timeout (12 s more than it takes, against 10 s):
    # the other rank waits on rank 0's heartbeat instead of timing out in a collective, as the
    # ranks of a 70B base would while rank 0 quantizes it for an hour.
    low = _run(tmp_path / "low", model, True, "launcher.dist_timeout_s=10",
               env={"ORCHESTRATOR_TEST_FAULT": "slow_load:12:0"})
    full = _run(tmp_path / "full", model, low_memory=False)

    # Same model, same shards, same steps: the loading route changes nothing numerically.
    losses = lambda d: [m["loss"] for m in read_metrics(d) if "loss" in m]  # noqa: E731
    assert losses(tmp_path / "low") == losses(tmp_path / "full")
    assert low["holdings_bytes"] == full["holdings_bytes"]

    # Rank 1 never materialises the whole model: its start-up peak is well below the same
    # rank's when every rank loads, and below rank 0's, which did the loading for everyone.
    rank0_low, rank1_low = low["load_peak_memory_mb"]
    rank1_full = full["load_peak_memory_mb"][1]
    assert rank1_low < rank1_full - 0.5 * file_mb, (low["load_peak_memory_mb"], full["load_peak_memory_mb"])
    assert rank1_low < rank0_low - 0.5 * file_mb, low["load_peak_memory_mb"]
