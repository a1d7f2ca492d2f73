"""Memory planner: byte counts, the field's known points, suggestions, CLI, and the activation
model checked against what autograd really saves. No training here except the shared run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from conftest import orchestrate

from launch.prepare import build_config
from orchestrator import plan as P

GIB = 2**30
# The settings the known points were reported with: one sequence of 512 tokens per GPU,
# activation checkpointing, default LoRA (r=16 on every linear layer).
SMALL_BATCH = ["data.max_seq_len=512", "trainer.micro_batch_size=1", "trainer.global_batch_size=16",
               "trainer.eval_batch_size=1", "model.gradient_checkpointing=true"]


def make_plan(overrides: list[str], world: int) -> P.Plan:
    return P.plan_for_run(build_config(overrides), world)


def phase(plan: P.Plan, name: str) -> P.Phase:
    return next(p for p in plan.phases if p.name == name)


def test_nf4_bytes_per_param_match_bitsandbytes():
    """The planner's 4-bit bytes against what bitsandbytes really stores for a weight: packed
    codes, absmax per block and, with double quantization, its 8-bit codes plus the second
    level's absmax and offset (FACTS.md: 0.51587 and 0.5625 bytes per weight)."""
    import bitsandbytes.functional as F

    n = 4096 * 1024
    w = torch.randn(4096, 1024)
    for double_quant, per_param in ((True, 0.51587), (False, 0.5625)):
        packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
        real = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
        if double_quant:
            real += state.state2.absmax.numel() * state.state2.absmax.element_size() + state.offset.element_size()
        assert P.nf4_bytes(n, double_quant) == pytest.approx(real, abs=8), (double_quant, real)
        assert P.nf4_bytes(n, double_quant) / n == pytest.approx(per_param, abs=1e-5)


@pytest.mark.parametrize("model,published_b", [
    ("llama3_8b", 8.03), ("llama3_70b", 70.55), ("llama2_70b", 68.98), ("llama_65b", 65.29),
    ("mistral_7b", 7.24), ("qwen2_5_7b", 7.62),
])
def test_shipped_shapes_have_published_parameter_counts(model, published_b):
    cfg = build_config([f"model={model}"])
    shape = P.read_shape(cfg.model.path)
    assert shape.total_params() / 1e9 == pytest.approx(published_b, rel=0.01)


def test_70b_fits_two_24gb_gpus_only_with_the_base_sharded():
    """QLoRA + FSDP (Answer.AI's FSDP-QLoRA): a 70B model trains on two 24 GB GPUs only with the
    4-bit base sharded. With embeddings and norms in bf16 (quant.frozen_dtype=compute) it fits
    resident; upcast to fp32 (PEFT's recipe) what the allocator allocates fits but its reserve
    for fragmentation (an out-of-memory happens at reserved bytes) does not, and CPU offload
    makes it fit, as fsdp_qlora runs it there. Replicated, nothing fits."""
    common = ["model=llama2_70b", "plan.gpu_memory_gb=24", *SMALL_BATCH]
    replicated = {
        "ddp": make_plan(common + ["strategy=ddp"], 2),
        "fsdp": make_plan(common + ["strategy=fsdp"], 2),
    }
    sharded = make_plan(common + ["strategy=fsdp", "strategy.shard_base=true"], 2)
    upcast = ["strategy=fsdp", "strategy.shard_base=true", "quant.frozen_dtype=fp32"]
    sharded_fp32 = make_plan(common + upcast, 2)
    offloaded = make_plan(common + upcast + ["strategy.cpu_offload=true"], 2)
    for name, plan in replicated.items():
        assert phase(plan, "train").total > 24 * GIB, name
        assert not plan.fits, name
    assert sharded.fits
    train = phase(sharded_fp32, "train")
    assert train.total - train.items[P.RESERVE] <= 24 * GIB < train.total and not sharded_fp32.fits
    assert offloaded.fits
    assert train.items["4-bit base (NF4 + constants)"] == pytest.approx(
        phase(replicated["fsdp"], "train").items["4-bit base (NF4 + constants)"] / 2)
    # Loading: when every rank first loads the whole 4-bit model, that alone exceeds 24 GB;
    # when rank 0 loads it on the host and sends shards, each GPU only ever holds its shard.
    whole = P.plan_memory(sharded.shape, replace(sharded.setup, low_memory_load=False), 24 * GIB)
    assert phase(whole, "load").total > 24 * GIB
    low = P.plan_memory(sharded.shape, replace(sharded.setup, low_memory_load=True), 24 * GIB)
    assert phase(low, "load").total <= 24 * GIB
    assert sharded.setup.low_memory_load  # the FSDP default loads low-memory


