"""A TCP proxy in front of PostgreSQL that fails a connection as a transaction is sent.

Armed with a marker (bytes of a statement's parameters), it fails the connection of
the next transaction that carries it: it loses the server's reply once the transaction
committed, closes the connection at once, or has the server end its process, as a
network that fails at that moment, or a restart, would. The client cannot tell whether
its change was written.
"""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

#: The server's ReadyForQuery message with the transaction status "idle": the
#: statement, or the transaction it ended, has committed (or rolled back).
_IDLE = b"Z\x00\x00\x00\x05I"
#: The start of the server's BackendKeyData message, which names its process.
_BACKEND_KEY = b"K\x00\x00\x00\x0c"
#: The ways :meth:`LosingProxy.fail_next` fails a connection.
HOWS = ("on commit", "at once", "terminate")


class LosingProxy:
    """Forwards connections to ``upstream``; :meth:`fail_next` arms it once."""

    def __init__(self, upstream: tuple[str, int], admin: sa.Engine) -> None:
        self.upstream = upstream
        #: An engine to the database, not through the proxy, to end a server process with.
        self.admin = admin
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        self._marker: bytes | None = None
        self._how = HOWS[0]
        self._refuse = self._refusing = 0
        #: How many connections it failed.
        self.failed = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def fail_next(self, marker: str | bytes, how: str = "on commit", *, refuse: int = 0) -> None:
        """Fail the connection of the next transaction whose statements carry ``marker``:
        ``"on commit"`` loses the server's reply once the transaction committed; ``"at
        once"`` closes the connection as soon as they are passed on, whatever the server
        then does with them; ``"terminate"`` has the server end its process then. The
        ``refuse`` connections opened next after that are closed at once."""
        assert how in HOWS
        with self._lock:
            self._marker = marker.encode() if isinstance(marker, str) else marker
            self._how = how
            self._refuse = refuse

    def _take(self, data: bytes) -> str | None:
        """How to fail the connection if ``data`` carries the marker, else ``None``."""
        with self._lock:
            if self._marker is None or self._marker not in data:
                return None
            self._marker = None
            self.failed += 1
            self._refusing = self._refuse
            return self._how

    def _refused(self) -> bool:
        with self._lock:
            if self._refusing <= 0:
                return False
            self._refusing -= 1
            return True

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self._refused():
                client.close()
                continue
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pipe, args=(client, server), daemon=True).start()

    def _pipe(self, client: socket.socket, server: socket.socket) -> None:
        failing: str | None = None
        backend_pid: int | None = None
        try:
            while True:
                ready, _, _ = select.select([client, server], [], [])
                for end in ready:
                    data = end.recv(65536)
                    if not data:
                        return
                    if end is client:
                        failing = failing or self._take(data)
                        server.sendall(data)
                        if failing == "at once":
                            return
                        if failing == "terminate" and backend_pid is not None:
                            failing = None
                            self._terminate(backend_pid)
                        continue
                    if backend_pid is None and (key := data.find(_BACKEND_KEY)) >= 0:
                        start = key + len(_BACKEND_KEY)
                        backend_pid = int.from_bytes(data[start : start + 4], "big")
                    if failing == "on commit" and _IDLE in data:
                        return  # committed: its answer never arrives
                    client.sendall(data)
        except OSError:
            return
        finally:
            client.close()
            server.close()

    def _terminate(self, pid: int) -> None:
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")

    def close(self) -> None:
        self.listener.close()


@contextmanager
def losing_proxy(database_uri: str) -> Iterator[tuple[LosingProxy, str]]:
    """A proxy to the database of ``database_uri``, and the URI that goes through it."""
    url = sa.make_url(database_uri)
    admin = sa.create_engine(url, poolclass=sa.NullPool, isolation_level="AUTOCOMMIT")
    proxy = LosingProxy((url.host or "127.0.0.1", url.port or 5432), admin)
    try:
        yield proxy, url.set(port=proxy.port).render_as_string(hide_password=False)
    finally:
        proxy.close()
        admin.dispose()
