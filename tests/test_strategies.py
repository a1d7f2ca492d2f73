"""Every strategy on 2 CPU ranks: it trains, matches DDP's losses, holds what it should, exports
the same adapter, and resumes exactly from a mid-run checkpoint in a new process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import orchestrate, read_metrics, rewind

pytestmark = pytest.mark.slow

COMMON = [
    "launcher.nproc_per_node=2", "trainer.precision=fp32", "lora.dropout=0.0",
    "trainer.max_steps=6", "trainer.save_every=3", "trainer.keep_last_n=0",
    "trainer.global_batch_size=8", "trainer.micro_batch_size=2", "trainer.eval_generate_examples=0",
    "optim.lr=2e-3", "optim.warmup_steps=1", "logger=basic", "logger.console=false", "trainer.seed=11",
]

STRATEGIES = {
    "ddp": ["strategy=ddp"],
    "fsdp": ["strategy=fsdp"],
    "fsdp_shard_base": ["strategy=fsdp", "strategy.shard_base=true"],
    "zero2": ["strategy=deepspeed", "strategy.zero_stage=2"],
    "zero3": ["strategy=deepspeed", "strategy.zero_stage=3"],
}
# FSDP2 takes DDP's steps to 1e-6 (relative; often bit for bit); DeepSpeed reduces in another order.
TOLERANCE = {"ddp": 0.0, "fsdp": 1e-6, "fsdp_shard_base": 1e-6, "zero2": 1e-5, "zero3": 1e-5}


def _losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir) if "loss" in m]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("strategies")
    out = {}
    for name, overrides in STRATEGIES.items():
        run_dir = root / name
        # DDP, the reference of every comparison, runs as users run it: counting its traffic
        # replaces its C++ all-reduce with a Python hook (commcount.py), so that is a run of its
        # own (the resume below).
        env = {} if name == "ddp" else {"ORCHESTRATOR_COMM_LOG": str(run_dir / "comm")}
        proc = orchestrate("train", f"run.dir={run_dir}", *COMMON, *overrides, env=env)
        assert proc.returncode == 0, f"{name}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        out[name] = run_dir
    return out


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_trains_and_matches_ddp(runs, name) -> None:
    losses = _losses(runs[name])
    assert len(losses) == 6 and losses[-1] < losses[0]
    summary = json.loads((runs[name] / "summary.json").read_text())
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert summary["forward_dtype"] == summary["precision"] == "float32"  # the adapters' matmuls
    ref = _losses(runs["ddp"])
    for a, b in zip(losses, ref):
        assert abs(a - b) <= TOLERANCE[name] * max(1.0, abs(b)), (name, losses, ref)


def test_one_rank_batch_2b_equals_two_ranks_batch_b(runs, tmp_path) -> None:
    """fp32, no dropout: the global batch and its token-mean loss are the same on 1 rank with the
    whole batch in one micro-batch as on DDP's 2 ranks with 2 micro-batches each. The 1-rank run
    trains in this process (a 1-rank run needs no process group)."""
    from launch.prepare import build_config, prepare_run_dir
    from orchestrator.train import run

    mine = ["launcher.nproc_per_node=1", "trainer.micro_batch_size=8", f"run.dir={tmp_path / 'one'}"]
    overrides = [*(a for a in COMMON if a.split("=")[0] not in {m.split("=")[0] for m in mine}),
                 *STRATEGIES["ddp"], *mine]
    cfg = build_config(overrides)
    run(cfg, prepare_run_dir(cfg, overrides))
    one, two = _losses(tmp_path / "one"), _losses(runs["ddp"])
    assert len(one) == len(two) == 6 and one[-1] < one[0]
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (one, two)


def test_what_each_rank_holds(runs) -> None:
    held = {n: json.loads((d / "summary.json").read_text())["holdings_bytes"] for n, d in runs.items()}
    ddp = held["ddp"][0]
    for name, per_rank in held.items():
        assert len(per_rank) == 2
    # Base replicated: every rank holds all of it.
    for name in ("ddp", "fsdp", "zero2"):
        assert all(h["base_bytes"] == ddp["base_bytes"] for h in held[name]), name
    # Base sharded: each rank holds half (the tiny model's tensors split evenly in two).
    for name in ("fsdp_shard_base", "zero3"):
        assert sum(h["base_bytes"] for h in held[name]) == pytest.approx(ddp["base_bytes"], rel=0.01), name
        assert all(h["base_bytes"] == pytest.approx(ddp["base_bytes"] / 2, rel=0.02) for h in held[name]), name
    # Adapter optimizer state: whole on every DDP rank, split in two by the sharding strategies.
    for name in ("fsdp", "fsdp_shard_base", "zero2", "zero3"):
        assert all(h["optimizer_bytes"] == pytest.approx(ddp["optimizer_bytes"] / 2, rel=0.02) for h in held[name]), name
    for name in ("fsdp", "fsdp_shard_base", "zero3"):
        assert all(h["adapter_bytes"] == pytest.approx(ddp["adapter_bytes"] / 2, rel=0.02) for h in held[name]), name


def _adapter_logits(adapter_dir: Path, batch) -> torch.Tensor:
    from peft import PeftModel

    from orchestrator.config import ASSETS_DIR, ModelConfig, QuantConfig
    from orchestrator.model import load_base

    base = load_base(ModelConfig(path=str(ASSETS_DIR / "tiny-llama")), QuantConfig(), torch.float32,
                     torch.device("cpu"))
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_exported_adapters_agree(runs) -> None:
    from orchestrator.config import ASSETS_DIR, DataConfig, ModelConfig
    from orchestrator.data import collate, load_examples
    from orchestrator.model import load_tokenizer

    tok = load_tokenizer(ModelConfig(path=str(ASSETS_DIR / "tiny-llama")))
    cfg = DataConfig(path=str(ASSETS_DIR / "tiny_instruct" / "eval.jsonl"), max_seq_len=128)
    batch = collate(load_examples(cfg.path, tok, cfg)[:4], tok.pad_token_id)
    ref = _adapter_logits(runs["ddp"] / "adapter", batch)
    for name in STRATEGIES:
        adapter = runs[name] / "adapter"
        assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
        got = _adapter_logits(adapter, batch)
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (name, (got - ref).abs().max())


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_resume_in_new_process_is_exact(runs, name, tmp_path) -> None:
    """Drop the final checkpoint, resume from step 3 in a new torchrun: same losses after. DDP's
    resumed run counts its traffic (its all-reduce through the counting hook): the plan must
    match it, and its losses must still equal the plain run's exactly."""
    run_dir = tmp_path / name
    shutil.copytree(runs[name], run_dir)
    cfg_text = (run_dir / "config.yaml").read_text().replace(str(runs[name]), str(run_dir))
    (run_dir / "config.yaml").write_text(cfg_text)
    rewind(run_dir, 3)
    env = {"ORCHESTRATOR_COMM_LOG": str(run_dir / "comm")} if name == "ddp" else {}
    proc = orchestrate("train", f"run.dir={run_dir}", *COMMON, *STRATEGIES[name], env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resuming at step 3" in proc.stderr
    resumed = _losses(run_dir)
    full = _losses(runs[name])
    tol = 1e-6 if name.startswith("zero") else 0.0
    assert len(resumed) == 6
    for a, b in zip(resumed, full):
        assert abs(a - b) <= tol * max(1.0, abs(b)), (resumed, full)
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    if name == "ddp":
        _check_traffic(run_dir)


def _counted(run_dir: Path, rank: int = 0) -> tuple[float, float]:
    """Median (intra, inter) bytes a rank sent per step, from steps 2 on (step 1 also carries
    loading's broadcasts; a checkpoint's collectives land in the step after it)."""
    rows = [json.loads(line) for line in (run_dir / f"comm.rank{rank}.jsonl").read_text().splitlines()][1:]
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return med([r["intra"] for r in rows]), med([r["inter"] for r in rows])


def _plan_of(run_dir: Path, world: int, ranks_per_node: int):
    import yaml

    from orchestrator.plan import comm_plan_for_run
    from orchestrator.config import from_container

    cfg = from_container(yaml.safe_load((run_dir / "config.yaml").read_text()))
    return comm_plan_for_run(cfg, world, ranks_per_node)


#: What the loop sends per step beside the strategy's collectives (RESULTS.md: "the ~60 bytes
#: over are the loop's loss and stop-flag all-reduces"): the plan must match to these bytes.
LOOP_SCALAR_BYTES = 256


def _matches_plan(counted: float, planned: float) -> bool:
    return 0 <= counted - planned <= LOOP_SCALAR_BYTES


def _check_traffic(run_dir: Path) -> None:
    plan = _plan_of(run_dir, 2, 2)
    intra, inter = _counted(run_dir)
    assert inter == 0 and plan.inter == 0
    assert _matches_plan(intra, plan.intra), (run_dir.name, intra, plan.intra, plan.collectives)


@pytest.mark.parametrize("name", [n for n in STRATEGIES if n != "ddp"])  # DDP: in its resume test
def test_communication_plan_matches_counted_traffic(runs, name) -> None:
    _check_traffic(runs[name])


def test_hsdp_matches_ddp_holds_half_and_resumes_on_fewer_ranks(runs, tmp_path) -> None:
    """HSDP on 4 ranks as 2 replica groups x 2 shards (the layout of 2 nodes x 2 GPUs): the same
    losses as DDP and as FSDP over 2 ranks, each rank holding half the base; stopped at step 3,
    it resumes on 2 ranks (a 2 x 1 mesh: the checkpoint is resharded) with the same losses."""
    run_dir = tmp_path / "hsdp"
    hsdp = ["strategy=fsdp", "strategy.shard_base=true", "strategy.replicate=2"]
    four = [a for a in COMMON if not a.startswith("launcher.nproc_per_node")]
    # Traffic counted as if ranks 0-1 and 2-3 were two nodes: only the replica all-reduce crosses.
    proc = orchestrate("train", f"run.dir={run_dir}", "launcher.nproc_per_node=4", *four, *hsdp,
                       env={"ORCHESTRATOR_COMM_LOG": str(run_dir / "comm"), "ORCHESTRATOR_RANKS_PER_NODE": "2"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "HSDP: 2 replica groups x 2 shards" in proc.stdout
    plan = _plan_of(run_dir, 4, 2)
    intra, inter = _counted(run_dir)
    assert _matches_plan(intra, plan.intra), (intra, plan.intra, plan.collectives)
    assert 0 < plan.inter < plan.intra and _matches_plan(inter, plan.inter), (inter, plan.inter, plan.collectives)
    losses, ref = _losses(run_dir), _losses(runs["ddp"])
    assert len(losses) == 6
    for a, b in zip(losses, ref):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (losses, ref)
    held = [h["base_bytes"] for h in json.loads((run_dir / "summary.json").read_text())["holdings_bytes"]]
    half = json.loads((runs["fsdp_shard_base"] / "summary.json").read_text())["holdings_bytes"][0]["base_bytes"]
    assert len(held) == 4 and all(abs(b - half) <= 0.01 * half for b in held), (held, half)

    rewind(run_dir, 3)
    proc = orchestrate("train", f"run.dir={run_dir}", *COMMON, *hsdp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resuming at step 3" in proc.stderr
    resumed = _losses(run_dir)
    assert len(resumed) == 6
    for a, b in zip(resumed, losses):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (resumed, losses)
