"""A real ``retrieval serve`` process on a loopback port, for the tests that need one: started with
the same Python, waited for until ready, stopped with SIGTERM (and killed if it will not go)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    def __init__(self, index: Path, *options: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        script = Path(sys.executable).parent / "retrieval"
        command = [str(script), "serve", "--index", str(index), "--port", str(self.port), "--device", "cpu"]
        self.log = log
        self._log = log.open("w")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "RETRIEVAL_API_KEY": ""}
        self.process = subprocess.Popen(
            [*command, *options], stdout=self._log, stderr=subprocess.STDOUT, env=env
        )

    def wait_ready(self, seconds: float = 120.0) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"the service exited ({self.process.returncode}): {self.log.read_text()}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the service was not ready in {seconds:.0f} s: {self.log.read_text()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
