"""What every rank runs: read the frozen config from the run directory and train.

Ranks never compose Hydra configs (DESIGN.md): they rebuild the RunConfig from
``run_dir/config.yaml`` written by the launcher.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path


def _setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[%(asctime)s rank{rank}] %(message)s",
        datefmt="%H:%M:%S",
    )
    if rank != 0:
        warnings.filterwarnings("ignore")
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    for noisy in ("transformers", "bitsandbytes", "peft", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m launch.worker RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(args[0])
    rank = int(os.environ.get("RANK", 0))
    from orchestrator import rundir
    from orchestrator.preempt import install_signal_handlers

    install_signal_handlers()  # before the slow imports: Ctrl-C/SIGTERM now mean "stop cleanly"
    _setup_logging(rank)
    if rank == 0:
        try:
            lock = rundir.claim_for_rank(run_dir)  # noqa: F841 (held until this process exits)
        except rundir.RunDirBusy as exc:
            print(f"rank {rank}: error: {exc}", file=sys.stderr, flush=True)
            return 2
    from orchestrator.checkpoint import CheckpointWriteError
    from orchestrator.data import DataError
    from orchestrator.train import NonFiniteError, run

    cfg = rundir.frozen_config(run_dir)
    try:
        run(cfg, run_dir)
    except DataError as exc:
        return _failed(run_dir, f"rank {rank}: error: {exc}", 2)
    except NonFiniteError as exc:
        return _failed(run_dir, f"rank {rank}: error: {exc}", 3)
    except CheckpointWriteError as exc:  # every rank raises it together: one line for the event
        return _failed(run_dir, f"error: {exc}", 4, reason=exc.reason) if rank == 0 else 4
    except Exception as exc:
        import traceback

        from orchestrator.distributed import describe_failure

        traceback.print_exc()
        timeout = getattr(cfg.launcher, "dist_timeout_s", 600)
        return _failed(run_dir, f"error: {describe_failure(exc, rank, timeout)}", 1)
    return 0


def _failed(run_dir: Path, line: str, code: int, reason: str = "") -> int:
    from orchestrator import rundir

    print(line, file=sys.stderr, flush=True)
    rundir.write_state(run_dir, "failed", reason=reason or line.split("error: ", 1)[-1], exit_code=code)
    return code


if __name__ == "__main__":
    code = main()
    # Everything is written and the process group is gone: skip interpreter teardown, where
    # native libraries (DeepSpeed ZeRO-3 threads, FACTS.md) occasionally abort a finished run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
