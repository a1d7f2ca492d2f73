"""Your own files: each format trains the tiny model, the tokenized cache is written once and hit
afterwards, and a packed mixture resumed from a checkpoint (on another world size) trains on
exactly the examples (hence the losses) of the uninterrupted run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import orchestrate, read_metrics, rewind

pytestmark = pytest.mark.slow

TINY = Path(__file__).resolve().parent.parent / "orchestrator" / "assets" / "tiny_instruct"
COMMON = [
    "launcher.nproc_per_node=1", "trainer.precision=fp32", "lora.dropout=0.0",
    "trainer.global_batch_size=16", "trainer.micro_batch_size=8", "trainer.eval_generate_examples=0",
    "optim.lr=3e-3", "optim.warmup_steps=1", "logger=basic", "logger.console=false",
    "data.max_seq_len=256",
]


def _rows(n: int) -> list[dict]:
    return [json.loads(line) for line in (TINY / "train.jsonl").read_text().splitlines()[:n]]


def _write_formats(root: Path) -> dict[str, tuple[Path, str]]:
    import pandas as pd

    rows = _rows(400)
    pd.DataFrame(rows).to_parquet(root / "alpaca.parquet")
    with (root / "chat.jsonl").open("w") as f:
        for r in rows:
            user = r["instruction"] + (f"\n{r['input']}" if r.get("input") else "")
            f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": r["output"]}]}) + "\n")
    text = [f"{r['instruction']} {r.get('input', '')} -> {r['output']}" for r in rows]
    pd.DataFrame({"text": text}).to_csv(root / "text.csv", index=False)
    return {"alpaca": (root / "alpaca.parquet", "alpaca"), "chat": (root / "chat.jsonl", "chat"),
            "text": (root / "text.csv", "text")}


def _losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir) if "loss" in m]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    return _write_formats(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("fmt", ["alpaca", "chat", "text"])
def test_each_format_trains_and_caches(files, tmp_path, capsys, fmt) -> None:
    """The launcher's preparation, then one rank training in this process (the CLI and torchrun
    around it are the same for every format, and covered by the other end-to-end tests)."""
    from launch.prepare import build_config, preflight, prepare_run_dir
    from orchestrator.train import run

    path, name = files[fmt]
    args = ["data=jsonl", f"data.path={path}", f"data.format={name}", "data.eval_fraction=0.1",
            f"data.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=10", *COMMON]
    overrides = [f"run.dir={tmp_path / 'run'}", *args, "data.packing=true"]
    cfg = build_config(overrides)
    preflight(cfg)
    assert "data train: 360 examples (tokenized cache written" in capsys.readouterr().out
    run(cfg, prepare_run_dir(cfg, overrides))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"]["train"]["examples"] == 360 and summary["data"]["eval"]["examples"] == 40
    assert summary["train_loss_last"] < summary["train_loss_first"]
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    # Preparing the same data and tokenizer again (packing off) reads the cache.
    capsys.readouterr()
    preflight(build_config([*args, f"run.dir={tmp_path / 'run2'}"]))
    assert "data train: 360 examples (tokenized cache hit" in capsys.readouterr().out


def test_packed_mixture_resumes_on_another_world_size_on_the_same_examples(files, tmp_path) -> None:
    """A mixture of three sources in three formats (weights 2:1:1 of 400 examples), the whole
    set packed once (data.packing_scope=dataset, global batch in rows) on two ranks: exact
    counts per source in the data line and summary.json, rows nearly full; resumed on ONE rank
    it trains on the same rows with the same dropout masks (lora.dropout=0.1: each micro-batch
    seeds its draws from its examples, data/batches.py), so the losses and the final adapter
    equal the uninterrupted run's up to summation order (not bitwise: one rank adds four
    micro-batches' gradients in another order than two ranks' all-reduce does). With per-rank
    dropout streams, as before, the losses differed by 1.5e-3 to 3.0e-3."""
    sources = ",".join(f"{{path: {files[f][0]}, format: {f}, weight: {w}}}" for f, w in
                       (("chat", 2), ("alpaca", 1), ("text", 1)))
    args = ["data=jsonl", f"data.sources=[{sources}]", "data.mixture_rows=400", "data.packing=true",
            "data.packing_scope=dataset",
            f"data.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=6", "trainer.save_every=3",
            *[a for a in COMMON if not a.startswith(("launcher", "lora.dropout"))], "lora.dropout=0.1",
            "trainer.micro_batch_size=4"]
    full = tmp_path / "full"
    proc = orchestrate("train", f"run.dir={full}", "launcher.nproc_per_node=2", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"data source 1 ({files['alpaca'][0]}): 100 of 400 examples drawn" in proc.stdout, proc.stdout
    state = json.loads((full / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())
    assert state["sampler"]["steps_done"] == 3 and state["sampler"]["fingerprint"].startswith("mix-")
    assert state["sampler"]["unit"] == "rows"
    data = json.loads((full / "summary.json").read_text())["data"]
    assert data["packing_scope"] == "dataset" and data["row_fill"] > 0.9, data
    assert [s["drawn"] for s in data["sources"]] == [200, 100, 100] and data["train"]["examples"] == 400
    assert "packing: 400 examples into" in proc.stderr
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    (resumed / "config.yaml").write_text((resumed / "config.yaml").read_text().replace(str(full), str(resumed)))
    (resumed / "metrics.jsonl").write_text("")
    rewind(resumed, 3)
    proc = orchestrate("train", f"run.dir={resumed}", "launcher.nproc_per_node=1", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming at step 3" in proc.stderr and "tokenized cache hit" in proc.stdout
    a, b = _losses(resumed), _losses(full)[3:]
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * max(1.0, abs(y)), (a, b)
    mine, theirs = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (resumed, full))
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert torch.allclose(mine[k], theirs[k], rtol=1e-4, atol=1e-6), k


def test_packed_training_takes_the_padded_steps(tmp_path) -> None:
    """Same examples per step, same token-mean loss: packing (here under FSDP2) changes only the
    layout, so its losses equal a padded DDP run's within float tolerance."""
    args = ["launcher.nproc_per_node=2", "trainer.max_steps=4", f"data.cache_dir={tmp_path / 'cache'}",
            "data.max_seq_len=256", *[a for a in COMMON if not a.startswith(("launcher", "data."))]]
    padded = orchestrate("train", f"run.dir={tmp_path / 'padded'}", *args)
    assert padded.returncode == 0, padded.stderr[-3000:]
    packed = orchestrate("train", f"run.dir={tmp_path / 'packed'}", *args, "data.packing=true", "strategy=fsdp")
    assert packed.returncode == 0, packed.stderr[-3000:]
    a, b = _losses(tmp_path / "padded"), _losses(tmp_path / "packed")
    assert len(a) == len(b) == 4 and a[-1] < a[0]
    # Step 1 runs the same weights on the same examples: equal up to summation order. Later
    # steps differ by that rounding, amplified by Adam's normalisation (~1e-5 after 4 steps).
    assert abs(a[0] - b[0]) <= 1e-6 * a[0], (a, b)
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-4 * max(1.0, abs(x)), (a, b)


