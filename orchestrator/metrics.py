"""One logger, several sinks: the loop calls ``log(step, metrics)`` and each sink writes it.

Only rank 0 builds sinks; every other rank gets a logger with none, so the loop never checks
ranks. Adding a sink (TensorBoard, say) is one small class with ``log`` and ``close``.
Sinks fail soft (DESIGN.md): the loop never sees their errors.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Protocol

from .oneline import brief

_log = logging.getLogger("orchestrator")


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

    name = "metrics.jsonl"

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

    name = "console"

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


class Logger:
    """Hands each record to every sink. Logging is there to report on training, never to end
    it: a sink that raises is dropped with one warning line (and closed, so it keeps what it
    already has) and the others go on; a sink that fails to close is a warning too."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = list(sinks)
        self.started = time.time()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for sink in list(self.sinks):
            try:
                sink.log(step, metrics)
            except Exception as exc:
                self.sinks.remove(sink)
                _warn_failed(sink, f"at step {step}", exc, self.sinks)
                try:
                    sink.close()
                except Exception as close_exc:
                    _log.debug("closing the failed %s sink: %s", _name(sink), close_exc)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:
                _warn_failed(sink, "at finish", exc, [])
        self.sinks = []


def _name(sink: Sink) -> str:
    return getattr(sink, "name", type(sink).__name__)


def _warn_failed(sink: Sink, when: str, exc: BaseException, others: list[Sink]) -> None:
    what = brief(exc)
    recovery = getattr(sink, "recovery", "")
    _log.warning("warning: %s logging failed %s (%s)%s; %s", _name(sink), when, what,
                 f"; {recovery}" if recovery else "", _going_on(others))


def _going_on(others: list[Sink]) -> str:
    if not others:
        return "training is unaffected"
    return f"training goes on, metrics still go to {', '.join(_name(s) for s in others)}"


def build_logger(cfg, run_dir: Path, is_main: bool, total_steps: int, start_step: int,
                 run_config: dict[str, Any] | None = None) -> Logger:
    """Sinks for rank 0 per ``cfg.logger``; an empty logger elsewhere. A sink that cannot
    start is left out with a warning: the run goes on with the others."""
    if not is_main:
        return Logger([])
    sinks: list[Sink] = [JsonlSink(run_dir / "metrics.jsonl", resume_from_step=start_step)]
    if cfg.logger.console:
        sinks.append(ConsoleSink(total_steps, start_step))
    if cfg.logger.wandb.enabled and cfg.logger.wandb.mode != "disabled":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            _log.warning(
                "logger.wandb.enabled=true but wandb is not installed (pip install -e '.[wandb]'); "
                "logging to the console and metrics.jsonl only")
        else:
            from .wandb_sink import WandbSink

            try:
                sinks.append(WandbSink(cfg.logger.wandb, run_dir, run_config or {}))
            except Exception as exc:
                _log.warning("warning: W&B could not start (%s); %s", brief(exc), _going_on(sinks))
    return Logger(sinks)
