"""``python -m launch.torchrun``: torchrun, without a traceback when it is told to stop.

torchrun turns SIGTERM/SIGINT/SIGHUP into ``SignalException`` after forwarding the signal to
the ranks; it then re-raises it, and a `scancel` (SIGTERM to every process of the job) ends the
job's log with a traceback, although the ranks stopped cleanly at a checkpoint. This prints one
line instead and exits 128 + the signal number, as a shell would.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main

if __name__ == "__main__":
    try:
        main()
    except SignalException as exc:
        print(f"torchrun: {exc.sigval.name}: the ranks were asked to stop", file=sys.stderr, flush=True)
        sys.exit(128 + int(exc.sigval))
