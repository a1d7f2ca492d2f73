"""End to end through the real CLI and torchrun on 2 CPU ranks, plus in-process checks of the
adapter and merged exports against the model that was actually trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import FAST, orchestrate, read_metrics

pytestmark = pytest.mark.slow


def test_two_rank_train_outputs_and_learning(two_rank_run: Path) -> None:
    run_dir = two_rank_run
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (run_dir / name).exists(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["world_size"] == 2
    assert len(summary["peak_memory_mb"]) == 2 and all(m > 0 for m in summary["peak_memory_mb"])
    assert summary["train_loss_last"] < summary["train_loss_first"]
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert 0.0 <= summary["eval_accuracy_before"] <= 1.0
    # The accuracy is the share of the final evaluation's answers that matched, as written out:
    # every one of the 32 prompts, each with its prompt, target and the model's output.
    samples = [json.loads(line) for line in (run_dir / "eval_samples.jsonl").read_text().splitlines()]
    assert [s["index"] for s in samples] == list(range(32))
    assert all(s["prompt"] and s["target"] and isinstance(s["output"], str) for s in samples)
    assert all(s["match"] == (s["output"].strip() == s["target"].strip()) for s in samples)
    assert summary["eval_accuracy_after"] == pytest.approx(sum(s["match"] for s in samples) / 32)
    assert summary["tokens_per_s"] * summary["train_time_s"] > 12 * 16  # >= 1 token per example
    # NF4 + double quantization: 4-bit codes, 8-bit absmax per 64, fp32 absmax per 256 of those.
    assert summary["base_storage"]["bytes_per_param"] == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), abs=1e-4)
    train = [m for m in read_metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in train] == list(range(1, 13))
    for m in train:
        assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= m.keys()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000012"


@pytest.fixture(scope="module")
def in_process_run(tmp_path_factory):
    """A short 1-rank run in this process, so the trained PEFT model itself is at hand."""
    from launch.prepare import build_config, prepare_run_dir
    from orchestrator.train import run

    overrides = [*FAST, "trainer.max_steps=6", "trainer.precision=fp32",
                 "trainer.eval_generate_examples=0",
                 f"run.dir={tmp_path_factory.mktemp('inproc')}"]
    cfg = build_config(overrides)
    run_dir = prepare_run_dir(cfg, overrides)
    result = run(cfg, run_dir)
    model = result.model.eval()
    return cfg, run_dir, model


def _probe_batch(cfg):
    from orchestrator.data import collate, load_examples
    from orchestrator.model import load_tokenizer

    tok = load_tokenizer(cfg.model)
    examples = load_examples(cfg.data.eval_path, tok, cfg.data)[:8]
    return collate(examples, tok.pad_token_id)


def test_adapter_reloads_with_plain_peft(in_process_run) -> None:
    """Standard transformers + bitsandbytes + PEFT, nothing of ours, reproduce the logits."""
    from peft import PeftModel, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg, run_dir, trained = in_process_run
    batch = _probe_batch(cfg)
    with torch.no_grad():
        want = trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    base = AutoModelForCausalLM.from_pretrained(
        cfg.model.path, dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32),
    )
    for m in base.modules():  # the CPU repacking pitfall (FACTS.md)
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    reloaded = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    with torch.no_grad():
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["attention_mask"].bool()
    assert torch.allclose(got[mask], want[mask], atol=1e-5, rtol=1e-5)
    # and the adapter is not a no-op: it changed the base's logits
    with torch.no_grad(), reloaded.disable_adapter():
        plain = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (plain[mask] - want[mask]).abs().max() > 1e-3


@pytest.mark.parametrize("dtype, tol", [("fp32", 1e-4), ("bf16", 0.1)])
def test_merged_export_matches_qlora_model(in_process_run, tmp_path, dtype, tol) -> None:
    from transformers import AutoModelForCausalLM

    cfg, run_dir, trained = in_process_run
    proc = orchestrate("merge", f"run_dir={run_dir}", f"out={tmp_path / 'merged'}", f"dtype={dtype}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert not hasattr(merged.config, "quantization_config") or merged.config.quantization_config is None
    batch = _probe_batch(cfg)
    with torch.no_grad():
        want = trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    mask = batch["attention_mask"].bool()
    err = (got[mask] - want[mask]).abs().max().item()
    scale = want[mask].abs().max().item()
    assert err <= tol * max(1.0, scale), (err, scale)
    agree = (got[mask].argmax(-1) == want[mask].argmax(-1)).float().mean().item()
    assert agree > 0.97
