"""``run.fork_from``: what a fork may take from its parent, checked before any rank starts.

A fork is a new run started from another run's checkpoint. The parent is only read. What the
checkpoint holds fixes a few settings of the child: the base model (the adapter was trained on
it), the LoRA shape (adopted, as ``lora.init_from`` does), the strategy's checkpoint format
(DeepSpeed's or torch.distributed.checkpoint's), and, when the optimizer and step go on
(``run.fork_optimizer=true``), the data order (data and global batch). Everything else (the
learning rate and its schedule, the length, the strategy within a format, the world size,
evaluation, logging) is the child's to change; that is what a fork is for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from launch.errors import UsageError

#: Settings that decide which examples each step draws; a fork that continues the parent's data
#: position needs them unchanged (the sampler refuses another order mid-run).
_DATA_ORDER = (("trainer", "global_batch_size"), ("trainer", "seed"))


def check_fork(cfg) -> None:
    """Resolve ``run.fork_from`` to one complete checkpoint (frozen into the child's config, so
    a restarted child forks the same one) and refuse, in one line, a parent the child cannot
    start from. Nothing to do when the child already has a checkpoint of its own: it resumes."""
    from orchestrator import checkpoint

    if not cfg.run.fork_from:
        return
    where = f"run.fork_from={cfg.run.fork_from}"
    child = Path(cfg.run.dir).resolve() if cfg.run.dir else None
    if child is not None and child in (Path(cfg.run.fork_from).resolve(), *Path(cfg.run.fork_from).resolve().parents):
        raise UsageError(f"{where} is a checkpoint of run.dir itself; a fork starts a new run directory "
                         "(to go on in the same one, raise trainer.max_steps and resume)")
    if child is not None and checkpoint.latest(child) is not None:
        return
    try:
        source = checkpoint.resolve(Path(cfg.run.fork_from))
    except ValueError as exc:
        raise UsageError(f"{where}: {exc}") from None
    parent_dir = checkpoint.run_of(source)
    import yaml

    parent = yaml.safe_load((parent_dir / "config.yaml").read_text()) or {}
    _same_base(cfg, parent, where)
    _same_format(cfg, source, where)
    from launch.model_checks import adopt_lora_shape

    lora = parent.get("lora") or {}
    adopt_lora_shape(cfg, {k: lora[k] for k in ("r", "alpha", "use_rslora", "target_modules",
                                                "target_parameters", "bias") if k in lora},
                     f"the parent's {{}} at {where}")
    if cfg.run.fork_optimizer:
        _same_data_order(cfg, parent, source, where)
    cfg.run.fork_from = str(source)


def _same_base(cfg, parent: dict[str, Any], where: str) -> None:
    """The same base: the two model directories' config.json agree (a copy of the model
    elsewhere is the same base; another size or family is not)."""
    theirs = (parent.get("model") or {}).get("path")
    if theirs is None or Path(theirs).resolve() == Path(cfg.model.path).resolve():
        return
    a, b = Path(theirs) / "config.json", Path(cfg.model.path) / "config.json"
    if a.is_file() and b.is_file() and json.loads(a.read_text()) == json.loads(b.read_text()):
        return
    why = "their config.json differ" if a.is_file() else f"{a} is not there to compare"
    raise UsageError(f"{where} was trained on model.path={theirs}, not on model.path={cfg.model.path} "
                     f"({why}); a fork keeps its base")


def _same_format(cfg, source: Path, where: str) -> None:
    wrote = "deepspeed" if (source / "deepspeed").is_dir() else "fsdp or ddp"
    reads = "deepspeed" if cfg.strategy.name == "deepspeed" else "fsdp or ddp"
    if wrote != reads:
        raise UsageError(f"{where} was written by strategy={wrote}, whose checkpoints "
                         f"strategy={cfg.strategy.name} cannot read; fork it with strategy={wrote.split()[0]}, "
                         "or start from its adapter with lora.init_from=<run>/adapter")


def _same_data_order(cfg, parent: dict[str, Any], source: Path, where: str) -> None:
    from orchestrator.config import to_container

    mine = to_container(cfg)
    differ = [k for k in sorted(set(parent.get("data") or {}) | set(mine["data"]))
              if (parent.get("data") or {}).get(k) != mine["data"].get(k)]
    differ = [f"data.{k}" for k in differ] + [
        f"{group}.{key}" for group, key in _DATA_ORDER
        if (parent.get(group) or {}).get(key) != mine[group].get(key)]
    if differ:
        raise UsageError(f"{where} with run.fork_optimizer=true continues the parent's data order, but "
                         f"{', '.join(differ)} differ; keep them, or pass run.fork_optimizer=false to "
                         "start from its adapter at step 0")
    step = json.loads((source / "trainer_state.json").read_text())["step"]
    if 0 < cfg.trainer.max_steps <= step:
        raise UsageError(f"{where} is at step {step} and trainer.max_steps={cfg.trainer.max_steps}: "
                         "nothing to train; raise trainer.max_steps")
