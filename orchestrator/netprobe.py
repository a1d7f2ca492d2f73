"""Does an HTTP(S) server answer? A probe with a hard time limit.

Client libraries find out the slow way: W&B's ``init`` waits up to 90 s by default and then
raises, long after the model was loaded. This asks first, in a few seconds, so a caller can
refuse before launching (preflight) or choose an offline fallback at once (the W&B sink).

A server counts as reachable when it sends any bytes back to an HTTP request within the limit.
A closed port, a name that does not resolve, a route that drops packets and a server that
accepts connections and then never answers (a firewall, a hung proxy) all count as unreachable.
A proxy from the environment (``https_proxy`` and friends, with ``no_proxy``) is used the way
clients use it: then the proxy must answer a ``CONNECT``. Certificates are not checked: the
question is whether anything answers, not whether to trust it; the client decides that later.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request


def probe(url: str, timeout_s: float) -> str | None:
    """None when ``url``'s server answers within ``timeout_s``; else why not, in a few words.

    The work runs in a daemon thread so that name resolution, which no socket timeout covers,
    is bounded too.
    """
    result: list[str | None] = []
    deadline = time.monotonic() + timeout_s
    worker = threading.Thread(target=lambda: result.append(_probe(url, deadline)), daemon=True,
                              name="netprobe")
    worker.start()
    worker.join(timeout_s)
    if not result:
        return f"no answer within {timeout_s:g} s"
    return result[0]


def _probe(url: str, deadline: float) -> str | None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"not an http(s) URL: {url!r}"
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and urllib.request.proxy_bypass(host):
        proxy = None
    try:
        if proxy:
            p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            sock = _connect(p.hostname or "", p.port or 80, deadline)
            request = f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n"
        else:
            sock = _connect(host, port, deadline)
            if parts.scheme == "https":
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                sock = context.wrap_socket(sock, server_hostname=host)
            request = f"HEAD / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        with sock:
            _remaining(sock, deadline)
            sock.sendall(request.encode("ascii"))
            _remaining(sock, deadline)
            if not sock.recv(1):
                return "the server closed the connection without answering"
        return None
    except socket.gaierror as exc:
        return f"cannot resolve {host} ({exc.strerror or exc})"
    except ConnectionRefusedError:
        return "connection refused"
    except (socket.timeout, TimeoutError):
        return "no answer (timed out)"
    except ssl.SSLError as exc:
        return f"TLS handshake failed ({exc.reason or exc})"
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__


def _connect(host: str, port: int, deadline: float) -> socket.socket:
    return socket.create_connection((host, port), timeout=max(0.01, deadline - time.monotonic()))


def _remaining(sock: socket.socket, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    sock.settimeout(left)
