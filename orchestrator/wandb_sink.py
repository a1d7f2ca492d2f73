"""The Weights & Biases sink, and the start-up that never stops training.

Compute nodes of most clusters have no route to the internet, while the user's shell exports
``WANDB_API_KEY``; ``logger.wandb.mode=auto`` then asks for an online run. wandb 0.31 would
wait ``init_timeout`` (90 s) for its server and raise. Here rank 0 first probes the server for a
few seconds (``netprobe``), bounds ``wandb.init`` by ``logger.wandb.init_timeout_s``, and on any
failure starts an *offline* run in the run directory under the *same run id*, so ``wandb sync``
later uploads it into that run and a later online resume continues it. One warning line says so
and names the ``wandb sync`` command. ``run.finish`` is bounded as well
(``logger.wandb.finish_timeout_s``); whatever it could not upload stays on disk.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import urllib.parse
from pathlib import Path
from typing import Any

from . import faults
from .netprobe import probe
from .oneline import brief

log = logging.getLogger("orchestrator")

DEFAULT_BASE_URL = "https://api.wandb.ai"
ID_FILE = "wandb_run_id"


def base_url() -> str:
    """The W&B server this process would talk to (``WANDB_BASE_URL``, else the public one)."""
    return (os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")


def has_api_key(url: str | None = None) -> bool:
    """A key in the environment or in ~/.netrc for the server's host (where ``wandb login``
    puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urllib.parse.urlsplit(url or base_url()).hostname or ""
    try:
        import netrc

        return bool(netrc.netrc().authenticators(host))
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(requested: str) -> str:
    """auto: ``WANDB_MODE`` when the user set one, else online with an API key, offline
    without."""
    if requested != "auto":
        return requested
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    env = {"run": "online", "dryrun": "offline"}.get(env, env)  # wandb's old names
    if env in ("online", "offline", "disabled"):
        return env
    return "online" if has_api_key() else "offline"


def preflight_problem(wandb_cfg: Any) -> str | None:
    """Why ``logger.wandb.mode=online`` cannot work from here, or None. Only an explicit
    ``online`` is refused: ``auto`` falls back to an offline run by itself."""
    if not wandb_cfg.enabled or wandb_cfg.mode != "online":
        return None
    url = base_url()
    if not has_api_key(url):
        return ("logger.wandb.mode=online but no W&B API key is configured (WANDB_API_KEY or "
                "`wandb login`); use logger.wandb.mode=offline and `wandb sync` later")
    reason = probe(url, wandb_cfg.probe_timeout_s)
    if reason:
        return (f"logger.wandb.mode=online but the W&B server {url} is unreachable from this "
                f"machine ({reason}); use logger.wandb.mode=auto (falls back to an offline run) "
                f"or offline, and `wandb sync` the run later")
    return None


def _run_id(run_dir: Path) -> str:
    """The run's W&B id, kept in the run directory so a resumed, requeued or re-launched run
    (online or offline) continues the same W&B run."""
    import secrets
    import string

    id_file = run_dir / ID_FILE
    if id_file.exists() and id_file.read_text().strip():
        return id_file.read_text().strip()
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    id_file.write_text(run_id + "\n")
    return run_id


