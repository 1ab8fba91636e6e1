"""The service run as a real process (python -m service), for tests that kill or scale it."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp

from service.embedded_db import free_port

ROOT = Path(__file__).resolve().parent.parent


class ServiceProcess:
    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.env = {**os.environ, **env, "EXPORT_PORT": str(self.port)}
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"
        self.instance: str | None = None

    async def start(self) -> "ServiceProcess":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                assert self.proc.poll() is None, self.proc.stderr.read().decode() if self.proc.stderr else ""
                try:
                    async with http.get(self.url + "/healthz") as resp:
                        if resp.status == 200:
                            self.instance = (await resp.json())["instance"]
                            return self
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError("service did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
