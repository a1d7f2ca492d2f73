"""The run directory's rules in one place: who may write it (the lock), what the run is doing
(its state) and how to continue it (the resume hint). The launcher, the loop and a status
command all read these, so they agree.

```
RUN_DIR/run.lock     flock(2)-locked while a run writes here; holds who: host, pid, Slurm job
RUN_DIR/state.json   running | stopped | finished | failed, with step, checkpoint and reason
```
Why flock: the kernel drops it when the last process holding it dies (kill -9, OOM, a node
reboot), so a crashed run never leaves a lock that blocks the next launch; the record only
names the holder. Two rules cover what flock cannot see (a lock that lingers on a network
file system, a process of an old incarnation still dying): a run submitted to Slurm owns the
directory while its job is pending or running (the record names the job id; a finished job
does not block), and a later incarnation of the holder's own job (a requeue, a torchrun
restart: a higher SLURM_RESTART_COUNT or TORCHELASTIC_RESTART_COUNT) takes it over, since
Slurm runs one incarnation of a job id at a time. Two launches inside one allocation are
the same incarnation: the second is refused.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import secrets
import socket
import subprocess
from pathlib import Path
from typing import Any, Optional

LOCK_FILE = "run.lock"
STATE_FILE = "state.json"
# Set by the lock holder for the processes it starts: ranks under it need no lock of their own.
TOKEN_ENV = "ORCHESTRATOR_RUN_LOCK_TOKEN"
STATES = ("running", "stopped", "finished", "failed")
_ACTIVE_JOB = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED",
               "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT"}


class RunDirBusy(RuntimeError):
    """Another run writes this directory; the message names it (one line)."""


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def own_job_id() -> Optional[str]:
    """This process's Slurm job as squeue names it (array tasks as ARRAY_TASK), or None."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def _attempt() -> list[int]:
    """Which incarnation of the job this is: (Slurm requeues, torchrun restarts)."""
    return [int(os.environ.get("SLURM_RESTART_COUNT") or 0),
            int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)]


def job_active(job_id: str) -> Optional[bool]:
    """Whether Slurm still runs (or will run) ``job_id``; None where squeue cannot tell."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return False if "Invalid job id" in out.stderr else None
    return any(s.strip() in _ACTIVE_JOB for s in out.stdout.splitlines())


def read_record(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(run_dir) / LOCK_FILE).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def describe_holder(record: dict[str, Any]) -> str:
    job = record.get("slurm_job_id")
    where = f"pid {record['pid']} on {record.get('host', '?')}" if record.get("pid") else ""
    if job:
        where = f"Slurm job {job}" + (f" ({where})" if where else "")
    return f"{where or 'another process'}, since {record.get('since', '?')}"


class RunLock:
    """An exclusive lock on a run directory, held until ``release`` or process exit."""

    def __init__(self, run_dir: Path, fd: int, record: dict[str, Any]):
        self.run_dir, self.fd, self.record = run_dir, fd, record

    @property
    def token(self) -> str:
        return self.record["token"]

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock (children holding a copy keep it)
            self.fd = -1

    def hand_over(self, job_id: str) -> None:
        """Submitted to Slurm: the pending job owns the directory from now on (see module doc)."""
        self._write({**self.record, "pid": None, "slurm_job_id": job_id, "since": _now()})
        self.release()

    def _write(self, record: dict[str, Any]) -> None:
        self.record = record
        data = (json.dumps(record) + "\n").encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        os.fsync(self.fd)


def _open_locked(path: Path) -> Optional[int]:
    """An fd holding an exclusive flock on ``path`` (the file the path names now), or None."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                return None
            raise
        try:  # a take-over may have replaced the file between open and flock: lock the new one
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _take_over(path: Path) -> Optional[int]:
    """Replace a lock file whose holder is gone for good (its flock may linger, e.g. on NFS)."""
    fresh = path.with_name(f".{path.name}.{os.getpid()}")
    fresh.write_text("{}\n")
    os.replace(fresh, path)
    return _open_locked(path)


