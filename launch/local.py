"""Single-node launcher: torchrun with one rank per GPU (or 2 CPU ranks without GPUs).

The launcher is the process the user talks to. torchrun runs in a session of its own, so the
terminal's Ctrl-C reaches only the launcher, which turns it (and SIGTERM, SIGHUP) into the
ranks' agreed stop by writing ``RUN_DIR/STOP`` with the signal's name; torchrun never sees the
signal, so it cannot kill the ranks mid-checkpoint after its shutdown timeout. A second signal
kills torchrun and the ranks at once. The launcher holds the run directory's lock and passes it
to torchrun, so the lock lives as long as any process of the run does. torchrun is started
before the launcher's checks and told what to run after them (``PendingAgent``), so its import
of torch does not add to the time before the ranks start.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

# What the launcher's exit code is when a signal interrupted it (the shell's convention).
INTERRUPT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}


def default_nproc() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def torchrun_command(cfg, run_dir: Path) -> list[str]:
    nproc = cfg.launcher.nproc_per_node or default_nproc()
    return [
        sys.executable, "-m", "launch.torchrun",  # torchrun, minus its traceback on failure
        "--standalone", f"--nproc_per_node={nproc}", f"--max_restarts={cfg.launcher.max_restarts}",
        "-m", "launch.worker", str(run_dir),
    ]


class PendingAgent:
    """torchrun's agent, started before the launcher's checks so that its imports (torch, ~3 s
    on a CPU) overlap them instead of following them. It waits for its command line, the
    ranks' environment, its stdout and stderr and the run lock's descriptor (``launch.torchrun
    --await-command``), and exits quietly when the launcher closes the socket without sending
    them (a refused launch): until then it holds no descriptor of the launcher's output, so a
    refusal's pipe closes with the launcher."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        self.sock = ours
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "launch.torchrun", "--await-command", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        theirs.close()

    def start(self, cmd: list[str], env: dict[str, str], stdout: int, stderr: int,
              fds: tuple[int, ...]) -> Optional[subprocess.Popen]:
        """Send torchrun's arguments (``cmd`` after ``python -m launch.torchrun``); None when the
        agent is gone (it failed before reading them: start torchrun afresh, which shows why)."""
        payload = json.dumps({"argv": cmd[3:], "env": env}).encode()
        try:
            socket.send_fds(self.sock, [payload[:1]], [stdout, stderr, *fds])
            self.sock.sendall(payload[1:])
        except OSError:
            return None
        finally:
            self.sock.close()
        return self.proc

    def cancel(self) -> None:
        """Nothing to run: the agent sees the socket close and exits (once its imports are done;
        not waited for, so a refusal is as quick as before)."""
        self.sock.close()


def worker_env(nproc: int, cpu_allocator: str = "auto") -> dict[str, str]:
    """Environment for the ranks: split CPU threads between ranks unless the user chose, and
    the host allocator setting, which the torchrun agent turns into a preload (hostalloc.py)."""
    from orchestrator.hostalloc import ENV

    env = dict(os.environ)
    env[ENV] = cpu_allocator
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(nproc, 1)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun's ranks live in sessions of their own)."""
    from orchestrator.preempt import parent_pid

    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            children.setdefault(parent_pid(entry), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class _Interrupts:
    """The launcher's handlers while torchrun runs: first signal -> STOP, second -> kill."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.proc: Optional[subprocess.Popen] = None
        self.signal: Optional[signal.Signals] = None
        self.killed = False
        self.previous = {s: signal.signal(s, self._handle) for s in INTERRUPT_CODES}

    def _handle(self, signum: int, frame) -> None:
        from orchestrator.preempt import STOP_FILE

        sig = signal.Signals(signum)
        if self.signal is None:
            self.signal = sig
            (self.run_dir / STOP_FILE).write_text(sig.name + "\n")
            print(f"\n{sig.name}: the ranks will checkpoint at the next step boundary and stop "
                  "(Ctrl-C again to exit at once, without a checkpoint)", file=sys.stderr, flush=True)
            return
        if self.proc is None:
            return
        self.killed = True
        for pid in [self.proc.pid, *_descendants(self.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def launch(cfg, run_dir: Path, log_path: Optional[Path] = None,
           agent: Optional[PendingAgent] = None) -> int:
    """Run torchrun in the foreground; returns its exit code, or 128 + the signal number when a
    signal to the launcher stopped the run. With ``log_path`` (sweep trials) the ranks' output
    goes to that file instead of the console; ``agent``: torchrun already started."""
    from orchestrator import rundir

    cmd = torchrun_command(cfg, run_dir)
    nproc = cfg.launcher.nproc_per_node or default_nproc()
    env = worker_env(nproc, cfg.launcher.cpu_allocator)
    lock = rundir.held(run_dir)
    if lock is not None:
        env[rundir.TOKEN_ENV] = lock.token
    rundir.write_state(run_dir, "running")
    log = open(log_path, "ab") if log_path is not None else None
    interrupts = _Interrupts(run_dir)
    try:
        fds = (lock.fd,) if lock else ()
        out = log.fileno() if log is not None else sys.stdout.fileno()
        if agent is not None:
            interrupts.proc = agent.start(cmd, env, out, out if log else sys.stderr.fileno(), fds)
        if interrupts.proc is None:
            interrupts.proc = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT if log else None,
                start_new_session=True, pass_fds=fds)
        rc = interrupts.proc.wait()
    finally:
        interrupts.restore()
        if log is not None:
            log.close()
    if interrupts.killed:
        rundir.write_state(run_dir, "failed", reason=f"killed on a second {interrupts.signal.name}",
                           exit_code=INTERRUPT_CODES[interrupts.signal])
    if interrupts.signal is not None and rundir.read_state(run_dir).get("state") != "finished":
        return INTERRUPT_CODES[interrupts.signal]
    return rc
