"""``orchestrate train -m``: expand the overrides into trials and run each as an ordinary run.

Every trial goes through the same path as a single run (compose once, validate, preflight,
freeze ``config.yaml`` into its own run directory under the sweep directory) and is launched by
the same launchers. Hydra's sweeper and launcher plugins are not used to run trials: they call a
task function inside Hydra's job machinery (working-directory changes, per-job logging and
output dirs), which the compose-once design keeps out of the ranks; the sweep layer only borrows
Hydra's override grammar and grid expansion, and drives Optuna's ask/tell API itself.

A trial that fails (its config is refused, or its ranks exit non-zero) is recorded with the
reason and the sweep goes on; an Optuna trial that fails is told to the study as failed.
"""

from __future__ import annotations

import datetime as _dt
import sys
from pathlib import Path
from typing import Any, Sequence

from launch import sweep_space
from launch.prepare import UsageError, build_config, preflight, prepare_run_dir
from launch.sweep_store import (
    LIST_FILE, metric_value, record_exit, trial_dir, trial_state, write_sweep, write_trial,
)
from launch.sweep_store import trials as trial_states


class Sweep:
    """Where the trials go and what they share (name = W&B group)."""

    def __init__(self, base, plain: list[str], keys: list[str]):
        s = base.sweep
        self.cfg = base
        self.name = s.name or f"{Path(base.model.path).name}-{s.kind}"
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.dir = Path(s.dir or Path(base.run.root) / "sweeps" / f"{self.name}-{stamp}").resolve()
        if (self.dir / "sweep.json").exists():
            raise UsageError(f"sweep.dir={self.dir} already holds a sweep; choose another sweep.dir")
        self.dir.mkdir(parents=True, exist_ok=True)
        write_sweep(self.dir, {
            "name": self.name, "kind": s.kind, "metric": s.metric, "direction": s.direction,
            "params": keys, "overrides": plain, "launcher": base.launcher.name,
            "created": _dt.datetime.now().isoformat(timespec="seconds"),
        })

    def prepare(self, index: int, overrides: list[str], params: dict[str, Any]):
        """Compose, validate and freeze one trial's run directory; None where it is refused."""
        path = trial_dir(self.dir, index)
        write_trial(path, index, overrides, params)
        try:
            cfg = build_config(overrides)
            cfg.run.dir = str(path)
            wandb = cfg.logger.wandb
            wandb.group = wandb.group or self.name
            wandb.name = f"{wandb.name or self.name}-{path.name}"
            preflight(cfg)
            prepare_run_dir(cfg, overrides)
        except UsageError as exc:
            write_trial(path, index, overrides, params, error=str(exc))
            return None
        return cfg


def _label(index: int, total: int) -> str:
    return f"{trial_dir(Path('.'), index).name} [{index + 1}/{total}]"


def _announce(state: dict[str, Any], metric: str, total: int) -> None:
    params = " ".join(f"{k}={v}" for k, v in state["params"].items())
    value = metric_value(state, metric)
    if value is not None:
        result = f"{metric}={value:.4f}"
    else:
        got = state["summary"].get(metric)
        result = state["reason"] or (f"{metric}={got} is not a usable number" if got is not None
                                     else f"no {metric} in its summary.json (is data.eval_path set?)")
    print(f"{_label(state['index'], total)} {params}: {state['status']} ({result})", flush=True)


def _run_local(sweep: Sweep, index: int, overrides: list[str], params: dict[str, Any],
               total: int) -> dict[str, Any]:
    from launch.local import INTERRUPT_CODES, launch
    from orchestrator import rundir

    cfg = sweep.prepare(index, overrides, params)
    path = trial_dir(sweep.dir, index)
    if cfg is not None:
        print(f"{_label(index, total)}: running (log: {path / 'train.log'})", flush=True)
        rc = launch(cfg, path, log_path=path / "train.log")
        rundir.let_go(path)
        record_exit(path, rc)
        if rc in INTERRUPT_CODES.values():  # the user stopped the sweep, not just this trial
            print(f"{_label(index, total)}: interrupted; {rundir.resume_hint(path)}", flush=True)
            raise KeyboardInterrupt
    state = trial_state(path)
    _announce(state, sweep.cfg.sweep.metric, total)
    return state


def _grid_trials(base, args: list[str]) -> tuple[list[list[str]], list[str], list[dict[str, Any]]]:
    """Trials of the grid over ``sweep.params`` and the command line (which wins per key), as
    Hydra's basic sweeper combines ``hydra.sweeper.params`` with the overrides."""
    given = {o.get_key_element() for o in sweep_space.parse(args)}
    preset = [f"{k}={v}" for k, v in base.sweep.params.items() if k not in given]
    trials, keys = sweep_space.grid([*preset, *args])
    params = [sweep_space.swept_values(t, keys) for t in trials]
    return trials, keys, params