def acquire(run_dir: Path) -> RunLock:
    """Lock ``run_dir`` for this process, or raise RunDirBusy naming the holder."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_FILE
    mine = own_job_id()
    fd = _open_locked(path)
    old = read_record(run_dir)
    job = old.get("slurm_job_id")
    if fd is not None and job and job != mine and job_active(job):
        os.close(fd)  # submitted, pending or between attempts: the job owns it
        fd = None
    elif fd is None and job and (
            (job == mine and _attempt() > list(old.get("attempt") or [0, 0]))
            or job_active(job) is False):
        fd = _take_over(path)  # our own earlier incarnation, or a job that has ended
    if fd is None:
        raise RunDirBusy(
            f"run.dir={run_dir} is in use by another run: {describe_holder(old)}; wait for it "
            f"to finish, stop it (touch {run_dir}/STOP), or choose another run.dir"
        )
    lock = RunLock(run_dir, fd, {})
    try:
        lock._write({"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": mine,
                     "attempt": _attempt(), "since": _now(), "token": secrets.token_hex(8)})
    except OSError:  # a full or read-only disk: not held, and nothing left open
        lock.release()
        raise
    return lock


_HELD: dict[Path, RunLock] = {}


def hold(run_dir: Path) -> RunLock:
    """``acquire`` for the launcher, remembered for the process (``held``, ``let_go``) so the
    steps after preflight find it."""
    key = Path(run_dir).resolve()
    if key not in _HELD or _HELD[key].fd < 0:
        _HELD[key] = acquire(key)
    return _HELD[key]


def held(run_dir: Path) -> Optional[RunLock]:
    lock = _HELD.get(Path(run_dir).resolve())
    return lock if lock is not None and lock.fd >= 0 else None


def let_go(run_dir: Path) -> None:
    lock = _HELD.pop(Path(run_dir).resolve(), None)
    if lock is not None:
        lock.release()


def claim_for_rank(run_dir: Path) -> Optional[RunLock]:
    """Rank 0's check at start-up: under the launcher that holds the lock (its token is in our
    environment) nothing to do; otherwise (plain torchrun, a Slurm job) hold it ourselves."""
    token = os.environ.get(TOKEN_ENV)
    if token and read_record(run_dir).get("token") == token and _open_locked_probe(run_dir):
        return None
    return acquire(run_dir)


def _open_locked_probe(run_dir: Path) -> bool:
    """True if someone holds the lock now (we could not take it)."""
    fd = _open_locked(Path(run_dir) / LOCK_FILE)
    if fd is None:
        return True
    os.close(fd)
    return False


def is_held(run_dir: Path) -> Optional[bool]:
    """Whether a live process holds the run's lock, for readers such as ``orchestrate status``:
    read from the kernel's lock table (/proc/locks), so asking never takes, blocks or creates
    the lock. None where this host cannot tell (the holder's record names another host)."""
    path = Path(run_dir) / LOCK_FILE
    record = read_record(run_dir)
    if record.get("host") not in (None, socket.gethostname()):
        return None
    try:
        inode = os.stat(path).st_ino
        table = Path("/proc/locks").read_text()
    except OSError:
        return False if not path.exists() else None
    for line in table.splitlines():
        parts = line.split()
        ids = next((p for p in parts if p.count(":") == 2), "")  # MAJOR:MINOR:INODE
        if parts[1:2] == ["FLOCK"] and ids.rsplit(":", 1)[-1] == str(inode):
            return True
    return False


class NotARunDir(ValueError):
    pass


def frozen_config(run_dir: Path):
    """The RunConfig every rank of the run read (``config.yaml``, written by the launcher)."""
    import yaml

    from .config import from_container

    frozen = Path(run_dir) / "config.yaml"
    if not frozen.exists():
        raise NotARunDir(f"{run_dir}: no config.yaml; is it a run directory?")
    return from_container(yaml.safe_load(frozen.read_text()))


# -- state -------------------------------------------------------------------------------

_WARNED: set[str] = set()


RESERVE_FILE = ".state-reserve"
_RESERVE_BYTES = 64 * 1024
_FULL = (errno.ENOSPC, errno.EDQUOT)


def reserve_space(run_dir: Path) -> None:
    """Set aside a little space in the run directory (RESERVE_FILE) for the one write that must
    land on a disk that filled up: the state that says the run failed for space, and from which
    step it resumes. Freed only for that write; made again by the next launch. Best effort: a
    disk already full gets no reserve."""
    path = Path(run_dir) / RESERVE_FILE
    try:
        if path.exists() and path.stat().st_size >= _RESERVE_BYTES:
            return
        with path.open("wb") as f:
            f.write(b"\0" * _RESERVE_BYTES)  # real blocks (a sparse file frees nothing)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        _unlink(path)


def write_bookkeeping(path: Path, text: "str | bytes", what: str, spend_reserve: bool = False) -> bool:
    """Write a file that records the run rather than its training (state.json, summary.json,
    eval answers, curves) atomically, and never let a failed write end the run.

    A full disk, an exceeded quota, an I/O error or a file system remounted read-only (as NFS
    and Lustre clients do on errors) makes it one warning per kind of file, naming the error;
    the temporary file is removed and the previous version stays whole. Checkpoints and the
    adapter are not bookkeeping: their failure stops the run (checkpoint.py). Returns whether
    the write happened.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        try:
            _replace(tmp, path, text)
        except OSError as exc:
            reserve = path.parent / RESERVE_FILE
            if not (spend_reserve and exc.errno in _FULL and reserve.exists()):
                raise
            _unlink(tmp)
            reserve.unlink()  # its blocks are this write's
            _replace(tmp, path, text)
        return True
    except OSError as exc:
        _unlink(tmp)
        if what not in _WARNED:
            _WARNED.add(what)
            import logging

            logging.getLogger("orchestrator").warning(
                "could not write %s (%s: %s); the previous one stays, and the run is not stopped "
                "for it", what, path, exc.strerror or exc)
        return False


def _replace(tmp: Path, path: Path, text: "str | bytes") -> None:
    if isinstance(text, bytes):
        tmp.write_bytes(text)
    else:
        tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def write_state(run_dir: Path, state: str, **fields: Any) -> bool:
    """Record what the run is doing (atomically: a reader never sees half a file); a write
    that fails is a warning (write_bookkeeping), and ``orchestrate status`` reads the last one
    written. On a full disk the final states (failed, stopped, finished) may spend the run
    directory's reserve (reserve_space), so the status still tells how the run ended."""
    assert state in STATES, state
    record = {"state": state, **fields, "host": socket.gethostname(), "pid": os.getpid(),
              "time": _now()}
    return write_bookkeeping(Path(run_dir) / STATE_FILE, json.dumps(record, indent=1) + "\n",
                             f"the run's state ({STATE_FILE})", spend_reserve=state != "running")


def read_state(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(run_dir) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def resume_hint(run_dir: Path) -> str:
    """How to continue: from the newest complete checkpoint (naming its step), or from scratch."""
    from .checkpoint import latest  # lazy: keeps this module light for the launcher

    ckpt = latest(Path(run_dir))
    if ckpt is None:
        return (f"no complete checkpoint yet: orchestrate train run.dir={run_dir} would start "
                "over from step 0")
    step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    return (f"the run can be resumed with orchestrate train run.dir={run_dir} from step {step} "
            f"(checkpoint {ckpt})")
