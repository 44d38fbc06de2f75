"""The liveness and readiness endpoint, `/healthz`: answered by a standby and by the leader alike."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Check = Callable[[], str | None]
"""Returns None when healthy, else what is wrong (answered with a 500)."""


def _handler(check: Check, healthy: str) -> type[BaseHTTPRequestHandler]:
    class Healthz(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/healthz":
                self.send_response(404)
                self.end_headers()
                return
            problem = check()
            self.send_response(500 if problem else 200)
            self.end_headers()
            self.wfile.write(f"{problem or healthy}\n".encode())

        def log_message(self, format: str, *args: object) -> None:
            """Probes every few seconds are not worth a log line."""

    return Healthz


@contextlib.contextmanager
def serve_health(port: int, healthy: str, check: Check = lambda: None) -> Iterator[None]:
    """Answer /healthz on `port` until the block ends; port 0 serves nothing."""
    if not port:
        yield
        return
    # Probes come from the kubelet, not loopback.
    server = ThreadingHTTPServer(("0.0.0.0", port), _handler(check, healthy))
    thread = threading.Thread(target=server.serve_forever, name="healthz", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
