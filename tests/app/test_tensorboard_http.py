"""A real `tensorboard --logdir` server serves the scalar tags of a run over its HTTP API."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from _train_utils import TINY, compose_cfg, env

from metagrad.train import train


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
        return None


def test_tensorboard_serves_the_runs_scalar_tags(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train(compose_cfg(*TINY), run_dir=run_dir)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(run_dir)]
        + ["--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}/data/plugin/scalars/tags"
    tags: set[str] = set()
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and server.poll() is None:
            runs = _get(url) or {}
            tags = {tag for run in runs.values() for tag in run}
            if "outer/loss" in tags and "val/accuracy" in tags:
                break
            time.sleep(0.5)
        assert server.poll() is None, server.stderr.read().decode()[-2000:]
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=15)
        server.stderr.close()
    expected = {"outer/loss", "inner/loss", "hypergrad/norm", "val/loss", "val/accuracy"}
    expected |= {"meta/momentum", "meta/lr/0.weight"}  # TINY learns them
    assert expected <= tags, expected - tags
