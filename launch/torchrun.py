"""``python -m launch.torchrun``: torchrun, ending in one line and an exit code instead of a
stack trace, both when a rank failed and when it was told to stop.

- A failed rank: ``python -m torch.distributed.run`` raises ChildFailedError out of its main,
  ~30 lines of traceback and failure table after the rank has already said, in one line, what
  went wrong (a full disk, a non-finite loss, bad data). This returns the first failed rank's
  exit code, with one line only where the rank could not speak for itself (killed by a signal).
- Told to stop: torchrun turns SIGTERM/SIGINT/SIGHUP into ``SignalException`` after forwarding
  the signal to the ranks and re-raises it, so a ``scancel`` (SIGTERM to every process of the
  job) ended the job's log with a traceback although the ranks stopped cleanly at a checkpoint.
  This prints one line and exits 128 + the signal number, as a shell would.

Usage is torchrun's own: ``python -m launch.torchrun [torchrun options] -m launch.worker RUN_DIR``.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional, Sequence


class _DropFailedLine(logging.Filter):
    """torchrun logs "failed (exitcode: N) local_rank: ..." before raising; the exit code and,
    for a signal, this module's own line say the same."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("failed (exitcode")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_DropFailedLine())
    try:
        torchrun_main(list(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode < 0:
            print(f"error: rank {rank} (pid {failure.pid}) was killed by {failure.signal_name()}",
                  file=sys.stderr, flush=True)
            return 128 - failure.exitcode
        return failure.exitcode
    except SignalException as exc:
        print(f"torchrun: {exc.sigval.name}: the ranks were asked to stop", file=sys.stderr, flush=True)
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
