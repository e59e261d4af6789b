"""Run the real kopf controller in a thread against the fake API server, and build objects."""

from __future__ import annotations

import contextlib
import threading
import time
import urllib.request
from typing import Any, Callable, Iterator

from controller.fakeapi import FakeApiServer
from netfence_operator.controller import Controller, ControllerConfig

NRS_PATH = "/apis/netfence.io/v1alpha1/noderulesets"


@contextlib.contextmanager
def running_controller(kubeconfig: str, **config: Any) -> Iterator[Controller]:
    config.setdefault("metrics_bind_address", "127.0.0.1:0")
    config.setdefault("health_bind_address", None)
    config.setdefault("debounce", 0.05)
    config.setdefault("watch_server_timeout", 30)
    controller = Controller(ControllerConfig(kubeconfig=kubeconfig, **config))
    stop, ready = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            controller.run(stop_flag=stop, ready_flag=ready)
        except BaseException as e:  # noqa: BLE001 - surfaced to the test below
            errors.append(e)

    thread = threading.Thread(target=run, name="netfence-controller", daemon=True)
    thread.start()
    try:
        assert ready.wait(15), f"kopf did not start: {errors}"
        yield controller
    finally:
        stop.set()
        thread.join(20)
        assert not thread.is_alive(), "the controller did not stop"
    assert not errors, errors


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_synced(controller: Controller, timeout: float = 20.0) -> None:
    wait_for(lambda: controller.publisher.synced, timeout, what="the initial sync")


def settle(api: FakeApiServer, quiet: float = 1.0, timeout: float = 20.0) -> None:
    """Wait until the controller has written nothing for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    count, since = len(api.writes()), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = len(api.writes())
        if now != count:
            count, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
    raise AssertionError("the controller kept writing")


def metrics_text(controller: Controller) -> str:
    assert controller.metrics_server is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{controller.metrics_server.port}/metrics", timeout=5) as r:
        return r.read().decode()


# --------------------------------------------------------------------------- objects
def namespace(name: str, **labels: str) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def node(name: str, cidr: str, ip: str) -> dict:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


def pod(ns: str, name: str, node_name: str, ip: str | None, labels: dict | None = None, *,
        phase: str = "Running", ports: list[dict] | None = None, host_network: bool = False) -> dict:
    status: dict[str, Any] = {"phase": phase}
    if ip:
        status.update(podIP=ip, podIPs=[{"ip": ip}])
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
            "spec": {"nodeName": node_name, "hostNetwork": host_network,
                     "containers": [{"name": "main", "image": "example", "ports": ports or []}]},
            "status": status}


def policy(ns: str, name: str, spec: dict) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}