class WandbSink:
    """Weights & Biases on rank 0 (online when it can, else offline in ``run_dir/wandb``)."""

    name = "W&B"

    def __init__(self, wandb_cfg: Any, run_dir: Path, run_config: dict[str, Any]):
        import wandb

        self._wandb = wandb
        self.cfg = wandb_cfg
        self.run_dir = run_dir
        self.run_config = run_config
        self.run_id = _run_id(run_dir)
        started = time.monotonic()
        mode = resolve_mode(wandb_cfg.mode)
        if mode != "online":
            self.run = self._init(mode)
            if mode == "offline":
                log.info("W&B offline run %s in %s (upload it later with: wandb sync %s)",
                         self.run_id, self.sync_dir, self.sync_dir)
            return
        url = base_url()
        reason = probe(url, wandb_cfg.probe_timeout_s)
        what = "unreachable"
        if reason is None:
            what = "did not start an online run"
            before = set((run_dir / "wandb").glob(f"run-*-{self.run_id}"))
            try:
                self.run = self._init("online")
                log.info("W&B run %s: %s", self.run_id, getattr(self.run, "url", None) or url)
                return
            except Exception as exc:  # CommError, timeouts, auth errors: all mean "not online"
                reason = brief(exc)
                self._forget_failed_online_attempt(before)
        self.run = self._init("offline")
        log.warning(
            "warning: W&B server %s %s (%s); after %.1f s of trying, logging to an offline W&B "
            "run with the same id %s instead; upload it later with: wandb sync %s",
            url, what, reason, time.monotonic() - started, self.run_id, self.sync_dir)

    @property
    def sync_dir(self) -> str:
        """The directory ``wandb sync`` takes (``run_dir/wandb/offline-run-...`` offline)."""
        return str(self.run.settings.sync_dir)

    def _init(self, mode: str):
        w = self.cfg
        settings = self._wandb.Settings(
            console="off", x_disable_stats=True, quiet=True, silent=True,
            init_timeout=float(w.init_timeout_s), finish_timeout=float(w.finish_timeout_s),
            finish_timeout_raises=True,
        )
        return self._wandb.init(
            project=w.project, entity=w.entity, name=w.name or self.run_dir.name, group=w.group,
            tags=list(w.tags), job_type=w.job_type, mode=mode, dir=str(self.run_dir),
            id=self.run_id, resume="allow", config=self.run_config, settings=settings,
        )

    def _forget_failed_online_attempt(self, before: set[Path]) -> None:
        """Stop wandb's service, which still holds the half-started run (a second ``init``
        with its id is refused: "run ID ... is in use"), and remove that run's directory: it
        holds no logged value, and left beside the offline run it would be mistaken for it."""
        self._teardown_quietly()
        for path in set((self.run_dir / "wandb").glob(f"run-*-{self.run_id}")) - before:
            shutil.rmtree(path, ignore_errors=True)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if faults.armed("wandb_core_kill", step):
            _kill_wandb_service()
        flat = {}
        for k, v in metrics.items():
            if isinstance(v, list):  # per-rank lists -> one series per rank
                flat.update({f"{k}/rank{i}": x for i, x in enumerate(v)})
            else:
                flat[k] = v
        self.run.log(flat, step=step)

    def close(self) -> None:
        """Finish the run, then stop wandb's service: ``finish`` returns before the service has
        written the run file out (measured with wandb 0.31: still empty right after ``finish``,
        complete after ``teardown``, which takes ~0.02 s), and a Slurm job that ends kills the
        service with it. Both wait at most ``finish_timeout_s``."""
        try:
            self.run.finish()
            self._wandb.teardown()
        except TimeoutError as exc:
            self._teardown_quietly()
            raise TimeoutError(
                f"could not upload within logger.wandb.finish_timeout_s={self.cfg.finish_timeout_s:g} s; "
                f"the run's data is on disk: wandb sync {self.sync_dir}") from exc
        except Exception:
            self._teardown_quietly()
            raise

    def _teardown_quietly(self) -> None:
        try:
            self._wandb.teardown()
        except Exception as exc:  # the service is gone already
            log.debug("wandb.teardown: %s", exc)

    @property
    def recovery(self) -> str:
        """Where what it logged so far can be found (for the warning when it fails)."""
        return f"what it logged so far is in {self.sync_dir} (wandb sync {self.sync_dir})"


def _kill_wandb_service() -> None:
    """Test fault: SIGKILL wandb's service process (``wandb-core``, a child of this one), as
    the OOM killer or a crash would; every later ``run.log`` raises ``ConnectionResetError``."""
    import signal

    me = str(os.getpid())
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)  # "pid (comm) state ppid ..."
        except OSError:
            continue
        if len(fields) == 2 and fields[0].split(" (", 1)[-1].startswith("wandb-core") \
                and fields[1].split()[1] == me:
            pid = int(stat.parent.name)
            os.kill(pid, signal.SIGKILL)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:  # already reaped by wandb
                pass
