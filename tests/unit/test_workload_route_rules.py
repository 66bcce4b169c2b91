"""The rules for routes that reach containers or change workloads match the requests clients really send,
read by the gateway as the API server reads them: the demo's prod policy and docs/policy.md's examples hold
each of them (a rule written for the wrong verb or resource name would let the request through)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from kubegate.core.flow import Identity
from kubegate.plugins.policy import PolicySettings, evaluate
from kubegate.plugins.policy_check import build_request
from kubegate.sandbox.demo import DEMO_POLICY

ALICE = Identity(user="alice", groups=("developers",), method="static-tokens")
NS = "/api/v1/namespaces/prod"
APPS = "/apis/apps/v1/namespaces/prod"
# (HTTP method, path, the rule of the demo that holds it)
ROUTES = [
    ("POST", f"{NS}/pods/web/eviction", "evictions-in-prod"),  # kubectl drain, EvictV1
    ("PATCH", f"{NS}/pods/web/ephemeralcontainers", "debug-containers-in-prod"),  # kubectl debug
    ("PUT", f"{NS}/pods/web/ephemeralcontainers", "debug-containers-in-prod"),
    ("GET", f"{NS}/pods/web/proxy/", "reach-prod-containers"),  # kubectl get --raw
    ("GET", f"{NS}/pods/web:8080/proxy/metrics?x=1", "reach-prod-containers"),
    ("GET", f"{NS}/pods/https:web:8443/proxy", "reach-prod-containers"),
    ("POST", f"{NS}/pods/web/proxy/admin/shutdown", "reach-prod-containers"),
    ("DELETE", f"{NS}/pods/web/proxy/cache", "deletes-in-prod"),  # a proxied DELETE is a delete
    ("GET", f"{NS}/services/web:http/proxy/", "reach-prod-containers"),
    ("PUT", f"{NS}/services/web/proxy/config", "reach-prod-containers"),
    ("GET", f"{NS}/pods/web/portforward", "reach-prod-containers"),  # WebSocket
    ("POST", f"{NS}/pods/web/portforward", "reach-prod-containers"),  # SPDY
    ("PATCH", f"{APPS}/deployments/web/scale", "scaling-in-prod"),  # kubectl scale
    ("PUT", f"{APPS}/statefulsets/db/scale", "scaling-in-prod"),
    ("PATCH", f"{APPS}/replicasets/web-5d4f/scale", "scaling-in-prod"),
]


def documented() -> PolicySettings:
    text = (Path(__file__).resolve().parents[2] / "docs" / "policy.md").read_text()
    section = text[text.index("## Examples: routes that reach containers or change workloads") :]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block is not None
    return PolicySettings.model_validate({"default": "allow", **yaml.safe_load(block.group(1))})


@pytest.mark.parametrize(("method", "path", "rule"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_the_demo_holds_each_route_in_prod(method, path, rule):
    outcome = evaluate(PolicySettings.model_validate(DEMO_POLICY), build_request(ALICE, [method, path], None))
    assert (outcome.action, outcome.rule and outcome.rule.name) == ("approve", rule), outcome.trace


@pytest.mark.parametrize(("method", "path", "rule"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_the_documented_rules_hold_each_route(method, path, rule):
    outcome = evaluate(documented(), build_request(ALICE, [method, path], None))
    assert outcome.action == "approve", outcome.trace


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", f"{APPS}/deployments/web/scale"), ("GET", f"{NS}/pods/web"), ("PATCH", f"{NS}/pods/web")],
)
def test_reads_of_scale_and_other_pod_requests_are_not_held(method, path):
    for settings in (PolicySettings.model_validate(DEMO_POLICY), documented()):
        assert evaluate(settings, build_request(ALICE, [method, path], None)).action == "allow"
