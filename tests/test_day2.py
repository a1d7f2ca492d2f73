"""After a run: the end-of-run table, curves.png from the run's own metrics, and `generate`
answering as the run's exact-match evaluation did (one shared 2-rank run, conftest)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from conftest import ROOT, orchestrate, read_metrics

pytestmark = pytest.mark.slow


def test_end_of_run_table_shows_the_summary(two_rank_run: Path) -> None:
    out = (two_rank_run.parent / "ddp.stdout").read_text()
    summary = json.loads((two_rank_run / "summary.json").read_text())
    assert '"holdings_bytes"' not in out  # the JSON stays in summary.json
    # The adapters computed in the run's precision (auto: bf16 where the CPU has it natively).
    assert summary["forward_dtype"] == summary["precision"] in ("bfloat16", "float32")
    assert f"{summary['eval_loss_before']:.4f} -> {summary['eval_loss_after']:.4f}" in out
    assert f"{summary['train_loss_first']:.4f} -> {summary['train_loss_last']:.4f}" in out
    assert f"{summary['eval_accuracy_after'] * 100:.1f}%" in out
    assert f"{summary['tokens_per_s']:,.0f}" in out
    for rank, peak in enumerate(summary["peak_memory_mb"]):
        assert f"rank {rank}: {peak:.0f} MB (planned {summary['planned_peak_memory_mb'][rank]:.0f})" in out
    for name in ("adapter", "summary.json", "curves.png"):
        assert str(two_rank_run / name) in out


def test_curves_come_from_the_runs_metrics(two_rank_run: Path, tmp_path: Path) -> None:
    from launch.report import curves_figure

    fig = curves_figure([two_rank_run])
    panels = {ax.get_title(): ax for ax in fig.axes}
    metrics = read_metrics(two_rank_run)
    for key, title in (("loss", "train loss"), ("eval_loss", "eval loss"), ("lr", "learning rate")):
        line = panels[title].lines[0]
        rows = [m for m in metrics if key in m]
        assert list(line.get_xdata()) == [m["step"] for m in rows]
        assert list(line.get_ydata()) == pytest.approx([m[key] for m in rows])
    assert (two_rank_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    proc = orchestrate("report", str(two_rank_run), str(two_rank_run), f"out={tmp_path / 'two.png'}")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "two.png").stat().st_size > 10_000
    bad = orchestrate("report", str(tmp_path))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no metrics.jsonl" in bad.stderr


def test_generate_answers_as_the_exact_match_evaluation_did(two_rank_run: Path) -> None:
    """Given the batches evaluation generated in, `generate` answers exactly what it recorded, in
    either precision. In bf16 an answer also depends on its batch (another batch shape rounds the
    logits differently, and a near tie can flip a greedy token), so only fp32 promises the same
    answers whatever the batching."""
    from launch.generate import cmd_generate
    from orchestrator.data import eval_shard
    from orchestrator.generate import Chat, Sampling

    summary = json.loads((two_rank_run / "summary.json").read_text())
    samples = [json.loads(line) for line in (two_rank_run / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 32 and [s["index"] for s in samples] == list(range(32))
    eval_rows = [json.loads(line) for line in
                 (ROOT / "orchestrator/assets/tiny_instruct/eval.jsonl").read_text().splitlines()][:32]
    assert [s["target"] for s in samples] == [r["output"] for r in eval_rows]
    recorded = [s["output"] for s in samples]
    # The answers say something, and something different for different prompts.
    assert all(o.strip() for o in recorded) and len(set(recorded)) >= 16, recorded
    chat = Chat(two_rank_run)
    sampling = Sampling(max_new_tokens=8)
    ids = [chat.prompt_ids(r) for r in eval_rows]
    batch = chat.cfg.trainer.eval_batch_size
    as_evaluated: list = [None] * 32
    for rank in range(summary["world_size"]):
        shard = eval_shard(32, summary["world_size"], rank)
        for i in range(0, len(shard), batch):
            chunk = shard[i: i + batch]
            for j, text in zip(chunk, chat.complete_ids([ids[j if j is not None else 0] for j in chunk],
                                                        sampling)):
                if j is not None:
                    as_evaluated[j] = text
    assert as_evaluated == recorded
    if summary["precision"] == "float32":
        assert chat.complete_many(eval_rows, sampling) == recorded  # batches of 8
    # The command line: one prompt, and the interactive loop, answer the same.
    first = eval_rows[0]
    out = io.StringIO()
    assert cmd_generate([f"run_dir={two_rank_run}", f"prompt={first['instruction']}",
                         f"input={first['input']}", "max_new_tokens=8"], stdout=out) == 0
    alone = chat.complete(eval_rows[0], sampling)  # a batch of one, as the command line runs it
    assert out.getvalue().strip() == alone.strip()
    out = io.StringIO()
    cmd_generate([f"run_dir={two_rank_run}", "max_new_tokens=8"],
                 stdin=io.StringIO(f"{first['instruction']}\t{first['input']}\n/quit\n"), stdout=out)
    assert f"> {alone}\n" in out.getvalue()


def test_generate_refuses_bad_arguments_in_one_line(two_rank_run: Path, tmp_path: Path) -> None:
    for args, needle in (
        ([f"run_dir={tmp_path}"], "no config.yaml"),
        ([f"run_dir={two_rank_run}", "temperature=-1"], "temperature"),
        ([f"run_dir={two_rank_run}", "promt=hi"], "unknown argument 'promt'"),
        ([f"run_dir={two_rank_run}", f"file={tmp_path / 'none.jsonl'}"], "no such file"),
    ):
        proc = orchestrate("generate", *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1 and needle in proc.stderr, (args, proc.stderr)
