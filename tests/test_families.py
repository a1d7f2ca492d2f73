"""Every model family people fine-tune (tiny random configs built from transformers' own config
classes): blocks found for FSDP, 4 bits where 4 bits were asked (or a refusal naming what is
not), LoRA on the linear layers but never the head or an MoE router, a merged export that
computes what the adapter model computes, an adapter plain PEFT reloads; and a few families
trained for real on 2 ranks under the strategies whose code paths they stress. The whole
family x strategy matrix is `benchmarks/families.py` (README, "Models")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import orchestrate
from orchestrator.tiny.families import FAMILIES, MOE, build

pytestmark = pytest.mark.slow

#: bytes per matmul parameter with NF4 + double quantization; biases lift it a little.
NF4_DQ = 0.5 + 1 / 64 + 4 / (64 * 256)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: build(family, root / family) for family in FAMILIES}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_quantizes_adapts_and_merges(models, family, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from orchestrator.config import LoraConfig, ModelConfig, QuantConfig
    from orchestrator.export import write_merged
    from orchestrator.families import check_coverage, coverage, decoder_blocks, meta_model
    from orchestrator.model import attach_lora, base_linear_storage, load_base

    path = str(models[family])
    meta = meta_model(path, None, False)  # what the launcher checks before launch
    assert len(decoder_blocks(meta)) == 2
    if family in MOE:
        with pytest.raises(ValueError, match=r"would stay unquantized: mlp\.experts\."):
            check_coverage(coverage(meta), "nf4", False, type(meta).__name__)
    else:
        check_coverage(coverage(meta), "nf4", False)

    base = load_base(ModelConfig(path=path), QuantConfig(allow_unquantized=family in MOE),
                     torch.float32, torch.device("cpu"), prepare_for_training=False)
    storage = base_linear_storage(base)
    if family in MOE:  # the experts stay 16/32-bit, and summary.json says so
        assert coverage(base).share_left > 0.5 and storage["bytes_per_param"] > 1.0
    else:  # every matmul weight in 4 bits (Falcon's FalconLinear included)
        assert coverage(base).left == {} and NF4_DQ - 1e-3 < storage["bytes_per_param"] < 0.6

    model = attach_lora(base, LoraConfig(dropout=0.0))
    adapted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert adapted and not any(n.endswith(("lm_head", "embed_out", ".gate")) for n in adapted), adapted
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if ".lora_B." in n:
            torch.nn.init.normal_(p, std=0.05)  # a non-trivial adapter
    model.eval()
    ids = torch.randint(3, base.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert (want - plain).abs().max() > 1e-3

    merged_dir = write_merged(model.get_base_model(), tmp_path / "merged", torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()

    model.save_pretrained(str(tmp_path / "adapter"))
    fresh = load_base(ModelConfig(path=path), QuantConfig(allow_unquantized=family in MOE), torch.float32,
                      torch.device("cpu"), prepare_for_training=False)
    reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, want)


@pytest.mark.parametrize("family", MOE)
def test_lora_on_fused_experts_by_name(models, family) -> None:
    """PEFT's target_parameters reach the 3-D experts; the router stays frozen; the experts
    stay in the dtype they were loaded in (not upcast to fp32 by the k-bit preparation)."""
    from orchestrator.config import LoraConfig, ModelConfig, QuantConfig
    from orchestrator.model import attach_lora, compute_autocast, load_base

    base = load_base(ModelConfig(path=str(models[family])), QuantConfig(allow_unquantized=True),
                     torch.bfloat16, torch.device("cpu"))
    experts = {n: p.dtype for n, p in base.named_parameters() if p.dim() == 3}
    assert experts and set(experts.values()) == {torch.bfloat16}
    model = attach_lora(base, LoraConfig(dropout=0.0, target_parameters=["mlp.experts.gate_up_proj",
                                                                          "mlp.experts.down_proj"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("experts" in n for n in trainable) and not any(".gate." in n for n in trainable)
    ids = torch.randint(3, base.config.vocab_size, (2, 16))
    with compute_autocast("cpu", torch.bfloat16):  # as every forward of a training model
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if "experts" in n and p.requires_grad)


TRAINED = {  # family -> the strategy whose code path it stresses
    "falcon": ["strategy=fsdp", "strategy.shard_base=true"],  # blocks at transformer.h, subclassed linears
    "gpt2": ["strategy=deepspeed", "strategy.zero_stage=3"],  # Conv1D, tied head
    "gemma2": ["strategy=ddp"],  # the family's own attention (eager)
    "mixtral": ["strategy=fsdp", "strategy.shard_base=true", "quant.allow_unquantized=true"],
}


def test_families_train_on_two_ranks(models, tmp_path) -> None:
    common = ["launcher.nproc_per_node=2", "trainer.max_steps=2", "trainer.global_batch_size=4",
              "trainer.micro_batch_size=1", "trainer.eval_generate_examples=2", "trainer.eval_max_new_tokens=4",
              "logger=basic", "logger.console=false", "data.eval_path=null", "data.max_seq_len=128"]
    for family, overrides in TRAINED.items():
        run_dir = tmp_path / family
        proc = orchestrate("train", f"run.dir={run_dir}", f"model.path={models[family]}", *common, *overrides)
        assert proc.returncode == 0, f"{family}: {proc.stderr[-3000:]}"
        summary = json.loads((run_dir / "summary.json").read_text())
        bpp = summary["base_storage"]["bytes_per_param"]
        assert (bpp > 1.0) if family in MOE else (bpp < 0.6), (family, bpp)
        assert summary["forward_dtype"] == summary["precision"]
    # Refused before launch, in one line: 4 bits asked, experts that would stay 16-bit.
    proc = orchestrate("train", f"run.dir={tmp_path / 'refused'}", f"model.path={models['qwen3_moe']}", *common)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "would stay unquantized: mlp.experts." in proc.stderr and "quant.allow_unquantized=true" in proc.stderr
    # An attention implementation the family refuses: one line before launch too.
    proc = orchestrate("train", f"model.path={models['gemma2']}", "model.attn_implementation=flash_attention_2",
                       *common)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: model.attn_implementation='flash_attention_2'"), proc.stderr


@pytest.mark.parametrize("family", MOE)
def test_plan_counts_the_unquantized_experts(models, family) -> None:
    """The planner holds the experts at the bytes the loaded model holds them in, and plans LoRA
    on the Linears the model really has (attention only: the MLP is the experts)."""
    from launch.prepare import build_config
    from orchestrator import plan as P
    from orchestrator.config import ModelConfig, QuantConfig
    from orchestrator.model import attach_lora, load_base
    from orchestrator.config import LoraConfig

    cfg = build_config([f"model.path={models[family]}", "quant.allow_unquantized=true", "plan.device=cpu"])
    plan = P.plan_for_run(cfg, 1, "cpu", 2)
    train = next(p for p in plan.phases if p.name == "train")
    base = load_base(ModelConfig(path=str(models[family])), QuantConfig(allow_unquantized=True),
                     torch.bfloat16, torch.device("cpu"))
    experts = sum(p.numel() * p.element_size() for p in base.parameters() if p.dim() == 3)
    assert train.items["MoE experts (not quantized, compute dtype)"] == experts
    model = attach_lora(base, LoraConfig())
    lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    assert P.lora_params(plan.shape, list(plan.setup.targets), plan.setup.lora_r) == lora
