"""Loopback stand-ins for a W&B server that cannot be reached: a closed port, and a socket
that accepts connections and never answers. Used by the tests and benchmarks/wandb_startup.py;
nothing leaves the machine."""

from __future__ import annotations

import socket
import threading


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SilentServer:
    """Accepts connections on loopback and never answers (a firewall or a hung proxy).
    With ``answer_probe``, it answers a ``HEAD`` (so the probe passes) and hangs on the rest,
    as a server that is up but cannot serve W&B's API would."""

    def __init__(self, answer_probe: bool = False):
        self.answer_probe = answer_probe
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.5)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.held.append(conn)
            if self.answer_probe:
                conn.settimeout(5)
                try:
                    if conn.recv(4096).startswith(b"HEAD"):
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass

    def __enter__(self) -> "SilentServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join(5)
        for conn in self.held:
            conn.close()
        self.sock.close()
