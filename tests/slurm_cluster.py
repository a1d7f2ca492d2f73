"""A real Slurm on this machine for the tests: munge, slurmctld and two slurmd as two
emulated nodes (n1, n2 on 127.0.0.1), configured in a scratch directory and stopped by pid.

Needs root (as CI has) and Debian's slurmctld/slurmd/slurm-client/munge packages, which it
installs when missing. Facts behind each setting: ../shared/FACTS.md ("A real Slurm").
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


class SlurmUnavailable(RuntimeError):
    pass


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def ensure_installed() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm is not installed and installing it needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if _run(["apt-get", "install", "-y", "-q", *PACKAGES], env=env, timeout=600).returncode != 0:
        _run(["apt-get", "update", "-q"], env=env, timeout=600)
        out = _run(["apt-get", "install", "-y", "-q", *PACKAGES], env=env, timeout=600)
        if out.returncode != 0:
            raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {out.stderr[-500:]}")


class LocalSlurm:
    """Start with ``start()``, stop with ``stop()``; ``env`` points clients at this cluster."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.pids: list[Path] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_conf(self) -> None:
        host = socket.gethostname()
        state = self.root / "state"
        spool = self.root / "spool"
        for d in (state, spool, spool / "n1", spool / "n2"):
            d.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""\
ClusterName=orchestrator-test
SlurmctldHost={host}
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
MpiDefault=none
StateSaveLocation={state}
SlurmdSpoolDir={spool}/%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/slurmctld.log
SlurmdLogFile={self.root}/slurmd-%n.log
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
KillWait=30
MinJobAge=3600
InactiveLimit=0
NodeName=n[1-2] NodeHostname={host} NodeAddr=127.0.0.1 CPUs=1 RealMemory=10000 Port=17001-17002 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    def _start_munge(self) -> None:
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True)
            key.write_bytes(os.urandom(1024))
            shutil.chown(key, "munge", "munge")
            key.chmod(0o400)
        run_dir = Path("/run/munge")
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(run_dir, "munge", "munge")
        if _run(["munge", "-n"]).returncode == 0:
            return  # already running
        out = _run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"])
        if out.returncode != 0:
            raise SlurmUnavailable(f"munged did not start: {out.stderr.strip()}")

    def start(self) -> "LocalSlurm":
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting Slurm daemons needs root")
        ensure_installed()
        self._write_conf()
        self._start_munge()
        for cmd, pid in (
            (["slurmctld"], "slurmctld.pid"),
            (["slurmd", "-N", "n1"], "slurmd-n1.pid"),
            (["slurmd", "-N", "n2"], "slurmd-n2.pid"),
        ):
            out = _run(cmd, env=self.env)
            if out.returncode != 0:
                self.stop()
                raise SlurmUnavailable(f"{' '.join(cmd)} failed: {out.stderr.strip()}")
            self.pids.append(self.root / pid)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.nodes_idle():
                return self
            time.sleep(1)
        self.stop()
        out = _run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env)
        raise SlurmUnavailable(f"nodes never became idle: {out.stdout or out.stderr}")

    def stop(self) -> None:
        pids = []
        for pid_file in self.pids:
            try:
                pid = int(pid_file.read_text().strip())
                os.kill(pid, signal.SIGTERM)
                pids.append(pid)
            except (OSError, ValueError):
                pass
        deadline = time.time() + 15
        for pid in pids:  # wait, so the ports are free for the next cluster
            while time.time() < deadline:
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.2)
        self.pids = []

    # -- helpers for tests -------------------------------------------------------------
    def squeue_state(self, job_id: str) -> str:
        out = _run(["scontrol", "show", "job", job_id], env=self.env)
        for token in out.stdout.split():
            if token.startswith("JobState="):
                return token.split("=", 1)[1]
        return "UNKNOWN"

    def job_field(self, job_id: str, name: str) -> str:
        out = _run(["scontrol", "show", "job", job_id], env=self.env)
        for token in out.stdout.split():
            if token.startswith(name + "="):
                return token.split("=", 1)[1]
        return ""

    def nodes_idle(self) -> bool:
        out = _run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env)
        states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
        return states.get("n1") == "idle" and states.get("n2") == "idle"

    def controller_log(self, job_id: str) -> str:
        """slurmctld's lines about one job: what a failed test prints to say why."""
        path = self.root / "slurmctld.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return "\n--- slurmctld.log ---\n" + "\n".join(
            line for line in lines if f"JobId={job_id} " in line or f"job {job_id}" in line.lower()
        )[-3000:]

    def wait(self, job_id: str, states: set[str], timeout: float) -> str:
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            state = self.squeue_state(job_id)
            if state in states:
                return state
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {state} after {timeout} s")