def test_65b_fits_one_48gb_gpu():
    """QLoRA paper: a 65B model fine-tunes on a single 48 GB GPU (with checkpointing)."""
    common = ["model=llama_65b", "launcher.nproc_per_node=1", *SMALL_BATCH]
    assert make_plan(common + ["plan.gpu_memory_gb=48"], 1).fits
    assert not make_plan(common + ["plan.gpu_memory_gb=24"], 1).fits
    without_ckpt = make_plan(common + ["plan.gpu_memory_gb=48", "model.gradient_checkpointing=false"], 1)
    assert not without_ckpt.fits


def test_suggestions_fit_and_name_the_change():
    plan = make_plan(["model=llama_65b", "plan.gpu_memory_gb=48", *SMALL_BATCH,
                      "model.gradient_checkpointing=false"], 1)
    sugg = P.suggest(plan.shape, plan.setup, plan.limit_bytes)
    assert sugg and all(s.plan.fits for s in sugg)
    assert "model.gradient_checkpointing=true" in [s.text for s in sugg]

    # Llama-3-8B, 4 x 1024 tokens per micro-batch, one 32 GB GPU: too big; a smaller
    # micro-batch (or checkpointing) fits, and more DDP ranks would not help.
    plan = make_plan(["model=llama3_8b", "plan.gpu_memory_gb=32", "data.max_seq_len=1024",
                      "trainer.micro_batch_size=4", "trainer.eval_batch_size=1",
                      "model.gradient_checkpointing=false"], 1)
    assert not plan.fits
    texts = [s.text for s in P.suggest(plan.shape, plan.setup, plan.limit_bytes)]
    assert any(t.startswith("trainer.micro_batch_size=") for t in texts)
    assert "model.gradient_checkpointing=true" in texts
    assert not any(t.startswith("world size") for t in texts)


def test_sharding_divides_what_each_strategy_shards():
    base = ["model=llama3_8b", "plan.gpu_memory_gb=80"]
    one = {n: phase(make_plan(base + o, 4), "train").items for n, o in {
        "ddp": ["strategy=ddp"], "fsdp": ["strategy=fsdp"],
        "shard": ["strategy=fsdp", "strategy.shard_base=true"],
        "zero3": ["strategy=deepspeed", "strategy.zero_stage=3"]}.items()}
    q = "4-bit base (NF4 + constants)"
    assert one["ddp"][q] == one["fsdp"][q] == 4 * one["shard"][q] == 4 * one["zero3"][q]
    assert one["fsdp"]["optimizer state (AdamW, fp32)"] == one["ddp"]["optimizer state (AdamW, fp32)"] / 4


def test_activation_model_matches_what_autograd_saves():
    """The per-token activation formula against the tensors autograd really keeps after one
    forward of the tiny QLoRA model and its loss (bf16 autocast and fp32, with and without
    checkpointing, with and without LoRA dropout, chunked and plain loss)."""
    import torch

    from orchestrator.loss import build_loss
    from orchestrator.model import attach_lora, compute_autocast, load_base

    for extra in ([], ["trainer.precision=fp32"], ["model.gradient_checkpointing=true"], ["lora.dropout=0"],
                  ["trainer.loss=plain"], ["trainer.loss=plain", "trainer.precision=fp32"]):
        cfg = build_config(["trainer.micro_batch_size=4", "data.max_seq_len=128", *extra])
        dtype = torch.float32 if "trainer.precision=fp32" in extra else torch.bfloat16
        model = attach_lora(load_base(cfg.model, cfg.quant, dtype, torch.device("cpu")), cfg.lora)
        model.train()
        loss_fn, kind = build_loss(cfg.trainer.loss, model)
        assert kind == cfg.trainer.loss
        shape = P.read_shape(cfg.model.path)
        setup = P.setup_from_config(cfg, 1, "cpu", dtype.itemsize, shape)
        torch.manual_seed(0)
        ids = torch.randint(3, shape.vocab, (4, 128))
        mask = torch.ones_like(ids)
        mask[0, -5:] = 0  # padding, as in training batches
        storages: dict[int, int] = {}

        def pack(t):
            st = t.untyped_storage()
            storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with compute_autocast("cpu", dtype):  # the loop's autocast
                loss = loss_fn(model, {"input_ids": ids, "attention_mask": mask}, ids)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved = sum(n for ptr, n in storages.items() if ptr not in params)
        if cfg.model.gradient_checkpointing:  # the 4-D attention mask stays alive as an input
            saved += 4 * 128 * 128            # the recompute takes, not as a saved tensor
        # The claim (RESULTS.md, "what the planner gets right"): within 2%.
        assert P.saved_activation_bytes(shape, setup) == pytest.approx(saved, rel=0.02), extra
        # The backward runs outside the autocast; under checkpointing it recomputes each layer,
        # which must produce the tensors of the forward (a dtype flip there once broke bf16 runs).
        loss.backward()


