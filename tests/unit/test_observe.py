"""core/observe.py: each finished request is counted once, under its own labels (the per-label cache of the
request metrics keeps them apart)."""

from __future__ import annotations

from kubegate.core import observe
from kubegate.core.flow import Decision, Verdict
from kubegate.core.testing import make_flow


def sample(name: str, **labels: str) -> float:
    return observe.REGISTRY.get_sample_value(name, labels) or 0.0


def test_each_request_is_counted_once_under_its_own_labels():
    connection = "observe-labels"
    counts = ("200", "404", "403")

    def count(code: str, decision: str = "none") -> float:
        return sample(
            "kubegate_requests_total", connection=connection, verb="get", decision=decision, code=code
        )

    before = {code: count(code) for code in counts} | {"403": count("403", "deny")}
    latency_before = sample("kubegate_request_duration_seconds_count", connection=connection, verb="get")
    for status in (200, 200, 404):
        flow = make_flow("GET", "/api/v1/namespaces/prod/pods/web", connection=connection)
        flow.response.status = status
        observe.observe(flow)
    denied = make_flow("GET", "/api/v1/namespaces/prod/pods/web", connection=connection)
    denied.decision, denied.response.status = Decision(Verdict.DENY, "no"), 403
    observe.observe(denied)
    assert count("200") - before["200"] == 2
    assert count("404") - before["404"] == 1
    assert count("403", "deny") - before["403"] == 1
    assert count("403") == 0  # the denial is not counted as "none"
    latency = sample("kubegate_request_duration_seconds_count", connection=connection, verb="get")
    assert latency - latency_before == 4
