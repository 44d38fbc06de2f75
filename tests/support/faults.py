"""A TCP proxy in front of a real server that fails on purpose: the network faults downloads must survive.

The client talks to the proxy's address; bytes pass through to the real server unchanged (an S3 request's
signature covers the Host header the client sent, which the proxy keeps), except for the connections the
proxy was told to break:

- `reset(n)`: the next n connections are reset at once (RST, as a dropped connection or a restarting load
  balancer does);
- `unavailable(n)`: the next n connections get `HTTP 503 SlowDown` (S3's throttling answer) to their first
  request, as an overloaded endpoint gives;
- n = None: every connection, until told otherwise.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator

SLOW_DOWN = b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
SLOW_DOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FaultyProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._lock = threading.Lock()
        self._fault: str | None = None
        self._left: int | None = 0
        self.connections = 0
        self.broken = 0
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self, count: int | None) -> None:
        self._set("reset", count)

    def unavailable(self, count: int | None) -> None:
        self._set("unavailable", count)

    def heal(self) -> None:
        self._set(None, 0)

    def _set(self, fault: str | None, count: int | None) -> None:
        with self._lock:
            self._fault, self._left = fault, count

    def _next_fault(self) -> str | None:
        with self._lock:
            self.connections += 1
            if self._fault is None or self._left == 0:
                return None
            if self._left is not None:
                self._left -= 1
            self.broken += 1
            return self._fault

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        fault = self._next_fault()
        if fault == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            return
        if fault == "unavailable":
            with contextlib.suppress(OSError):
                conn.recv(65536)
                conn.sendall(SLOW_DOWN % (len(SLOW_DOWN_BODY), SLOW_DOWN_BODY))
            conn.close()
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=30)
        except OSError:
            conn.close()
            return
        for source, target in ((conn, upstream), (upstream, conn)):
            threading.Thread(target=self._pipe, args=(source, target), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._server.close()


@contextlib.contextmanager
def faulty_proxy(endpoint: str) -> Iterator[FaultyProxy]:
    """A FaultyProxy in front of `http://host:port`."""
    host, port = endpoint.removeprefix("http://").rsplit(":", 1)
    proxy = FaultyProxy(host, int(port))
    try:
        yield proxy
    finally:
        proxy.close()
