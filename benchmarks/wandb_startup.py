"""How long rank 0's W&B start-up takes when the server cannot be reached (issue #18).

Each measurement is a fresh process that builds the W&B sink exactly as rank 0 does
(``orchestrator.wandb_sink.WandbSink``), timed from the call to its return; wandb is imported
before the clock starts (an import every run pays anyway). Cases, side by side in one run:

- ``offline``: no key, an offline run: the baseline every run pays.
- ``closed-port``: a key and ``WANDB_BASE_URL`` at a closed loopback port.
- ``silent``: a key and a loopback server that accepts and never answers.
- ``hangs-after-probe``: a key and a server that answers the probe, then never answers W&B's
  API: ``wandb.init`` waits ``logger.wandb.init_timeout_s`` (20 s).
- ``wandb-default`` (with ``--before``): plain ``wandb.init(mode="online")`` against the closed
  port, wandb's defaults, as the code before issue #18 called it: it raises after ~90 s.

    python benchmarks/wandb_startup.py [--reps 3] [--before]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

KEY = "local-" + "0" * 40


def _one(case: str) -> None:
    """Child process: build the sink once, print the seconds it took (or the error)."""
    import wandb

    from orchestrator.config import WandbConfig
    from orchestrator.wandb_sink import WandbSink

    run_dir = Path(tempfile.mkdtemp(prefix="wandb-startup-"))
    t0 = time.monotonic()
    try:
        if case == "wandb-default":
            wandb.init(project="p", dir=str(run_dir), mode="online", resume="allow", id="bench001",
                       settings=wandb.Settings(silent=True, x_disable_stats=True)).finish()
        else:
            WandbSink(WandbConfig(enabled=True, mode="offline" if case == "offline" else "auto"),
                      run_dir, {}).close()
        print(f"{time.monotonic() - t0:.2f}")
    except Exception as exc:
        print(f"{time.monotonic() - t0:.2f} raised {type(exc).__name__}")


def main() -> None:
    from loopback import SilentServer, closed_port

    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--before", action="store_true", help="also time wandb's own default (~90 s)")
    args = parser.parse_args()
    closed = f"http://127.0.0.1:{closed_port()}"
    cases = ["offline", "closed-port", "silent", "hangs-after-probe"] + (["wandb-default"] if args.before else [])
    times: dict[str, list[str]] = {case: [] for case in cases}
    with SilentServer() as silent, SilentServer(answer_probe=True) as hangs:
        urls = {"closed-port": closed, "silent": silent.url, "hangs-after-probe": hangs.url,
                "wandb-default": closed, "offline": closed}
        for _ in range(args.reps):
            for case in cases:
                env = {**os.environ, "WANDB_BASE_URL": urls[case], "WANDB_SILENT": "true"}
                env.pop("WANDB_MODE", None)
                if case == "offline":
                    env.pop("WANDB_API_KEY", None)
                else:
                    env["WANDB_API_KEY"] = KEY
                proc = subprocess.run([sys.executable, __file__, "--one", case], cwd=ROOT, env=env,
                                      capture_output=True, text=True, timeout=300)
                times[case].append(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip()
                                   else f"failed: {proc.stderr.strip().splitlines()[-1:]}")
    base = statistics.median(float(t.split()[0]) for t in times["offline"])
    print("| case | start-up (s), each run | median | extra over offline |")
    print("| --- | --- | --- | --- |")
    for case, runs in times.items():
        med = statistics.median(float(t.split()[0]) for t in runs)
        print(f"| {case} | {', '.join(runs)} | {med:.1f} | {med - base:+.1f} |")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        _one(sys.argv[2])
    else:
        main()
