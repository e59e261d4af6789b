"""`netfence controller` as a process: JSON logs, kopf's liveness endpoint, readiness, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from controller.harness import node, pod, policy, wait_for

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def test_controller_process(api_server, kubeconfig, tmp_path):
    api_server.apply(node("n1", "10.244.1.0/24", "172.18.0.2"))
    api_server.apply(pod("default", "web", "n1", "10.244.1.10", {"app": "web"}))
    api_server.apply(policy("default", "deny", {"podSelector": {}, "policyTypes": ["Ingress"]}))
    metrics_port, health_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT / "agent")])}
    stderr = (tmp_path / "stderr").open("w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "netfence_operator", "controller", "--kubeconfig", kubeconfig,
         "--metrics-bind-address", f"127.0.0.1:{metrics_port}", "--health-bind-address", f"127.0.0.1:{health_port}"],
        env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_for(lambda: api_server.get("noderulesets", "n1"), timeout=30, what="the NodeRuleSet")
        wait_for(lambda: get(f"http://127.0.0.1:{metrics_port}/readyz")[0] == 200, what="readiness")
        status, body = wait_for(lambda: (r := get(f"http://127.0.0.1:{health_port}/healthz"))[0] and r, what="liveness")
        assert status == 200 and json.loads(body)["publisher"]["synced"] is True
        assert "netfence_controller_rulesets_published_total" in get(f"http://127.0.0.1:{metrics_port}/metrics")[1]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(30)
        finally:
            if process.poll() is None:
                process.kill()
    stderr.seek(0)
    lines = [line for line in stderr.read().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is a JSON object
    assert any("create NodeRuleSet n1" in r.get("message", "") for r in records)
    assert code == 0
