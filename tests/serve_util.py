"""Starting `llama-jax serve` as a subprocess on a free loopback port, for the serve tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args: list[str], log_path: Path, timeout_s: float = 600, api_key: str | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("XLA_FLAGS", None)  # one CPU device, as a user's server
        env["JAX_LOG_COMPILES"] = "1"  # every compilation is logged: none may happen after start-up
        self.log_path = log_path
        self.log = open(log_path, "w")
        cmd = [sys.executable, "-m", "llama_jax.cli", "serve", "--port", str(self.port), *args]
        if api_key:
            cmd += ["--api-key", api_key]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        deadline = time.monotonic() + timeout_s
        while True:  # bounded wait for the first answer (load + warm-up compile)
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"serve did not answer within {timeout_s} s:\n{self.output()}")
            time.sleep(0.5)

    def output(self, full: bool = False) -> str:
        self.log.flush()
        text = self.log_path.read_text()
        return text if full else text[-4000:]

    def health(self) -> dict:
        return httpx.get(self.base + "/health", timeout=10).json()

    def post(self, path: str, json=None, content=None, headers=None, timeout=120):
        h = dict(self.headers, **(headers or {}))
        return httpx.post(self.base + path, json=json, content=content, headers=h, timeout=timeout)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
