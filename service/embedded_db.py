"""The embedded MongoDB wire-protocol server (nx-27017 on SQLite), run as a child process.

Used when no EXPORT_MONGO_URL is given: for a first run, for the demo and for CI, where no mongod
can be installed. It binds a free loopback port and keeps its data in one file.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


class EmbeddedDbError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _server_command() -> list[str]:
    """nx-27017 under a guard that ends it with this process, however this process ends."""
    return [sys.executable, "-m", "service.embedded_guard", str(os.getpid())]


def _running(pid: int) -> bool:
    # A zombie has ended: it only waits for its parent to collect its exit status.
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class EmbeddedMongo:
    """One nx-27017 process: start() waits until it answers a TCP connect, stop() ends it."""

    def __init__(self, data_dir: Path, port: int | None = None, db_file: str = "export.db") -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.db_file = db_file
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / f"{self.db_file}.pid"

    def _stop_orphan(self) -> None:
        """A server still holding the data file (its guard ends it within a second of a killed service, and a restart
        can come sooner): end it before starting anew."""
        try:
            pid = int(self.pid_file.read_text().strip())
            cmdline = psutil.Process(pid).cmdline()
        except (OSError, ValueError, psutil.Error):
            return
        if "service.embedded_guard" in cmdline and str(self.data_dir / self.db_file) in cmdline:
            owner = int(cmdline[cmdline.index("service.embedded_guard") + 1])
            if owner != os.getpid() and _running(owner):  # another service's server, not one a killed service left
                raise EmbeddedDbError(f"the embedded database in {self.data_dir} is in use by process {owner}; stop that "
                                      "service, or give this one another EXPORT_EMBEDDED_DIR")
            log.warning("stopping the embedded database left running by a previous process (pid %d)", pid)
            os.kill(pid, signal.SIGKILL)
            for _ in range(50):
                if not _running(pid):
                    break
                time.sleep(0.1)

    def start(self, timeout: float = 30.0) -> "EmbeddedMongo":
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EmbeddedDbError(f"cannot keep the embedded database in {self.data_dir} (EXPORT_EMBEDDED_DIR): "
                                  f"{exc.strerror or exc}") from None
        self._stop_orphan()
        log_path = self.data_dir / f"nx-27017-{self.port}.log"
        cmd = _server_command() + [
            "--db", str(self.data_dir / self.db_file),
            "--host", "127.0.0.1",
            "-p", str(self.port),
            "--log-file", str(log_path),
            "--pid-file", str(self.data_dir / f"nx-27017-{self.port}.pid"),
        ]
        # The guard is a module of this package: the child finds it where this process found it, from any directory.
        package_root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env
        )
        self.pid_file.write_text(str(self.process.pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmbeddedDbError(f"embedded database exited with code {self.process.returncode}; see {log_path}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    log.info("embedded database listening on %s (data in %s)", self.url, self.data_dir)
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise EmbeddedDbError(f"embedded database did not start within {timeout:.0f}s; see {log_path}")

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def kill(self) -> None:
        """Stop it abruptly, as an outage would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=5)
        self.process = None

    def __enter__(self) -> "EmbeddedMongo":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
