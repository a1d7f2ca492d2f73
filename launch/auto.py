"""``auto`` settings, resolved once here in the launcher and frozen into ``config.yaml``.

``trainer.micro_batch_size=auto`` and ``model.gradient_checkpointing=auto`` become the fastest
setting whose planned peak fits the memory budget (orchestrator/plan/auto.py), planned at the
lengths of the data just prepared. The launcher writes the concrete values into the run
directory's config.yaml, which is all the ranks read: a restarted rank or a requeued Slurm job
never re-resolves. A resume (``run.dir`` of an existing run, the same overrides) takes the
values frozen there instead of planning again, since the budget (free host memory) may have
moved since.

Errors are raised as PlanError or DataError; the caller turns them into one-line usage errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from orchestrator.config import is_auto

AUTO_KEYS = (("trainer", "micro_batch_size"), ("model", "gradient_checkpointing"))


def has_auto(cfg) -> bool:
    return any(is_auto(getattr(getattr(cfg, sec), key)) for sec, key in AUTO_KEYS)


def rank_device(cfg) -> str:
    """The device the ranks will train on (what the plan must be made for)."""
    if cfg.launcher.name == "slurm":
        return "cuda" if cfg.launcher.gpus_per_node else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def prepared_lengths(cfg, splits=None):
    """The data's lengths for the plan: from ``splits`` when the launcher prepared them, else
    prepared here (the tokenized cache makes that cheap the second time). None where the
    tokenizer is not local (a hub id, a shape-only model directory): plan at max_seq_len."""
    from orchestrator.plan import data_lengths

    if splits is None:
        tok_dir = Path(cfg.model.tokenizer or cfg.model.path)
        if not (tok_dir / "tokenizer.json").exists() and not (tok_dir / "tokenizer_config.json").exists():
            return None
        from orchestrator.data import prepare
        from orchestrator.model import load_tokenizer

        splits = prepare(cfg.data, load_tokenizer(cfg.model))
    return data_lengths(cfg, splits.train, splits.eval)


def _frozen(cfg) -> Optional[dict]:
    """The config.yaml of the run this launch resumes, if any."""
    if not (cfg.run.dir and cfg.run.resume):
        return None
    frozen = Path(cfg.run.dir) / "config.yaml"
    if not frozen.exists():
        return None
    import yaml

    return yaml.safe_load(frozen.read_text()) or {}


def resolve(cfg, world: int, ranks_per_node: int, data=None, budget=None) -> Optional[str]:
    """Replace ``auto`` in ``cfg`` by concrete values, planned at ``data`` (the prepared data's
    lengths, ``prepared_lengths``) against ``budget`` (launch/budget.py's ``Budget``: what the
    ranks will have, the GPUs' free memory where the launcher sees them; None: the plan's own);
    returns the line to print (None: no auto)."""
    if not has_auto(cfg):
        return None
    old = _frozen(cfg)
    if old is not None:
        taken = []
        for sec, key in AUTO_KEYS:
            value = (old.get(sec) or {}).get(key)
            if is_auto(getattr(getattr(cfg, sec), key)) and value is not None and not is_auto(value):
                setattr(getattr(cfg, sec), key, value)
                taken.append(f"{sec}.{key}={str(value).lower()}")
        if not has_auto(cfg):
            return f"auto: resuming with {' '.join(taken)} as frozen in {Path(cfg.run.dir) / 'config.yaml'}"
    from orchestrator.plan import resolve_auto

    choice = resolve_auto(cfg, world, device=rank_device(cfg), data=data, ranks_per_node=ranks_per_node,
                          budget_per_rank=None if budget is None else (budget.per_rank, budget.source))
    cfg.trainer.micro_batch_size = choice.micro_batch
    cfg.model.gradient_checkpointing = choice.checkpointing
    return choice.describe()
