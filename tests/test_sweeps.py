"""Sweeps through the real CLI: a grid, an Optuna study, failing trials, a Slurm job array.

Trials run on one rank with a few steps and a small eval set (each takes seconds); the array
trials run on two emulated Slurm nodes each, so one of them is an ordinary two-node run.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from conftest import ROOT, orchestrate
from wandb_reader import read_config, run_groups

EVAL = ROOT / "orchestrator" / "assets" / "tiny_instruct" / "eval.jsonl"


@pytest.fixture(scope="module")
def small_eval(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "eval.jsonl"
    path.write_text("".join(EVAL.read_text().splitlines(keepends=True)[:48]))
    return path


def trial_args(small_eval: Path) -> list[str]:
    return [
        "launcher.nproc_per_node=1", "trainer.max_steps=4", "trainer.global_batch_size=8",
        "trainer.micro_batch_size=8", "trainer.eval_generate_examples=0", "optim.warmup_steps=1",
        "trainer.precision=fp32", "logger=basic", "logger.console=false", f"data.eval_path={small_eval}",
    ]


def _report(sweep_dir: Path) -> list[dict]:
    with (sweep_dir / "report.csv").open() as f:
        return list(csv.DictReader(f))


def _summary(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


@pytest.mark.slow
def test_grid_2x2_one_run_dir_per_trial_ranked_report(tmp_path, small_eval) -> None:
    sweep_dir = tmp_path / "grid"
    proc = orchestrate("train", "-m", "optim.lr=5e-4,3e-3", "lora.r=4,8", f"sweep.dir={sweep_dir}",
                       "sweep.name=lr-rank", *trial_args(small_eval), "logger=wandb",
                       "logger.wandb.mode=offline")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = sorted(sweep_dir.glob("trial-*"))
    assert [t.name for t in trials] == ["trial-000", "trial-001", "trial-002", "trial-003"]
    want = [(0.0005, 4), (0.0005, 8), (0.003, 4), (0.003, 8)]
    import yaml

    for trial, (lr, r) in zip(trials, want):
        cfg = yaml.safe_load((trial / "config.yaml").read_text())  # its own resolved config
        assert cfg["optim"]["lr"] == lr and cfg["lora"]["r"] == r and cfg["run"]["dir"] == str(trial)
        assert (trial / "adapter" / "adapter_model.safetensors").exists()
        assert _summary(trial)["steps"] == 4
        # W&B: one group for the sweep, the trial's overrides in its run config
        (run_file,) = trial.glob("wandb/offline-run-*/run-*.wandb")
        assert run_groups(run_file) == {"lr-rank"}
        overrides = read_config(run_file)["overrides"]
        assert f"lora.r={r}" in overrides and any(o.startswith("optim.lr=") for o in overrides)

    rows = _report(sweep_dir)
    losses = {str(t): _summary(t)["eval_loss_after"] for t in trials}
    assert [r["run_dir"] for r in rows] == sorted(losses, key=losses.get)
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert row["status"] == "completed"
        assert math.isclose(float(row["eval_loss_after"]), losses[row["run_dir"]], rel_tol=1e-12)
        assert row["steps"] == "4" and float(row["tokens_per_s"]) > 0
    assert {(float(r["optim.lr"]), int(r["lora.r"])) for r in rows} == set(want)
    # printed at the end of the sweep, and the same again from sweep-report
    best = rows[0]
    assert f"best: trial {best['trial']} eval_loss_after=" in proc.stdout
    again = orchestrate("sweep-report", str(sweep_dir))
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() in proc.stdout
    import matplotlib.image

    image = matplotlib.image.imread(sweep_dir / "report.png")
    assert image.shape[0] > 100 and image.shape[1] > 400  # one panel per swept parameter


@pytest.mark.slow
def test_failed_trials_are_reported_and_the_rest_complete(tmp_path, small_eval) -> None:
    sweep_dir = tmp_path / "failing"
    # lora.r=0 is refused by validation; target module 'nope' fails inside the ranks.
    proc = orchestrate("train", "-m", "lora.r=4,0", "lora.target_modules=[all-linear],[nope]",
                       f"sweep.dir={sweep_dir}", *trial_args(small_eval))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {int(r["trial"]): r for r in _report(sweep_dir)}
    assert rows[0]["status"] == "completed" and rows[0]["rank"] == "1"
    assert _summary(sweep_dir / "trial-000")["steps"] == 4
    assert rows[1]["status"] == "failed" and "Target modules {'nope'} not found" in rows[1]["reason"]
    assert (sweep_dir / "trial-001" / "exit_code").read_text().strip() != "0"
    for i in (2, 3):
        assert rows[i]["status"] == "failed"
        assert rows[i]["reason"] == "lora.r=0 is not allowed; it must be > 0"
        assert not (sweep_dir / f"trial-{i:03d}" / "config.yaml").exists()
    assert "trial-001 [2/4] lora.r=4 lora.target_modules=[nope]: failed" in proc.stdout


@pytest.mark.slow
def test_optuna_sweep_of_three_trials_reports_the_best(tmp_path, small_eval) -> None:
    sweep_dir = tmp_path / "optuna"
    proc = orchestrate("train", "-m", "sweep=optuna", "sweep.n_trials=3", "sweep.sampler.seed=3",
                       "optim.lr=tag(log,interval(1e-3,1e-2))", f"sweep.dir={sweep_dir}",
                       *trial_args(small_eval))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _report(sweep_dir)
    assert len(rows) == 3 and all(r["status"] == "completed" for r in rows)
    for row in rows:  # sampled from the command line's lr range and the preset's rank choices
        assert 1e-3 <= float(row["optim.lr"]) <= 1e-2 and int(row["lora.r"]) in (4, 8, 16)
        trial = json.loads((Path(row["run_dir"]) / "trial.json").read_text())
        assert f"lora.r={row['lora.r']}" in trial["overrides"]
    losses = [_summary(r["run_dir"])["eval_loss_after"] for r in rows]
    assert losses == sorted(losses)
    best = rows[0]
    assert f"optuna best: trial-{int(best['trial']):03d} eval_loss_after={losses[0]:.4f}" in proc.stdout
    assert f"best: trial {best['trial']} eval_loss_after=" in proc.stdout


def test_grid_refuses_continuous_interval(tmp_path) -> None:
    proc = orchestrate("train", "-m", "optim.lr=interval(1e-4,1e-2)", f"sweep.dir={tmp_path / 's'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: optim.lr=interval(1e-4,1e-2): interval() is continuous and has no grid; give "
        "values (a,b,c), range() or choice(), or sample it with sweep=optuna"]


def test_optuna_on_slurm_is_refused_with_the_reason(tmp_path) -> None:
    proc = orchestrate("train", "-m", "sweep=optuna", "launcher=slurm", f"sweep.dir={tmp_path / 's'}")
    assert proc.returncode == 2
    assert "sweep=optuna with launcher=slurm is not supported" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_slurm_grid_renders_one_array_over_the_valid_trials(tmp_path) -> None:
    sweep_dir = tmp_path / "dry"
    proc = orchestrate("train", "-m", "launcher=slurm", "launcher.nodes=2", "launcher.dry_run=true",
                       "launcher.array_parallelism=2", "lora.r=4,0,8", f"sweep.dir={sweep_dir}")
    assert proc.returncode == 0, proc.stderr
    script = (sweep_dir / "job.sbatch").read_text()
    assert "#SBATCH --array=0,2%2" in script  # trial 1 (lora.r=0) was refused before submission
    assert f"#SBATCH --output={sweep_dir}/trial-%3a/slurm-%A_%a.out" in script
    assert f'RUN_DIR=$(sed -n "$(( SLURM_ARRAY_TASK_ID + 1 ))p" {sweep_dir}/trials.txt)' in script
    lines = (sweep_dir / "trials.txt").read_text().splitlines()
    assert lines == [str(sweep_dir / f"trial-{i:03d}") for i in range(3)]
    assert (sweep_dir / "trial-000" / "config.yaml").exists()
    assert not (sweep_dir / "trial-001" / "config.yaml").exists()
    assert "trial-001 [2/3] lora.r=0: failed (lora.r=0 is not allowed; it must be > 0)" in proc.stdout


@pytest.mark.slow
def test_slurm_grid_runs_as_one_job_array(slurm, tmp_path, small_eval) -> None:
    sweep_dir = tmp_path / "array"
    args = [a for a in trial_args(small_eval) if not a.startswith(("launcher.", "trainer.micro"))]
    proc = orchestrate("train", "-m", "launcher=slurm", "launcher.nodes=2", "launcher.time=00:15:00",
                       "launcher.array_parallelism=2", "optim.lr=5e-4,3e-3", f"sweep.dir={sweep_dir}",
                       "trainer.micro_batch_size=4", *args, env={"SLURM_CONF": str(slurm.conf)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job = (sweep_dir / "slurm_job_id").read_text().strip()
    assert f"submitted Slurm job array {job} (--array=0-1%2): 2 trials" in proc.stdout
    assert "#SBATCH --array=0-1%2" in (sweep_dir / "job.sbatch").read_text()
    ports = set()
    for task in (0, 1):
        trial = sweep_dir / f"trial-{task:03d}"
        state = slurm.wait(f"{job}_{task}", {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=300)
        log = (trial / f"slurm-{job}_{task}.out").read_text()
        assert state == "COMPLETED", log[-3000:] + slurm.controller_log(job)
        assert f"array {job}_{task}: trial {trial}" in log
        ports.add(log.split("rendezvous at 127.0.0.1:")[1].split()[0])
        summary = _summary(trial)  # an ordinary two-node run
        assert summary["world_size"] == 2 and summary["steps"] == 4
    assert len(ports) == 2  # each array task rendezvouses on its own port
    report = orchestrate("sweep-report", str(sweep_dir))
    assert report.returncode == 0, report.stderr
    rows = _report(sweep_dir)
    assert [r["status"] for r in rows] == ["completed", "completed"]
    losses = [_summary(r["run_dir"])["eval_loss_after"] for r in rows]
    assert losses == sorted(losses)


def test_slurm_grid_refuses_launcher_settings_that_differ_between_trials(tmp_path) -> None:
    proc = orchestrate("train", "-m", "launcher=slurm", "launcher.dry_run=true", "launcher.nodes=1,2",
                       f"sweep.dir={tmp_path / 's'}")
    assert proc.returncode == 2
    assert "launcher.* differs between trials" in proc.stderr


def test_optuna_space_reads_hydra_optuna_sweeper_format() -> None:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from launch.sweep_space import optuna_space, split

    preset = {"optim.lr": "tag(log, interval(1e-4, 1e-2))", "lora.r": "choice(4, 8, 16)",
              "lora.alpha": "16", "trainer.seed": "range(1, 10, 3)", "optim.scheduler": "cosine,linear"}
    plain, sweeps = split(["lora.r=8", "optim.weight_decay=interval(0, 0.1)"])
    space, fixed = optuna_space(preset, plain, sweeps)
    assert space == {
        "optim.lr": FloatDistribution(1e-4, 1e-2, log=True),
        "trainer.seed": IntDistribution(1, 7, step=3),  # range() excludes its stop
        "optim.scheduler": CategoricalDistribution(["cosine", "linear"]),
        "optim.weight_decay": FloatDistribution(0.0, 0.1),
    }  # lora.r is fixed by the command line
    assert fixed == ["lora.alpha=16"]


def test_job_array_spec_compresses_task_ranges() -> None:
    from launch.slurm import JobArray

    assert JobArray([0, 1, 2, 4, 6, 7], Path("t"), 2).spec() == "0-2,4,6-7%2"
    assert JobArray([0, 1], Path("t"), 0).spec() == "0-1"


def test_metric_value_accepts_only_finite_numbers() -> None:
    from launch.sweep_store import metric_value

    def state(v):
        return {"summary": {"eval_loss": v}}

    assert metric_value(state(0.25), "eval_loss") == 0.25 and metric_value(state(3), "eval_loss") == 3.0
    for bad in (float("nan"), float("inf"), None, "0.1", True):
        assert metric_value(state(bad), "eval_loss") is None  # what Optuna is told as a failure
    assert metric_value({"summary": {}}, "eval_loss") is None
