"""A small TCP proxy for fault tests: it sits between clients and a loopback server and
can cut a connection right after the server answered a chosen command, dropping the
reply, so the client sees a broken connection for a command the server did execute.
"""

from __future__ import annotations

import socket
import threading
from types import TracebackType

from tests.servers import free_port


class CuttingProxy:
    """Forwards 127.0.0.1:`port` to `target`; cuts `cuts` connections after the server
    answers a command whose name is `command` (a RESP bulk string), dropping the reply."""

    def __init__(self, target_port: int, command: bytes, cuts: int, every: int = 1) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._marker = b"$%d\r\n%s\r\n" % (len(command), command)
        self._left = cuts
        self._every = every  # cut one in `every` of the commands seen
        self._seen = 0
        self.cut = 0  # connections cut so far
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def url(self, db: int) -> str:
        """A Redis URL of database `db` through this proxy."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    def __enter__(self) -> CuttingProxy:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closed = True
        self._server.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            armed = threading.Event()
            threading.Thread(target=self._up, args=(client, upstream, armed), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, armed), daemon=True).start()

    def arm(self, cuts: int, every: int = 1) -> None:
        """Cut the next `cuts` of every `every`-th chosen command from now on."""
        with self._lock:
            self._left, self._every, self._seen = cuts, every, 0

    def _should_cut(self) -> bool:
        with self._lock:
            if self._left <= 0:
                return False
            self._seen += 1
            if self._seen % self._every:
                return False
            self._left -= 1
            return True

    def _up(self, client: socket.socket, upstream: socket.socket, armed: threading.Event) -> None:
        """Client to server: forward; arm the cut when the chosen command goes by."""
        try:
            while data := client.recv(65536):
                if self._marker in data and self._should_cut():
                    armed.set()
                upstream.sendall(data)
        except OSError:
            pass
        _close(client, upstream)

    def _down(self, upstream: socket.socket, client: socket.socket, armed: threading.Event) -> None:
        """Server to client: forward; when armed, read the reply and drop it with the
        connection (the server executed the command; the client never hears of it)."""
        try:
            while data := upstream.recv(65536):
                if armed.is_set():
                    with self._lock:
                        self.cut += 1
                    break
                client.sendall(data)
        except OSError:
            pass
        _close(client, upstream)


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
