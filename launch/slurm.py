"""Slurm launcher: render ``slurm/<template>`` into the run directory and ``sbatch`` it.

The script runs one ``torchrun`` per node under ``srun`` with c10d rendezvous on the head
node's address, asks Slurm for a warning signal before the end, turns it into a checkpoint
and a clean exit, and requeues itself; the requeued job resumes from the run directory's
latest checkpoint with the same frozen config (and W&B run id).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

SLURM_DIR = Path(__file__).resolve().parent.parent / "slurm"


class SlurmError(RuntimeError):
    pass


def _template_path(name: str) -> Path:
    path = Path(name)
    if not path.is_absolute() and not path.exists():
        path = SLURM_DIR / name
    if not path.exists():
        raise SlurmError(f"launcher.template={name!r}: no such template (looked in {SLURM_DIR})")
    return path


def ranks_per_node(launcher) -> int:
    return launcher.nproc_per_node or launcher.gpus_per_node or 1


def render(cfg, run_dir: Path) -> str:
    """The sbatch script for ``cfg`` (pure: no Slurm needed)."""
    import jinja2

    launcher = cfg.launcher
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             autoescape=False)
    env.filters["q"] = lambda v: shlex.quote(str(v))
    for line in launcher.extra_sbatch:
        if "\n" in line:
            raise SlurmError(f"launcher.extra_sbatch entry {line!r} spans several lines")
    env_vars = {}
    for item in launcher.env:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise SlurmError(f"launcher.env entry {item!r} is not KEY=VALUE with a valid variable name")
        env_vars[key] = value
    nproc = ranks_per_node(launcher)
    cpus = launcher.cpus_per_task
    template = env.from_string(_template_path(launcher.template).read_text())
    return template.render(
        job_name=launcher.job_name or run_dir.name,
        nodes=launcher.nodes,
        gpus_per_node=launcher.gpus_per_node,
        cpus_per_task=cpus,
        nproc_per_node=nproc,
        omp_threads=max(1, (cpus or nproc) // nproc),
        time=launcher.time,
        partition=launcher.partition,
        account=launcher.account,
        qos=launcher.qos,
        constraint=launcher.constraint,
        mem=launcher.mem,
        exclusive=launcher.exclusive,
        extra_sbatch=list(launcher.extra_sbatch),
        setup=list(launcher.setup),
        env=env_vars,
        signal_grace_s=launcher.signal_grace_s,
        requeue=launcher.requeue,
        rdzv_port=launcher.rdzv_port,
        max_restarts=launcher.max_restarts,
        run_dir=str(run_dir),
        log_path=str(run_dir / "slurm-%j.out"),
        python=sys.executable,
    )


def submit(cfg, run_dir: Path) -> int:
    """Write ``run_dir/job.sbatch``; submit it unless dry_run. Returns an exit code."""
    script = render(cfg, run_dir)
    path = run_dir / "job.sbatch"
    path.write_text(script)
    path.chmod(0o755)
    if cfg.launcher.dry_run:
        print(script, end="")
        print(f"dry run: script written to {path}; nothing submitted", file=sys.stderr)
        return 0
    try:
        out = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent.parent, env=dict(os.environ))
    except FileNotFoundError:
        raise SlurmError("sbatch not found: is this a Slurm login node?") from None
    if out.returncode != 0:
        raise SlurmError(f"sbatch failed: {out.stderr.strip() or out.stdout.strip()}")
    job_id = out.stdout.strip().split(";")[0]
    (run_dir / "slurm_job_id").write_text(job_id + "\n")
    print(f"submitted Slurm job {job_id}")
    print(f"script: {path}")
    print(f"log: {run_dir / ('slurm-' + job_id + '.out')}")
    return 0
