"""The choices only a CUDA run takes, checked where they are made (in-process, no GPU needed):
the process group's backends under CPU offload, DeepSpeed's autocast section as DeepSpeed itself
reads it, the storage-dtype refusal, the allocator settings, `auto` against the free memory the
launcher probed, and the CUDA plan's allocator reserve and communicator buffers."""

from __future__ import annotations

import pytest
import torch

from launch.prepare import UsageError, build_config
from orchestrator import plan as P

GIB = 2**30


def test_cpu_offload_gets_a_cpu_backend_beside_nccl() -> None:
    from orchestrator.config import DDPConfig, DeepSpeedConfig, FSDPConfig
    from orchestrator.distributed import process_group_backend
    from orchestrator.strategies import needs_cpu_collectives

    assert process_group_backend("cuda") == "nccl"
    assert process_group_backend("cuda", cpu_collectives=True) == "cuda:nccl,cpu:gloo"
    assert process_group_backend("cpu", cpu_collectives=True) == "gloo"
    assert needs_cpu_collectives(FSDPConfig(cpu_offload=True))
    assert not needs_cpu_collectives(FSDPConfig())
    assert not needs_cpu_collectives(DDPConfig())
    # DeepSpeed moves offloaded optimizer state itself, after reducing on the device.
    assert not needs_cpu_collectives(DeepSpeedConfig(offload_optimizer=True))


@pytest.mark.parametrize("dtype, section", [(torch.bfloat16, "bfloat16"), (torch.float16, "float16"),
                                            (torch.float32, None)])
def test_deepspeed_engine_is_told_the_compute_dtype(dtype, section) -> None:
    """Without a torch_autocast section DeepSpeed's engine switches an outer CUDA autocast off
    inside its forward; with one it runs the forward under it. Parsed by DeepSpeed's own config."""
    from deepspeed.runtime.config import DeepSpeedConfig as ParsedConfig

    from orchestrator.config import DeepSpeedConfig
    from orchestrator.distributed import DistInfo
    from orchestrator.strategies import BatchPlan
    from orchestrator.strategies.deepspeed import DeepSpeedStrategy

    for stage in (2, 3):
        strategy = DeepSpeedStrategy(DeepSpeedConfig(zero_stage=stage),
                                     DistInfo(0, 0, 1, torch.device("cpu"), "gloo"), dtype)
        parsed = ParsedConfig(strategy.ds_config(BatchPlan(2, 4, 1.0)))
        assert parsed.torch_autocast_enabled is (section is not None)
        if section is not None:
            assert parsed.torch_autocast_dtype == dtype
            # No module marked for lower-precision communication: LoRA weights and gradients
            # travel in fp32, as under DDP and FSDP.
            assert parsed.torch_autocast_lower_precision_safe_modules == []


def test_storage_dtype_that_fsdp_would_cast_is_refused() -> None:
    sharded = ["strategy=fsdp", "strategy.shard_base=true", "strategy.mixed_precision=true"]
    for bad in (["quant.storage_dtype=fp32", "trainer.precision=bf16"],
                ["quant.storage_dtype=bf16"]):  # precision auto: fp32 on CPUs without bf16
        with pytest.raises(UsageError, match="FSDP would cast the packed 4-bit bytes"):
            build_config([*sharded, *bad])
    build_config([*sharded, "quant.storage_dtype=bf16", "trainer.precision=bf16"])
    build_config([*sharded])  # auto storage follows the compute dtype
    build_config(["strategy=fsdp", "strategy.shard_base=true", "quant.storage_dtype=fp32",
                  "trainer.precision=bf16"])  # no mixed precision: nothing casts the bytes


def test_allocator_settings_keep_the_users(monkeypatch) -> None:
    from orchestrator.distributed import use_expandable_segments

    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    use_expandable_segments()
    import os

    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    use_expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"


def test_auto_plans_against_the_free_memory_the_launcher_probed() -> None:
    """An A100-40GB beside plan.gpu_memory_gb=80: auto must plan for the 40 GB it has (less what
    another process holds), not the 80 of the setting."""
    from launch.budget import gpu_budget

    cfg = build_config(["model=llama3_8b", "trainer.micro_batch_size=auto", "data.max_seq_len=4096", "trainer.eval_batch_size=1",
                        "trainer.global_batch_size=64", "plan.gpu_memory_gb=80"])
    on_setting = P.resolve_auto(cfg, 1, device="cuda")
    probed = gpu_budget([(36 * GIB, 40 * GIB, "NVIDIA A100-SXM4-40GB")], nproc=1)
    on_probe = P.resolve_auto(cfg, 1, device="cuda", budget_per_rank=(probed.per_rank, probed.source))
    assert on_setting.plan.limit_bytes == 80 * GIB and on_probe.plan.limit_bytes == 36 * GIB
    assert "free on GPU 0 (NVIDIA A100-SXM4-40GB)" in on_probe.describe()
    assert on_probe.plan.peak_bytes <= 36 * GIB < on_setting.plan.peak_bytes
    assert on_probe.micro_batch < on_setting.micro_batch
    # Two ranks on one GPU share it.
    assert gpu_budget([(36 * GIB, 40 * GIB, "A100")], nproc=2).per_rank == 18 * GIB


def test_cuda_plan_bounds_reserved_memory() -> None:
    """On CUDA the plan adds the allocator's reserve to what it allocates, and the context and
    one set of NCCL buffers per communicator (two under HSDP); the measurable part (what
    max_memory_allocated sees) leaves both out."""
    common = ["model=llama3_8b", "data.max_seq_len=2048", "trainer.micro_batch_size=1",
              "trainer.global_batch_size=16"]
    plan = P.plan_for_run(build_config(["strategy=fsdp", *common]), 8, "cuda")
    train = next(p for p in plan.phases if p.name == "train")
    allocated = train.total - train.items[P.OVERHEAD] - train.items[P.RESERVE]
    assert train.items[P.RESERVE] == pytest.approx(P.CUDA_ALLOCATOR_RESERVE * allocated)
    assert train.items[P.OVERHEAD] == P.CUDA_CONTEXT_BYTES + P.NCCL_BYTES
    assert plan.setup.device == "cuda" and plan.measurable_bytes() == pytest.approx(
        plan.peak_phase.total - plan.peak_phase.items[P.OVERHEAD] - plan.peak_phase.items[P.RESERVE])
    hsdp = P.plan_for_run(build_config(["strategy=fsdp", "strategy.replicate=2", *common]), 8, "cuda")
    assert next(p for p in hsdp.phases if p.name == "train").items[P.OVERHEAD] == (
        P.CUDA_CONTEXT_BYTES + 2 * P.NCCL_BYTES)
    cpu = P.plan_for_run(build_config(["strategy=fsdp", *common]), 8, "cpu")
    assert all(P.RESERVE not in p.items for p in cpu.phases)


def test_cpu_offload_is_refused_where_ranks_run_on_the_cpu() -> None:
    from launch.prepare import _check_offload

    cfg = build_config(["strategy=fsdp", "strategy.cpu_offload=true"])
    if torch.cuda.is_available():  # the ranks would run on GPUs: offloading is what it is for
        _check_offload(cfg)
    else:
        with pytest.raises(UsageError, match="run on the CPU already"):
            _check_offload(cfg)
