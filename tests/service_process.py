"""The service run as a real process (python -m service), for tests that kill or scale it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO

import aiohttp

from service.embedded_db import free_port

from conftest import until

ROOT = Path(__file__).resolve().parent.parent
LOG_TAIL_BYTES = 4000


class ServiceProcess:
    """Its stderr goes to a file, never an unread pipe (a chatty service would block once the pipe is full);
    the log's tail is in the error when the service does not start, and printed when it stops (pytest shows
    that for a failed test)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.env = {**os.environ, **env, "EXPORT_PORT": str(self.port)}
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"
        self.instance: str | None = None
        # Beside the exports, in the test's own temporary directory when it gives one.
        log_dir = Path(env["EXPORT_DIR"]).parent if env.get("EXPORT_DIR") else Path(tempfile.gettempdir())
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"service-{self.port}.log"
        self.log: IO[bytes] | None = None

    async def start(self) -> "ServiceProcess":
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=self.log)
        try:
            async with aiohttp.ClientSession() as http:
                await until(lambda: self._started(http), f"the service on port {self.port} to answer /healthz", timeout=30, interval=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; its log ends:\n{self.log_tail()}") from None
        return self

    async def _started(self, http: aiohttp.ClientSession) -> bool:
        assert self.proc is not None
        assert self.proc.poll() is None, f"the service exited with {self.proc.returncode}"
        try:
            async with http.get(self.url + "/healthz") as resp:
                if resp.status == 200:
                    self.instance = (await resp.json())["instance"]
                    return True
        except aiohttp.ClientError:
            pass
        return False

    def log_tail(self) -> str:
        data = self.log_path.read_bytes() if self.log_path.exists() else b""
        return data[-LOG_TAIL_BYTES:].decode("utf-8", "replace")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._close_log()

    def stop(self, grace: float = 15) -> None:
        """SIGTERM, and SIGKILL after grace seconds, as a container runtime stops a container."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._close_log()

    def _close_log(self) -> None:
        """Close the log and print its tail, which pytest shows when the test fails."""
        if self.log is not None:
            self.log.close()
            self.log = None
            print(f"--- {self.log_path} ends:\n{self.log_tail()}", file=sys.stderr)
