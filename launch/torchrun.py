"""torchrun, with a failed group ending in its rank's exit code instead of a stack trace.

``python -m torch.distributed.run`` reports any failed rank by raising ChildFailedError out of
its main: ~30 lines of traceback and failure table after the rank has already said, in one
line, what went wrong (a full disk, a non-finite loss, bad data). This runs the same torchrun
in the same way and turns that exception into the first failed rank's exit code, with one line
only where the rank could not speak for itself (killed by a signal).

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
