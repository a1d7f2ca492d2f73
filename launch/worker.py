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
    import yaml

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m launch.worker RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(args[0])
    rank = int(os.environ.get("RANK", 0))
    _setup_logging(rank)
    from orchestrator.config import from_container
    from orchestrator.checkpoint import CheckpointWriteError
    from orchestrator.data import DataError
    from orchestrator.train import NonFiniteError, run

    cfg = from_container(yaml.safe_load((run_dir / "config.yaml").read_text()))
    try:
        run(cfg, run_dir)
    except DataError as exc:
        print(f"rank {rank}: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteError as exc:
        print(f"rank {rank}: error: {exc}", file=sys.stderr)
        return 3
    except CheckpointWriteError as exc:  # every rank raises it together: one line for the event
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 4
    except Exception as exc:
        import traceback

        from orchestrator.distributed import describe_failure

        traceback.print_exc()
        timeout = getattr(cfg.launcher, "dist_timeout_s", 600)
        print(f"error: {describe_failure(exc, rank, timeout)}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    # Everything is written and the process group is gone: skip interpreter teardown, where
    # native libraries (DeepSpeed ZeRO-3 threads, FACTS.md) occasionally abort a finished run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
