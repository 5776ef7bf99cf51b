"""The real sandboxd binary and engine for the client's tests: one server per test session,
on its own instance label, test network and directories; everything it started is removed
at the end. Needs what scripts/test.sh provisions (engine, test image, test network)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[3]
TOKEN = "client-" + uuid.uuid4().hex


@dataclass
class Server:
    url: str
    token: str
    volume: str
    instance: str
    log: Path

    def new_chat(self) -> str:
        return str(uuid.uuid4())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    binary = Path(os.environ.get("SANDBOXD_BIN", ROOT / "target" / "debug" / "sandboxd"))
    run = Path(tempfile.mkdtemp(prefix="sandboxd-pyclient-"))
    for d in ("chats", "deps", "tools", "volumes/v"):
        (run / d).mkdir(parents=True)
    port, instance = _free_port(), f"pyclient-{os.getpid()}"
    (run / "config.yaml").write_text(
        f"""http: {{host: 127.0.0.1, port: {port}}}
logging: {{level: WARNING}}
docker: {{pull_policy: never}}
sandbox: {{image: sandboxd/agent-busybox:latest, network_name: sandboxd-test, ttl_seconds: 300, chats_root: {run}/chats, dependencies_host_path: {run}/deps, lambda_tools_host_path: {run}/tools, allowed_volume_roots: [{run}/volumes], hibernate_stop_seconds: 1}}
security: {{api_token: {TOKEN}}}
database: {{path: {run}/sandboxd.db}}
controller: {{instance: {instance}, create_wait_seconds: 60, take_over_old_service: false}}
storage: {{root: {run}/storage, default_quota_bytes: 4194304, max_quota_bytes: 16777216}}
"""
    )
    log = run / "server.log"
    proc = subprocess.Popen(
        [str(binary), "serve", "--config", str(run / "config.yaml")],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(url + "/api/v1/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"sandboxd did not start: {log.read_text()}")
        time.sleep(0.1)
    try:
        yield Server(url, TOKEN, str(run / "volumes" / "v"), instance, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        ids = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label=sandboxd.instance={instance}"],
            capture_output=True,
            text=True,
        ).stdout.split()
        for cid in ids:
            subprocess.run(["docker", "rm", "-f", cid], capture_output=True)
        subprocess.run([str(ROOT / "scripts" / "egress-cleanup.sh"), instance], capture_output=True)
        mounts = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True).stdout.split()
        for target in sorted((t for t in mounts if t.startswith(str(run) + "/")), reverse=True):
            subprocess.run(["umount", "-l", target], capture_output=True)
        shutil.rmtree(run, ignore_errors=True)
