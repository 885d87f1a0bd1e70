"""`dgpt serve` and a browser as subprocesses of a check or benchmark: start one, wait until it
answers, stop it however the block ends."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A currently free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, timeout: float, process: subprocess.Popen | None = None) -> Any:
    """The JSON at `url` once it answers; fails when `process` (the one that should answer) exits
    first, or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with code {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return json.load(response)
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout:.0f}s") from None
            time.sleep(0.2)


@contextlib.contextmanager
def running(command: list[str], log: Path | None = None) -> Iterator[subprocess.Popen]:
    """A subprocess for the duration of the block, its output in `log` (else discarded)."""
    with open(log, "w") if log is not None else contextlib.nullcontext(subprocess.DEVNULL) as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@contextlib.contextmanager
def started_server(model_dir: str | Path, extra_args: tuple[str, ...] = (), log: Path | None = None,
                   timeout: float = 120) -> Iterator[str]:
    """`dgpt serve MODEL_DIR` on a free loopback port for the duration of the block, once it
    answers /health; yields its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "flows.cli", "serve", str(model_dir), "--port", str(port), *extra_args]
    with running(command, log) as process:
        url = f"http://127.0.0.1:{port}"
        wait_for(url + "/health", timeout, process)
        yield url
