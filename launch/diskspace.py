"""The run directory, before launch: can it be made and written, and is there room to checkpoint?

Both would otherwise fail inside the ranks: a directory that cannot be created as a traceback
from ``mkdir``, a full disk minutes later at the first or second checkpoint. A checkpoint's
size follows from the shapes the planner reads (orchestrator/checkpoint.py writes the LoRA
weights, AdamW's two fp32 moments, the schedule, the sampler position and one RNG file per
rank; the frozen base's quantization constants ride along in the model's state dict), so the
room a run needs is known before it starts.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from launch.budget import BudgetError

MiB = 2**20
#: Bytes per saved tensor beyond its data in a torch.distributed.checkpoint: its entry in
#: ``.metadata`` plus its serialization header. Measured with torch 2.13 on the tiny model:
#: 4.60 MB on disk for 3.82 MB of tensors in 377 entries (2.1 KB each).
ENTRY_BYTES = 2048
#: Scheduler, trainer_state.json and ``latest``, and one RNG file per rank (6.6 KB each).
FIXED_BYTES = 64 * 1024
RNG_BYTES = 8 * 1024
#: PEFT's adapter_config.json and README.md beside the weights.
ADAPTER_FILES_BYTES = 16 * 1024


def size(x: float) -> str:
    return f"{x / MiB:.1f} MiB" if x < 2**30 else f"{x / 2**30:.2f} GiB"


def _target(cfg) -> tuple[str, Path]:
    """The setting that names where the run directory goes, and that path."""
    if cfg.run.dir:
        return "run.dir", Path(cfg.run.dir).absolute()
    return "run.root", Path(cfg.run.root).absolute()


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_run_dir(cfg) -> None:
    """Refuse a run directory that cannot be created or written, by trying: a probe file in it
    if it exists, else a probe directory where it would be created (root bypasses permission
    bits, so asking ``os.access`` would not do)."""
    key, path = _target(cfg)
    where = _existing_ancestor(path)
    if not where.is_dir():
        raise BudgetError(f"{key}={str(path)!r} cannot be created: {where} is not a directory")
    try:
        if where == path:
            fd, probe = tempfile.mkstemp(dir=path, prefix=".write-probe-")
            os.close(fd)
            os.unlink(probe)
        else:
            os.rmdir(tempfile.mkdtemp(dir=where, prefix=".write-probe-"))
    except OSError as exc:
        verb = "written" if where == path else "created"
        raise BudgetError(f"{key}={str(path)!r} cannot be {verb}: writing in {where} fails "
                          f"({exc.strerror or exc})") from exc


def checkpoint_bytes(plan, world: int) -> float:
    """Bytes of one checkpoint of the run ``plan`` describes."""
    from orchestrator.plan import LAYER_LINEARS, nf4_bytes

    s, shape = plan.setup, plan.shape
    n = plan.lora_params
    data = 12.0 * n  # LoRA weights, AdamW exp_avg and exp_avg_sq, all fp32
    if s.strategy == "deepspeed":
        data += 4.0 * n  # ZeRO keeps its fp32 partition of the parameters in the checkpoint
    entries = 4 * 2 * shape.layers * len(s.targets)  # weight, two moments, step per A and B
    if s.quant != "none":
        q = shape.quantized_params()
        data += nf4_bytes(q, s.double_quant) - q / 2  # the base's absmax/quant_map constants
        entries += 4 * shape.layers * len(LAYER_LINEARS)
    return data + entries * ENTRY_BYTES + FIXED_BYTES + world * RNG_BYTES


def adapter_bytes(plan) -> float:
    return 4.0 * plan.lora_params + ADAPTER_FILES_BYTES


def free_bytes(cfg) -> tuple[float, Path]:
    where = _existing_ancestor(_target(cfg)[1])
    st = os.statvfs(where)
    return float(st.f_bavail * st.f_frsize), where


def check_space(cfg, world: int) -> list[str]:
    """Refuse (BudgetError) when the run directory's filesystem cannot hold two checkpoints
    (the last complete one and the one being written) plus the adapter; warn when it cannot
    hold what ``trainer.keep_last_n`` keeps plus the one being written."""
    from orchestrator.plan import PlanError, plan_for_run

    try:
        plan = plan_for_run(cfg, world, "cpu", 4)  # the shapes only: device and dtype do not matter
    except PlanError:
        return []  # check_memory already says that the planner cannot read this model
    ckpt, adapter = checkpoint_bytes(plan, world), adapter_bytes(plan)
    free, where = free_bytes(cfg)
    need = 2 * ckpt + adapter
    what = (f"{size(free)} free on the run directory's filesystem ({where}) but a run needs "
            f"{size(need)}: two checkpoints ({size(ckpt)} each) plus the adapter ({size(adapter)})")
    if free < need:
        if not cfg.plan.enforce:
            return [f"warning: {what}; launching anyway (plan.enforce=false)"]
        raise BudgetError(f"{what}; free space there or choose another {_target(cfg)[0]} "
                          "(plan.enforce=false launches anyway)")
    t = cfg.trainer
    keep = t.keep_last_n
    if keep <= 0 and t.save_every and t.max_steps > 0:
        keep = t.max_steps // t.save_every + 1  # every checkpoint is kept
    if t.save_every and keep > 1 and free < (keep + 1) * ckpt + adapter:
        return [f"warning: {size(free)} free on the run directory's filesystem ({where}) holds "
                f"fewer than trainer.keep_last_n={t.keep_last_n} checkpoints ({size(ckpt)} each) "
                "plus the one being written and the adapter: a later checkpoint may fail for space"]
    return []
