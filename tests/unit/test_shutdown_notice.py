"""The stop notice's words (issue 16) and the grace period the server is given."""

from types import SimpleNamespace

import pytest

from kubegate.core.server import request_kind, shutdown_notice, uvicorn_config


@pytest.mark.parametrize(
    ("scope", "kind"),
    [
        ({"type": "http", "path": "/k8s/c/api/v1/namespaces/p/pods", "query_string": b"watch=true"}, "watch"),
        ({"type": "http", "path": "/k8s/c/api/v1/pods", "query_string": b"limit=5&watch=1"}, "watch"),
        ({"type": "http", "path": "/k8s/c/api/v1/watch/namespaces/p/pods", "query_string": b""}, "watch"),
        (
            {
                "type": "http",
                "path": "/k8s/c/api/v1/namespaces/p/pods/web/log",
                "query_string": b"follow=true",
            },
            "logs -f",
        ),
        ({"type": "http", "path": "/k8s/c/api/v1/namespaces/p/pods/web/log", "query_string": b""}, "request"),
        ({"type": "http", "path": "/k8s/c/api/v1/pods", "query_string": b"watch=false"}, "request"),
        (
            {"type": "websocket", "path": "/k8s/c/api/v1/namespaces/p/pods/web/exec", "query_string": b""},
            "exec",
        ),
        ({"type": "websocket", "path": "/k8s/c/api/v1/namespaces/p/pods/web/attach"}, "attach"),
        ({"type": "websocket", "path": "/k8s/c/api/v1/namespaces/p/pods/web/portforward"}, "port-forward"),
        ({"type": "websocket", "path": "/agents/tunnel"}, "session"),
    ],
)
def test_request_kind(scope, kind):
    assert request_kind(scope) == kind


def test_notice_names_what_it_waits_for_and_what_it_closes():
    kinds = ["watch", "exec", "watch", "logs -f", "port-forward"]
    assert shutdown_notice(kinds, 30, uvicorn=True) == (
        "stopping: waiting up to 30 s for 3 open requests (1 logs -f, 2 watch) to end; "
        "closing 2 open sessions (1 exec, 1 port-forward); Ctrl-C again to stop now"
    )
    # Sessions alone: nothing to wait for, no hint.
    assert shutdown_notice(["exec"], 30, uvicorn=True) == "stopping: closing 1 open session (1 exec)"
    assert shutdown_notice([], 30, uvicorn=True) == "stopping (no open requests)"
    # Hypercorn waits for every connection, and a second signal does not cut the wait short.
    assert shutdown_notice(["exec", "watch"], 2.5, uvicorn=False) == (
        "stopping: waiting up to 2.5 s for 2 open requests (1 exec, 1 watch) to end"
    )


@pytest.mark.parametrize(("grace", "timeout"), [(0, 0), (0.5, 1), (30, 30), (2.2, 3)])
def test_grace_reaches_uvicorn_and_zero_means_now(grace, timeout):
    """`shutdown_grace_seconds: 0` (and anything below 1) used to become None: uvicorn then waits without end."""
    settings = SimpleNamespace(
        shutdown_grace_seconds=grace,
        listen="127.0.0.1:0",
        limits=SimpleNamespace(max_websocket_message_bytes=1),
    )
    config = uvicorn_config(SimpleNamespace(settings=settings), None, app=object())
    assert config.timeout_graceful_shutdown == timeout


async def test_a_request_whose_response_is_sent_is_not_counted_as_open():
    """The client has its whole response before the application returns; a stop signal it sends in that
    moment must not be told of "1 open request" (a race the e2e stop test once hit)."""
    seen_after_last_part: list[list[str]] = []

    async def application(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        seen_while_streaming = reloadable.open_kinds()
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        seen_after_last_part.append(seen_while_streaming)
        seen_after_last_part.append(reloadable.open_kinds())

    reloadable = bare_reloadable(application)

    scope = {"type": "http", "path": "/k8s/c/api/v1/pods", "query_string": b""}
    await reloadable(scope, None, discard)
    assert seen_after_last_part == [["request"], []]
    assert reloadable.open_requests == {}


async def test_a_response_whose_content_length_is_sent_is_not_counted_as_open():
    """Quart sends a body of known length with `more_body: True`, then an empty last part a step later:
    the client has it all at the first, so the request is done then."""
    seen: list[list[str]] = []

    async def application(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
        await send({"type": "http.response.body", "body": b"ok", "more_body": True})
        seen.append(reloadable.open_kinds())
        await send({"type": "http.response.body", "body": b"ok", "more_body": True})
        seen.append(reloadable.open_kinds())
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    reloadable = bare_reloadable(application)

    await reloadable({"type": "http", "path": "/healthz", "query_string": b""}, None, discard)
    assert seen == [["request"], []]


def bare_reloadable(application):
    """A Reloadable serving `application` (no gateway: only its bookkeeping of open requests is used)."""
    from kubegate.core.server import Reloadable

    reloadable = Reloadable.__new__(Reloadable)
    reloadable.current = application
    reloadable.inflight = {}
    reloadable.open_requests = {}
    return reloadable


async def discard(message):
    pass
