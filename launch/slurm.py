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
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from orchestrator import rundir

# A wheel carries the repository's slurm/ as launch/_slurm (setup.py); a clone and an editable
# install read slurm/ at the top of the repository.
_PACKAGED = Path(__file__).resolve().parent / "_slurm"
SLURM_DIR = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parent.parent / "slurm"


class SlurmError(RuntimeError):
    pass


def resolve_template(name: str, config_dirs: Sequence[Path] = ()) -> Path:
    """The sbatch template ``launcher.template`` names: a path (absolute, or relative to the
    current directory), else a name under one of the user's config directories, else one of
    ours. The launcher freezes the result into config.yaml, so what rendered is on record."""
    path = Path(name).expanduser()
    if path.is_absolute() or path.is_file():
        candidates = [path]
    else:
        candidates = [d / name for d in config_dirs] + [SLURM_DIR / name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    looked = ", ".join(str(c) for c in candidates)
    raise SlurmError(f"launcher.template={name!r}: no such template (looked for {looked})")


def ranks_per_node(launcher) -> int:
    return launcher.nproc_per_node or launcher.gpus_per_node or 1


@dataclass
class JobArray:
    """A sweep as one job array: task k trains the run directory on line k+1 of ``trial_list``."""

    tasks: list[int]
    trial_list: Path
    parallelism: int = 0

    def spec(self) -> str:
        """``--array`` value: task ids compressed into ranges, then ``%N`` where limited."""
        parts, start = [], None
        for i, task in enumerate(self.tasks):
            start = task if start is None else start
            if i + 1 == len(self.tasks) or self.tasks[i + 1] != task + 1:
                parts.append(str(task) if start == task else f"{start}-{task}")
                start = None
        return ",".join(parts) + (f"%{self.parallelism}" if self.parallelism else "")


def render(cfg, run_dir: Path, array: Optional[JobArray] = None) -> str:
    """The sbatch script for ``cfg`` (pure: no Slurm needed). With ``array``, ``run_dir`` is
    the sweep directory and each array task picks its trial's run directory at run time."""
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
    template = env.from_string(resolve_template(launcher.template).read_text())
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
        cpu_allocator=launcher.cpu_allocator,
        max_restarts=launcher.max_restarts,
        run_dir=str(run_dir),
        array=array.spec() if array else None,
        trial_list=str(array.trial_list) if array else None,
        # Each task logs into its trial's run directory (%3a pads like trial-007).
        log_path=str(run_dir / ("trial-%3a/slurm-%A_%a.out" if array else "slurm-%j.out")),
        python=sys.executable,
    )


def _write_script(cfg, run_dir: Path, array: Optional[JobArray] = None) -> Optional[Path]:
    """Write ``run_dir/job.sbatch``; print it and return None on a dry run."""
    script = render(cfg, run_dir, array)
    path = run_dir / "job.sbatch"
    path.write_text(script)
    path.chmod(0o755)
    if cfg.launcher.dry_run:
        print(script, end="")
        print(f"dry run: script written to {path}; nothing submitted", file=sys.stderr)
        return None
    return path


def _sbatch(path: Path) -> str:
    """Submit; returns the job id."""
    try:
        # The job starts where the user submitted it (sbatch's default), as a local run does:
        # relative paths mean the same, and an installed package's directory is not a workplace.
        out = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True,
                             env=dict(os.environ))
    except FileNotFoundError:
        raise SlurmError("sbatch not found: is this a Slurm login node?") from None
    if out.returncode != 0:
        raise SlurmError(f"sbatch failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout.strip().split(";")[0]


def _hand_over(run_dir: Path, job_id: str) -> None:
    """The submitted job owns the run directory while it is pending or running (its rank 0
    takes the lock when it starts): a second submission is refused meanwhile."""
    lock = rundir.held(run_dir)
    if lock is not None:
        lock.hand_over(job_id)
        rundir.let_go(run_dir)


def submit(cfg, run_dir: Path) -> int:
    """Write ``run_dir/job.sbatch``; submit it unless dry_run. Returns an exit code."""
    path = _write_script(cfg, run_dir)
    if path is None:
        rundir.let_go(run_dir)
        return 0
    job_id = _sbatch(path)
    (run_dir / "slurm_job_id").write_text(job_id + "\n")
    _hand_over(run_dir, job_id)
    print(f"submitted Slurm job {job_id}")
    print(f"script: {path}")
    print(f"log: {run_dir / ('slurm-' + job_id + '.out')}")
    return 0


def submit_array(cfg, sweep_dir: Path, tasks: list[int], name: str) -> int:
    """One job array over the sweep's trials (``cfg`` is one trial's: the launcher is shared)."""
    from .sweep_store import LIST_FILE, trial_dir

    if not cfg.launcher.job_name:
        cfg.launcher.job_name = name
    array = JobArray(tasks, sweep_dir / LIST_FILE, cfg.launcher.array_parallelism)
    path = _write_script(cfg, sweep_dir, array)
    if path is None:
        return 0
    job_id = _sbatch(path)
    (sweep_dir / "slurm_job_id").write_text(job_id + "\n")
    for task in tasks:
        (trial_dir(sweep_dir, task) / "slurm_job_id").write_text(f"{job_id}_{task}\n")
        _hand_over(trial_dir(sweep_dir, task), f"{job_id}_{task}")
    print(f"submitted Slurm job array {job_id} (--array={array.spec()}): {len(tasks)} trials")
    print(f"script: {path}")
    print(f"logs: {sweep_dir}/trial-NNN/slurm-{job_id}_N.out")
    print(f"results: orchestrate sweep-report {sweep_dir}")
    return 0