def run_grid(base, args: list[str], plain: list[str]) -> Sweep:
    trials, keys, params = _grid_trials(base, args)
    sweep = Sweep(base, plain, keys)
    print(f"sweep {sweep.name}: {len(trials)} trials in {sweep.dir}", flush=True)
    for i, (overrides, p) in enumerate(zip(trials, params)):
        _run_local(sweep, i, overrides, p, len(trials))
    return sweep


def run_optuna(base, plain: list[str], sweeps: list) -> Sweep:
    """Ask/tell over the search space: each trial's final metric from its summary.json."""
    import optuna
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    s = base.sweep
    space, fixed = sweep_space.optuna_space(dict(s.params), plain, sweeps)
    try:
        sampler = instantiate(OmegaConf.create(s.sampler)) if s.sampler else None
    except Exception as exc:  # Hydra wraps import and argument errors alike
        raise UsageError(f"sweep.sampler: {exc}".splitlines()[0]) from exc
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweep = Sweep(base, plain, list(space))
    study = optuna.create_study(direction=s.direction, sampler=sampler, study_name=s.study_name or sweep.name,
                                storage=s.storage, load_if_exists=True)
    print(f"sweep {sweep.name}: Optuna study of {s.n_trials} trials in {sweep.dir}", flush=True)
    index_of = {}
    for i in range(s.n_trials):
        trial = study.ask(space)
        index_of[trial.number] = i
        overrides = sweep_space.trial_overrides([*plain, *fixed], trial.params)
        state = _run_local(sweep, i, overrides, dict(trial.params), s.n_trials)
        value = metric_value(state, s.metric)
        if state["status"] == "completed" and value is not None:
            study.tell(trial, value)
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        number = study.best_trial.number  # a persistent study may hold earlier sessions' trials
        where = f"trial-{index_of[number]:03d}" if number in index_of else f"study trial {number}"
        print(f"optuna best: {where} {s.metric}={study.best_value:.4f} {study.best_params}", flush=True)
    return sweep


def submit_grid(base, args: list[str], plain: list[str]) -> int:
    """Freeze every trial's run directory, then submit one Slurm job array over them."""
    from launch.slurm import SlurmError, submit_array

    trials, keys, params = _grid_trials(base, args)
    sweep = Sweep(base, plain, keys)
    ready, array_cfg = [], None
    for i, (overrides, p) in enumerate(zip(trials, params)):
        cfg = sweep.prepare(i, overrides, p)
        if cfg is None:
            _announce(trial_state(trial_dir(sweep.dir, i)), base.sweep.metric, len(trials))
            continue
        if array_cfg is None:
            array_cfg = cfg
        elif cfg.launcher != array_cfg.launcher:  # dataclasses: field by field
            raise UsageError("launcher.* differs between trials, but a job array has one resource "
                             "request: sweep launcher settings in separate sweeps")
        ready.append(i)
    if not ready:
        print(f"no trial could start; see {sweep.dir}", file=sys.stderr)
        return 1
    (sweep.dir / LIST_FILE).write_text("".join(f"{trial_dir(sweep.dir, i)}\n" for i in range(len(trials))))
    try:
        return submit_array(array_cfg, sweep.dir, ready, sweep.name)
    except SlurmError as exc:
        raise UsageError(str(exc)) from exc


def run_sweep(args: Sequence[str]) -> int:
    """Entry point of ``orchestrate train -m ARGS``."""
    from launch.sweep_report import report

    args = list(args)
    bad = [a for a in args if a.startswith("-")]
    if bad:
        raise UsageError(f"unknown option {bad[0]!r} for a sweep; overrides are KEY=VALUE or KEY=a,b")
    try:
        plain, sweeps = sweep_space.split(args)
    except sweep_space.SweepSpaceError as exc:
        raise UsageError(str(exc)) from exc
    if any(a.split("=", 1)[0] in ("run.dir", "+run.dir") for a in plain):
        raise UsageError("run.dir names one run; a sweep makes one run directory per trial under "
                         "sweep.dir (default <run.root>/sweeps/<name>-<time>)")
    base = build_config(plain)
    kind, launcher = base.sweep.kind, base.launcher.name
    try:
        if launcher == "slurm":
            if kind == "optuna":
                raise UsageError(
                    "sweep=optuna with launcher=slurm is not supported: each Optuna trial is "
                    "chosen from the results before it, so trials run one after another; run the "
                    "sweep inside one Slurm allocation with launcher=local, or use a grid sweep "
                    "(one job array)")
            return submit_grid(base, args, plain)
        sweep = run_optuna(base, plain, sweeps) if kind == "optuna" else run_grid(base, args, plain)
    except sweep_space.SweepSpaceError as exc:
        raise UsageError(str(exc)) from exc
    print(report(sweep.dir), flush=True)
    return 0 if any(t["status"] == "completed" for t in trial_states(sweep.dir)) else 1