def test_cli_plan_prints_table_and_verdict():
    proc = orchestrate("plan", "model=llama3_8b", "plan.gpu_memory_gb=24", "launcher.nproc_per_node=1",
                       "data.max_seq_len=1024", "trainer.micro_batch_size=2", "trainer.eval_batch_size=2")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for row in ("4-bit base (NF4 + constants)", "non-quantized params", "LoRA params", "gradients",
                "optimizer state", "activations", "framework overhead", "total"):
        assert row in out, row
    assert "fits: peak" in out and "Meta-Llama-3-8B" in out

    proc = orchestrate("plan", "model=llama2_70b", "plan.gpu_memory_gb=24", "launcher.nproc_per_node=2",
                       *SMALL_BATCH)
    assert proc.returncode == 1, proc.stderr
    assert "does NOT fit" in proc.stdout
    # Either a sharded strategy is offered, or the note says why sharding alone is not enough.
    assert "strategy.shard_base=true" in proc.stdout or "first loads the whole 4-bit model" in proc.stdout

    proc = orchestrate("plan", "model=llama_65b", "plan.gpu_memory_gb=48", "launcher.nproc_per_node=1",
                       *SMALL_BATCH, "model.gradient_checkpointing=false")
    assert proc.returncode == 1
    assert "changes that fit:" in proc.stdout and "model.gradient_checkpointing=true" in proc.stdout


def test_cli_plan_bad_input_is_one_line():
    proc = orchestrate("plan", "plan.gpu_memory=24")
    assert proc.returncode == 2 and "gpu_memory" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = orchestrate("plan", "plan.device=tpu")
    assert proc.returncode == 2 and "plan.device='tpu'" in proc.stderr and "cuda, cpu" in proc.stderr
    proc = orchestrate("plan", "model=llama3_8b", "lora.target_modules=[q_proj,w_gate]")
    assert proc.returncode == 2 and "w_gate" in proc.stderr and "q_proj" in proc.stderr


def test_train_refuses_a_shape_only_model_with_a_clear_error():
    proc = orchestrate("train", "model=llama3_8b")
    assert proc.returncode == 2
    assert "no weights" in proc.stderr and "orchestrate plan" in proc.stderr


def test_training_records_planned_and_measured_peaks(two_rank_run):
    summary = json.loads((two_rank_run / "summary.json").read_text())
    planned, measured = summary["planned_peak_memory_mb"], summary["peak_memory_mb"]
    assert len(planned) == len(measured) == 2
    # launcher.cpu_allocator=auto: the ranks ran under mimalloc where its wheel is installed
    # (`make setup` installs it), and planned for the allocator they found.
    from orchestrator.hostalloc import mimalloc_library

    assert summary["host_allocator"] == ("mimalloc" if mimalloc_library() else "glibc")
    # Issue #28's bar: within 10% of the measured peak, in the precision this machine trains in
    # (ORCHESTRATOR_TEST_PRECISION forces either). Measured under mimalloc: bf16 -0.8% / +4.5%,
    # fp32 -4.7% / -0.9% on this 12-step run (the plan is for the whole run's peak);
    # benchmarks/planner_accuracy.py tracks whole runs at real size.
    for p, m in zip(planned, measured):
        assert 0.9 * m <= p <= 1.1 * m, (summary["precision"], planned, measured)


@pytest.mark.parametrize("strategy,kind", [
    (["strategy=ddp"], "ddp"), (["strategy=fsdp", "strategy.shard_base=true"], "fsdp shard_base"),
    (["strategy=deepspeed", "strategy.zero_stage=3"], "zero3"),
])
def test_cpu_plans_add_host_allocator_retention(strategy, kind):
    plan = make_plan([*strategy, "plan.device=cpu"], 2)
    cpu = phase(plan, "train").items
    transient = cpu["activations"] + cpu["logits + loss"]
    assert cpu[P.RETENTION] == pytest.approx(
        P.cpu_retention(kind, plan.setup.compute_bytes, plan.setup.host_allocator) * transient)
    # Not on CUDA (live allocator bytes), nor when the user states the overhead themselves.
    assert P.RETENTION not in phase(make_plan([*strategy, "plan.device=cuda"], 2), "train").items
    given = phase(make_plan([*strategy, "plan.device=cpu", "plan.overhead_gb=1"], 2), "train").items
    assert P.RETENTION not in given


def test_host_memory_release_returns_freed_heap_pages():
    """What runs before each evaluation on CPU: pages freed in the middle of glibc's heap stay
    in the process (RSS) until trimmed, and trimming hands them back."""
    import torch

    from orchestrator.distributed import release_free_host_memory

    def rss_mb() -> float:
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

    blocks = [bytearray(100_000) for _ in range(1000)]  # below the mmap threshold: heap chunks
    for b in blocks:
        b[::4096] = b"\1" * len(b[::4096])  # touch every page
    del blocks[::2]  # 50 MB freed between live chunks: no heap top to shrink
    before = rss_mb()
    release_free_host_memory(torch.device("cpu"))
    assert before - rss_mb() > 30
    release_free_host_memory(torch.device("meta"))  # not host memory: nothing to do, no error
