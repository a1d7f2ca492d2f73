"""Merged export: the adapter folded into the base, saved as a plain transformers model.

The adapter was trained against the *quantized* base, so it is merged into the dequantized
4-bit weights (not into the original 16-bit checkpoint): that reproduces the QLoRA model
within bf16 noise, where merging into the re-quantized base would not (FACTS.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .model import DTYPES, load_base, load_tokenizer


class ExportError(ValueError):
    pass


def _run_config(run_dir: Path):
    from .rundir import NotARunDir, frozen_config

    try:
        cfg = frozen_config(run_dir)
    except NotARunDir as exc:
        raise ExportError(str(exc)) from None
    if not (run_dir / "adapter" / "adapter_config.json").exists():
        raise ExportError(f"{run_dir}/adapter: no PEFT adapter; has the run finished?")
    return cfg


def merge_run(run_dir: Path, out: Optional[Path] = None, dtype: str = "bf16") -> Path:
    """Write ``out`` (default ``run_dir/merged``) loadable by AutoModelForCausalLM."""
    from peft import PeftModel

    if dtype not in ("bf16", "fp16", "fp32"):
        raise ExportError(f"dtype={dtype!r} is not allowed; choose one of: bf16, fp16, fp32")
    cfg = _run_config(run_dir)
    out = out or run_dir / "merged"
    torch_dtype = DTYPES[dtype]
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    base = load_base(cfg.model, cfg.quant, torch_dtype, device, prepare_for_training=False)
    if cfg.quant.method != "none":
        base = base.dequantize()
        base.to(torch_dtype)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    merged = model.merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(str(out), safe_serialization=True)
    load_tokenizer(cfg.model).save_pretrained(str(out))
    return out
