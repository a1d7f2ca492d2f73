"""Bad overrides fail before any rank starts: one line naming the problem, exit code 2."""

from __future__ import annotations

import pytest
import yaml

from conftest import orchestrate


@pytest.mark.parametrize(
    "override, expected",
    [
        ("foo=1", "Key 'foo' not in 'RunConfig'"),
        ("trainer.max_step=3", "Key 'max_step' not in 'TrainerConfig'"),
        ("trainer.max_steps=abc", "could not be converted to Integer"),
        ("lora.dropout=high", "could not be converted to Float"),
        ("strategy=nope", "Could not find 'strategy/nope'; choose one of: ddp"),
        ("quant=int3", "Could not find 'quant/int3'; choose one of: fp4, nf4, none"),
        ("quant.method=int3", "quant.method='int3' is not allowed; choose one of: nf4, fp4, none"),
        ("strategy.zero_stage=3", "Key 'zero_stage' not in 'DDPConfig'"),
        ("lora.r=0", "lora.r=0 is not allowed; it must be > 0"),
        ("trainer.precision=fp8", "trainer.precision='fp8' is not allowed"),
        ("data.packing_scope=dataset", "data.packing_scope=dataset needs data.packing=true"),
        ("data.packing_scope=epoch", "data.packing_scope='epoch' is not allowed; choose one of: step, dataset"),
        ("trainer.micro_batch_size=5", "trainer.global_batch_size=16 is not a multiple of trainer.micro_batch_size=5"),
        ("model.path=/nonexistent/model", "model.path='/nonexistent/model': no such directory"),
        ("data.path=/nonexistent/train.jsonl", "data.path: /nonexistent/train.jsonl: no such file"),
        ("--config-dir=nowhere", "--config-dir nowhere: no such directory ("),
    ],
)
def test_bad_override_is_one_line_exit_2(override: str, expected: str) -> None:
    proc = orchestrate("train", override)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert expected in lines[0]
    assert "Traceback" not in proc.stderr


def test_cfg_job_prints_composed_config() -> None:
    proc = orchestrate("train", "--cfg", "job", "quant=none", "lora.r=4")
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["quant"]["method"] == "none"
    assert cfg["lora"]["r"] == 4
    assert cfg["strategy"]["name"] == "ddp"
    assert cfg["model"]["path"].endswith("tiny-llama")  # ${asset:...} resolved


def test_unknown_command() -> None:
    proc = orchestrate("trian")
    assert proc.returncode == 2
    assert "unknown command 'trian'" in proc.stderr


def test_batch_must_divide_over_world() -> None:
    proc = orchestrate("train", "launcher.nproc_per_node=3", "trainer.micro_batch_size=4")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: trainer.global_batch_size=16 is not divisible by trainer.micro_batch_size=4 x "
        "world size 3; use a multiple of 12"
    )


def test_tokenizer_model_mismatch(tmp_path) -> None:
    import json
    import shutil

    from orchestrator.config import ASSETS_DIR

    model = tmp_path / "small-vocab"
    shutil.copytree(ASSETS_DIR / "tiny-llama", model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["vocab_size"] = 64
    (model / "config.json").write_text(json.dumps(cfg))
    proc = orchestrate("train", f"model.path={model}")
    assert proc.returncode == 2
    assert "has 128 tokens but the model" in proc.stderr and "embeds only 64" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_existing_run_dir_guards(tmp_path) -> None:
    from launch.prepare import build_config, prepare_run_dir
    from orchestrator import rundir

    run_dir = tmp_path / "run"
    overrides = [f"run.dir={run_dir}", "optim.lr=1e-3"]
    prepare_run_dir(build_config(overrides), overrides)  # an existing run's directory
    rundir.let_go(run_dir)  # that run has ended: its lock must not be what refuses these
    other = orchestrate("train", f"run.dir={run_dir}", "optim.lr=2e-3")
    assert other.returncode == 2
    assert "belongs to a run with a different config (optim differ)" in other.stderr
    refuse = orchestrate("train", f"run.dir={run_dir}", "optim.lr=1e-3", "run.resume=false")
    assert refuse.returncode == 2
    assert "already holds a run and run.resume=false" in refuse.stderr


def test_refusals_of_what_only_a_rank_would_hit(monkeypatch) -> None:
    """A strategy whose package is missing (the import system reports it absent, as on a
    machine without DeepSpeed), and a meta-built model that is not rank 0's (low-memory
    loading): each one line naming it."""
    import sys

    import torch

    from launch.prepare import UsageError, build_config, check_packages
    from orchestrator.lowmem import ModelSpec, _match

    cfg = build_config(["strategy=deepspeed"])
    check_packages(cfg)  # installed here
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # what importlib reports for an absent one
    with pytest.raises(UsageError, match=r"^strategy=deepspeed needs deepspeed, which is not installed "
                                         r"\(pip install -e '\.\[deepspeed\]'\)$"):
        check_packages(cfg)

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    tensors = {n: (tuple(p.shape), p.dtype) for n, p in model.named_parameters()}
    _match(model, ModelSpec(None, None, {}, dict(tensors)))  # the same: nothing to say
    renamed = {("1.weight" if n == "0.weight" else n): v for n, v in tensors.items()}
    with pytest.raises(RuntimeError, match=r"^low-memory loading: the meta model differs from rank 0's "
                                           r"in \['0.weight', '1.weight'\]$"):
        _match(model, ModelSpec(None, None, {}, renamed))

