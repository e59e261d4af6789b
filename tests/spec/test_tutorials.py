"""The scenarios of the tutorials our users read, with hand-written expectations.

Each scenario lives in tests/spec/scenarios/<name>.yaml (manifests + tables, see the README
there) and runs against both the reference evaluator and netfence (`engine` fixture).
"""
from __future__ import annotations

from pathlib import Path

import yaml

from reference.engines import assert_reachability, engine  # noqa: F401  (engine is a fixture)

SCENARIOS = Path(__file__).parent / "scenarios"


def run_scenario(engine, name: str) -> None:
    scenario = yaml.safe_load((SCENARIOS / f"{name}.yaml").read_text())
    assert scenario["probes"], f"{name}: no probes"
    for probe in scenario["probes"]:
        assert_reachability(engine, scenario["objects"], probe["probe"], probe["expect"])


def test_tutorial_default_deny_ingress_for_backend(engine):
    run_scenario(engine, "default-deny-ingress-backend")


def test_tutorial_allow_frontend_to_backend_on_port_80(engine):
    run_scenario(engine, "allow-frontend-to-backend-port-80")


def test_tutorial_allow_two_apps_to_database(engine):
    run_scenario(engine, "allow-app-to-database")


def test_tutorial_allow_from_pods_with_a_label(engine):
    run_scenario(engine, "allow-from-pods-with-label")


def test_tutorial_allow_from_a_namespace_by_label(engine):
    run_scenario(engine, "allow-from-namespace-by-label")


def test_tutorial_deny_egress_except_dns_to_kube_dns(engine):
    run_scenario(engine, "deny-egress-except-dns-to-kube-dns")


def test_tutorial_deny_all_egress_except_dns(engine):
    run_scenario(engine, "deny-all-egress-except-dns")


def test_tutorial_frontend_backend_with_egress_and_dns(engine):
    run_scenario(engine, "frontend-backend-with-egress")


def test_tutorial_ip_block_with_except(engine):
    run_scenario(engine, "ip-block-with-except")


def test_tutorial_ingress_only_policy_does_not_block_egress(engine):
    run_scenario(engine, "ingress-only-policy-does-not-block-egress")


def test_tutorial_default_deny_all(engine):
    run_scenario(engine, "default-deny-all")


def test_every_scenario_file_has_a_test():
    source = Path(__file__).read_text()
    unused = [p.stem for p in SCENARIOS.glob("*.yaml") if f'"{p.stem}"' not in source]
    assert not unused, f"scenario files without a test: {unused}"


def test_scenario_manifests_are_valid_kubernetes_objects():
    import kubernetes_validate

    for path in sorted(SCENARIOS.glob("*.yaml")):
        for obj in yaml.safe_load(path.read_text())["objects"]:
            kubernetes_validate.validate(obj, "1.30", strict=True)
