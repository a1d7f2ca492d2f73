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
        ("trainer.micro_batch_size=5", "trainer.global_batch_size=16 is not a multiple of trainer.micro_batch_size=5"),
        ("model.path=/nonexistent/model", "model.path='/nonexistent/model': no such directory"),
        ("data.path=/nonexistent/train.jsonl", "data.path: /nonexistent/train.jsonl: no such file"),
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
