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

Usage is torchrun's own: ``python -m launch.torchrun [torchrun options] -m launch.worker RUN_DIR``,
or ``python -m launch.torchrun --await-command FD``: import torch first, then read the options,
the ranks' environment, stdout/stderr and the run lock's descriptor from the socket FD
(``launch.local.PendingAgent``); nothing sent (the launcher refused the run): exit 0.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from typing import Optional, Sequence


class _DropFailedLine(logging.Filter):
    """torchrun logs "failed (exitcode: N) local_rank: ..." before raising; the exit code and,
    for a signal, this module's own line say the same."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("failed (exitcode")


def _await_command(fd: int) -> Optional[list[str]]:
    """torchrun's arguments from the launcher, with the ranks' environment applied to this
    process (torchrun hands its own to the ranks), the launcher's stdout and stderr (or a
    sweep trial's log) made this process's, and the run lock's descriptor kept open."""
    import torch.distributed.run  # noqa: F401  the slow import, while the launcher checks

    with socket.socket(fileno=fd) as sock:
        first, fds, _, _ = socket.recv_fds(sock, 1, 16)
        if not first:
            return None
        for target, received in zip((1, 2), fds[:2]):
            os.dup2(received, target)
            os.close(received)
        chunks = [first]
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    command = json.loads(b"".join(chunks))
    os.environ.clear()
    os.environ.update(command["env"])
    return command["argv"]


def _preload_allocator() -> Optional[int]:
    """Start the ranks under the host allocator launcher.cpu_allocator asks for (its value in
    the environment; the launcher and the sbatch script set it): here, on the node, where it is
    known whether the ranks will have a GPU. Returns the exit code of a refusal, else None."""
    import torch

    from orchestrator import hostalloc

    try:
        hostalloc.preload(os.environ, os.environ.get(hostalloc.ENV, "auto"), torch.cuda.is_available())
    except hostalloc.AllocatorError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--await-command"]:
        argv = _await_command(int(argv[1]))
        if argv is None:
            return 0
    if (refused := _preload_allocator()) is not None:
        return refused
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_DropFailedLine())
    try:
        torchrun_main(argv)
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
