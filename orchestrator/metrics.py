"""One logger, several sinks: the loop calls ``log(step, metrics)`` and each sink writes it.

Only rank 0 builds sinks; every other rank gets a logger with none, so the loop never checks
ranks. Adding a sink (TensorBoard, say) is one small class with ``log`` and ``close``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Protocol


class Sink(Protocol):
    def log(self, step: int, metrics: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def _clean(metrics: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe values: floats stay floats, non-finite floats become strings."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = str(v)
        out[k] = v
    return out


class JsonlSink:
    """``metrics.jsonl``: one object per logged step, appended so a resumed run continues it."""

    def __init__(self, path: Path, resume_from_step: int = 0):
        self.path = path
        if resume_from_step and path.exists():
            # Drop records beyond the checkpoint we resume from: those steps run again.
            kept = [
                line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_from_step
            ]
            path.write_text("".join(line + "\n" for line in kept))
        elif path.exists():
            path.unlink()
        self.file = path.open("a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.file.write(json.dumps({"step": step, **_clean(metrics)}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class ConsoleSink:
    """A tqdm progress bar with loss, tokens/s and ETA; eval results printed as lines."""

    def __init__(self, total_steps: int, start_step: int = 0):
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                        dynamic_ncols=True, mininterval=1.0)
        self.last_step = start_step

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if "loss" in metrics:
            self.bar.update(step - self.last_step)
            self.last_step = step
            post = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics.get('lr', 0):.2e}"}
            if "tokens_per_s" in metrics:
                post["tok/s"] = f"{metrics['tokens_per_s']:.0f}"
            self.bar.set_postfix(post, refresh=False)
        evals = {k: v for k, v in metrics.items() if k.startswith("eval_")}
        if evals:
            text = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in evals.items())
            self.bar.write(f"step {step}: {text}")

    def close(self) -> None:
        self.bar.close()


def wandb_mode(requested: str) -> str:
    """auto: online when an API key is configured (env or netrc), offline otherwise."""
    if requested != "auto":
        return requested
    import os

    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        import netrc

        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


def _new_run_id() -> str:
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class WandbSink:
    """Weights & Biases on rank 0. The run id lives in ``run_dir/wandb_run_id`` so a resumed or
    requeued run continues the same W&B run instead of starting a new one."""

    ID_FILE = "wandb_run_id"

    def __init__(self, cfg, run_dir: Path, run_config: dict[str, Any]):
        import wandb

        w = cfg.logger.wandb
        id_file = run_dir / self.ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else _new_run_id()
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            project=w.project, entity=w.entity, name=w.name or run_dir.name, group=w.group,
            tags=list(w.tags), job_type=w.job_type, mode=wandb_mode(w.mode), dir=str(run_dir),
            id=run_id, resume="allow", config=run_config,
            settings=wandb.Settings(console="off", x_disable_stats=True, quiet=True),
        )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        flat = {}
        for k, v in metrics.items():
            if isinstance(v, list):  # per-rank lists -> one series per rank
                flat.update({f"{k}/rank{i}": x for i, x in enumerate(v)})
            else:
                flat[k] = v
        self.run.log(flat, step=step)

    def close(self) -> None:
        self.run.finish()


class Logger:
    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks
        self.started = time.time()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(step, metrics)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def build_logger(cfg, run_dir: Path, is_main: bool, total_steps: int, start_step: int,
                 run_config: dict[str, Any] | None = None) -> Logger:
    """Sinks for rank 0 per ``cfg.logger``; an empty logger elsewhere."""
    if not is_main:
        return Logger([])
    sinks: list[Sink] = [JsonlSink(run_dir / "metrics.jsonl", resume_from_step=start_step)]
    if cfg.logger.console:
        sinks.append(ConsoleSink(total_steps, start_step))
    if cfg.logger.wandb.enabled and cfg.logger.wandb.mode != "disabled":
        import importlib.util
        import logging

        if importlib.util.find_spec("wandb") is None:
            logging.getLogger("orchestrator").warning(
                "logger.wandb.enabled=true but wandb is not installed (pip install -e '.[wandb]'); "
                "logging to the console and metrics.jsonl only")
        else:
            sinks.append(WandbSink(cfg, run_dir, run_config or {}))
    return Logger(sinks)