def _hub_cache(home: Path, repo: str, splits: dict[str, list[dict]]) -> None:
    """A dataset repository as `huggingface-cli download --repo-type dataset` leaves it in the
    Hub cache (HF_HOME/hub): refs/main naming a snapshot holding the repository's files."""
    commit = "0" * 39 + "1"
    root = home / "hub" / f"datasets--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    data = root / "snapshots" / commit / "data"
    data.mkdir(parents=True)
    for split, rows in splits.items():
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_hugging_face_datasets_by_name_offline_and_saved_to_disk(tmp_path) -> None:
    """A dataset named by its repository id trains offline from the Hub cache (its test split as
    the eval split), and a save_to_disk directory is read as it is; a name that is neither a
    local path nor cached is one line saying which."""
    import datasets

    from orchestrator.config import DataConfig, ModelConfig
    from orchestrator.data import check_rows, prepare
    from orchestrator.model import load_tokenizer

    rows = _rows(120)
    _hub_cache(tmp_path / "hf", "acme/tiny-instruct", {"train": rows[:100], "test": rows[100:]})
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    run_dir = tmp_path / "run"
    proc = orchestrate("train", f"run.dir={run_dir}", "data=jsonl", "data.path=acme/tiny-instruct",
                       "data.eval_split=test", f"data.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=4",
                       *COMMON, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["data"]["train"]["examples"] == 100 and summary["data"]["eval"]["examples"] == 20
    proc = orchestrate("train", f"run.dir={tmp_path / 'nope'}", "data=jsonl", "data.path=acme/missing",
                       *COMMON, env=env)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert ("acme/missing: no such local file or directory, and no Hugging Face dataset of that name is "
            f"in the cache at HF_HOME={tmp_path / 'hf'}") in proc.stderr

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:100]),
                          "validation": datasets.Dataset.from_list(rows[100:])}).save_to_disk(str(saved))
    tokenizer = load_tokenizer(ModelConfig(path=str(TINY.parent / "tiny-llama")))
    cfg = DataConfig(path=str(saved), eval_split="validation", cache_dir=str(tmp_path / "cache"))
    splits = prepare(cfg, tokenizer)
    assert (len(splits.train), len(splits.eval)) == (100, 20) and not splits.cache_hit
    assert prepare(cfg, tokenizer).cache_hit
    assert check_rows(str(saved), cfg, "validation") == 20
    # Other rows saved in its place are another dataset (its own fingerprint): prepared afresh.
    shutil.rmtree(saved)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[1:101]),
                          "validation": datasets.Dataset.from_list(rows[100:])}).save_to_disk(str(saved))
    assert not prepare(cfg, tokenizer).cache_hit
    with pytest.raises(Exception, match="the saved dataset has no split 'test' \\(it has train, validation\\)"):
        prepare(DataConfig(path=str(saved), split="test"), tokenizer)
