"""Installed like a library: the wheel, a fresh virtual environment, a directory outside the
repository, and users' own config trees.

One wheel build and one venv serve the module. The venv reuses the test environment's packages
through a ``.pth`` (installing torch & co. again would take minutes); the project itself comes
only from the wheel, and each test checks that the installed copy, not the repository, ran.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import orchestrator
from conftest import ROOT
from wandb_reader import read_config

pytestmark = pytest.mark.slow

# What a build reads; anything else in the clone (tests, benchmarks, .venv, runs) stays out.
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "orchestrator", "launch", "conf", "slurm")
TWO_STEPS = ["trainer.max_steps=2", "trainer.global_batch_size=8", "trainer.micro_batch_size=4",
             "trainer.eval_generate_examples=4", "trainer.eval_max_new_tokens=4",
             "launcher.nproc_per_node=2", "logger.console=false", "logger.wandb.mode=offline"]


class Installed:
    """The wheel, a venv with it installed, and a working directory outside the repository."""

    def __init__(self, base: Path):
        src, dist = base / "src", base / "dist"
        src.mkdir()
        ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
        for name in BUILD_INPUTS:
            path = ROOT / name
            if path.is_dir():
                shutil.copytree(path, src / name, ignore=ignore)
            else:
                shutil.copy2(path, src / name)
        # No build isolation: the build uses the test environment's setuptools (offline CI).
        _check([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                "-w", str(dist), str(src)])
        (self.wheel,) = dist.glob("qlora_orchestrator-*.whl")
        self.venv = base / "venv"
        _check([sys.executable, "-m", "venv", "--without-pip", str(self.venv)])
        self.python = self.venv / "bin" / "python"
        site = Path(_check([str(self.python), "-c",
                            "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
        # The test environment's packages, after the venv's own site-packages: a plain path
        # line, so the .pth files there (the editable install of this repository) are not run.
        shared = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")
                  and Path(p).is_dir()]
        (site / "_test_env_packages.pth").write_text("".join(f"{p}\n" for p in shared))
        _check([sys.executable, "-m", "pip", "--python", str(self.python), "install", "--no-deps",
                "--no-index", "-q", str(self.wheel)])
        self.site = site
        self.cwd = base / "elsewhere"
        self.cwd.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WANDB_API_KEY")}
        self.env = {**env, "HF_HUB_OFFLINE": "1", "QLORA_ORCHESTRATOR_CACHE": str(base / "cache"),
                    "WANDB_MODE": "offline", "PATH": f"{self.venv / 'bin'}:{env.get('PATH', '')}"}

    def orchestrate(self, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        """The installed console script, run from outside the repository."""
        return subprocess.run([str(self.venv / "bin" / "orchestrate"), *args], cwd=self.cwd,
                              env=self.env, capture_output=True, text=True, timeout=timeout)


def _check(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr[-2000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    return Installed(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def user_conf(tmp_path_factory) -> Path:
    """A team's config tree: a model preset extending ours, a cluster preset extending our
    Slurm launcher with its own sbatch template, and a preset with a typo."""
    conf = tmp_path_factory.mktemp("team") / "conf"
    files = {
        "model/tiny_ckpt.yaml": "defaults:\n  - tiny\n  - _self_\ngradient_checkpointing: true\n",
        "model/typo.yaml": "defaults:\n  - tiny\n  - _self_\ngradient_checkponting: true\n",
        "launcher/our_cluster.yaml": (
            "defaults:\n  - slurm\n  - _self_\npartition: gpu-a100\naccount: ml team\n"
            "gpus_per_node: 4\ntime: '12:00:00'\nsetup:\n  - module load cuda/12.4\n"
            "template: slurm/ours.sbatch\n"),
        # Our template with one line of the team's own, using the same variables and filter.
        "slurm/ours.sbatch": (ROOT / "slurm" / "train.sbatch").read_text().replace(
            "set -o pipefail", "set -o pipefail\necho team-template {{ account | q }}"),
    }
    for name, text in files.items():
        (conf / name).parent.mkdir(parents=True, exist_ok=True)
        (conf / name).write_text(text)
    return conf


def test_wheel_holds_every_module_and_the_config_tree_and_templates(installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    expected = {f"orchestrator/_conf/{p.relative_to(ROOT / 'conf')}" for p in (ROOT / "conf").rglob("*.yaml")}
    expected |= {f"launch/_slurm/{p.name}" for p in (ROOT / "slurm").iterdir() if p.is_file()}
    # Every module (a package added later too) and every embedded asset.
    for top in ("orchestrator", "launch"):
        expected |= {str(p.relative_to(ROOT)) for p in (ROOT / top).rglob("*") if p.is_file()
                     and (p.suffix == ".py" or "assets" in p.parts) and "__pycache__" not in p.parts}
    assert "orchestrator/_conf/model/tiny.yaml" in expected and "launch/_slurm/train.sbatch" in expected
    assert not expected - names, sorted(expected - names)[:10]
    assert not any(n.startswith(("conf/", "slurm/", "tests/")) for n in names)


def test_installed_package_runs_outside_the_repository(installed) -> None:
    proc = subprocess.run([str(installed.python), "-c",
                           "import launch.cli, orchestrator.config as c; print(launch.cli.__file__); print(c.CONF_DIR)"],
                          cwd=installed.cwd, env=installed.env, capture_output=True, text=True)
    cli_file, conf_dir = proc.stdout.split()
    assert Path(cli_file).is_relative_to(installed.site) and Path(conf_dir) == installed.site / "orchestrator" / "_conf"

    version = installed.orchestrate("--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith(f"qlora-orchestrator {orchestrator.__version__} (installed in ")
    assert "no git checkout" in version.stdout

    job = installed.orchestrate("train", "--cfg", "job")
    assert job.returncode == 0, job.stderr
    assert f"path: {installed.site}/orchestrator/assets/tiny-llama" in job.stdout

    plan = installed.orchestrate("plan", "model=llama3_8b")
    assert plan.returncode in (0, 1), plan.stderr  # 1: does not fit the default GPU size
    assert "Meta-Llama-3-8B" in plan.stdout and "memory per rank" in plan.stdout

    dry = installed.orchestrate("train", "launcher=slurm", "launcher.dry_run=true")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("#!/bin/bash") and f"{installed.python} -m launch.torchrun" in dry.stdout
    (job_file,) = installed.cwd.glob("runs/*/job.sbatch")
    frozen = (job_file.parent / "config.yaml").read_text()
    assert f"template: {installed.site}/launch/_slurm/train.sbatch" in frozen


def test_installed_package_trains_and_records_its_version(installed) -> None:
    run_dir = installed.cwd / "run2"
    proc = installed.orchestrate("train", f"run.dir={run_dir}", *TWO_STEPS, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["eval_loss_after"] is not None
    assert summary["version"] == orchestrator.__version__
    assert summary["git_commit"] is None and "not a git checkout" in summary["code_source"]
    assert str(installed.site) in summary["code_source"]
    (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    config = read_config(wandb_file)
    assert config["version"] == orchestrator.__version__ and config["git_commit"] is None


def test_user_config_dir_extends_ours(installed, user_conf) -> None:
    job = installed.orchestrate("train", "--cfg", "job", "--config-dir", str(user_conf), "model=tiny_ckpt")
    assert job.returncode == 0, job.stderr
    assert "gradient_checkpointing: true" in job.stdout and "assets/tiny-llama" in job.stdout

    # A sweep on the team's cluster preset: one job array from the team's template.
    sweep = installed.orchestrate("train", "-m", "--config-dir", str(user_conf), "launcher=our_cluster",
                                  "launcher.dry_run=true", "model=tiny_ckpt", "optim.lr=1e-4,3e-4")
    assert sweep.returncode == 0, sweep.stderr
    script = sweep.stdout
    for line in ("#SBATCH --partition=gpu-a100", "#SBATCH --account='ml team'",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --time=12:00:00", "#SBATCH --array=0-1%4",
                 "module load cuda/12.4", "echo team-template 'ml team'", "--nproc_per_node=4"):
        assert line in script, line
    (trial,) = installed.cwd.glob("runs/sweeps/*/trial-001")
    assert f"template: {user_conf}/slurm/ours.sbatch" in (trial / "config.yaml").read_text()
    assert "optim.lr=0.0003" in (trial / "overrides.yaml").read_text()


def test_typo_in_a_user_preset_is_one_line_naming_it(installed, user_conf) -> None:
    proc = installed.orchestrate("train", "--config-dir", str(user_conf), "model=typo")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "error: In 'model/typo': Key 'gradient_checkponting' not in 'ModelConfig'"
    runs = set(installed.cwd.glob("runs/*"))
    missing = installed.orchestrate("train", "--config-dir", str(user_conf), "launcher=slurm",
                                    "launcher.template=nope.sbatch")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert f"launcher.template='nope.sbatch': no such template (looked for {user_conf}/nope.sbatch" in missing.stderr
    assert set(installed.cwd.glob("runs/*")) == runs  # refused before a run directory exists


def test_config_dirs_join_a_given_searchpath_and_odd_paths_survive(tmp_path) -> None:
    """In-process (no wheel): --config-dir folds into hydra.searchpath, after the user's own
    entries, with paths Hydra's grammar would otherwise split (spaces, quotes, commas)."""
    from launch.config_dirs import expand, search_dirs
    from launch.prepare import compose

    odd, plain = tmp_path / "team's conf, v2", tmp_path / "plain"
    for root, name in ((odd, "odd"), (plain, "plain")):
        (root / "lora").mkdir(parents=True)
        (root / "lora" / f"{name}.yaml").write_text(f"defaults: [default, _self_]\nr: {len(name)}\n")
    args = expand(["--config-dir", str(odd), "lora=odd", f"hydra.searchpath=[file://{plain}]"])
    assert args[0].startswith("hydra.searchpath=[") and len(args) == 2
    assert search_dirs(args) == [plain, odd]
    assert compose(args).lora.r == 3 and compose([args[0], "lora=plain"]).lora.r == 5


def test_version_names_the_commit_in_a_clone(capsys) -> None:
    from launch.cli import main

    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"qlora-orchestrator {orchestrator.__version__} (git ") and str(ROOT) in out
