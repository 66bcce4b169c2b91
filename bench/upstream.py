"""A deliberately cheap stand-in Kubernetes API server for the benchmark (aiohttp + uvloop, HTTPS).

It answers only what the benchmark asks, from pre-encoded bytes, so that the numbers measure the proxies
in front of it rather than the upstream:

- ``GET /api/v1/namespaces/prod/pods/web``: one pod (about 2 KB of JSON);
- ``GET /api/v1/namespaces/prod/pods``: a PodList of 500 pods (about 1 MB);
- ``GET /api/v1/namespaces/prod/pods?watch=true``: one ADDED event, then the stream stays open (a BOOKMARK
  every 30 s) until the client leaves;
- ``GET /api/v1/namespaces/prod/pods/web/exec?command=head&command=-c&command=BYTES&stdout=true``: a
  WebSocket speaking ``v5.channel.k8s.io`` that writes BYTES of stdout (channel 1) as fast as the
  connection drains, in 32 KiB frames, then a channel-3 Success status, then closes.

Every request must carry ``Authorization: Bearer <token>`` (the token written to ``DIR/token``), so a proxy
that forgot to swap in its own credential gets a 401 and the run fails loudly.

With ``--jwks FILE`` it also serves that JSON Web Key Set at ``GET /jwks`` over plain HTTP on a second
loopback port (the ``oidc`` plugin allows http on loopback), for the ``gateway-oidc`` contender.

Run: ``python bench/upstream.py --dir DIR [--jwks FILE]`` prints one JSON line
``{"url", "port", "ca_file", "token", "jwks_url"}`` (``jwks_url`` is null without ``--jwks``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import secrets
import signal
import socket
import ssl
from pathlib import Path

from aiohttp import WSMsgType, web

EXEC_FRAME = 32 * 1024
POD_COUNT = 500


def make_pod(index: int) -> dict:
    name = "web" if index == 0 else f"web-{index:04d}"
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": "prod",
            "uid": f"6d4c5c1e-2f4b-4f0a-9d3e-{index:012d}",
            "resourceVersion": str(1000 + index),
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": {"app": "web", "tier": "frontend", "pod-template-hash": "7c9d8f6b5d"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z"},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": "web-7c9d8f6b5d",
                    "uid": "0b1f7c7e-5a55-4c8e-9f0e-3c2d1b0a9f8e",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "containers": [
                {
                    "name": "web",
                    "image": "registry.example/web:1.27.3",
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                    "env": [{"name": "LOG_LEVEL", "value": "info"}, {"name": "PORT", "value": "8080"}],
                    "resources": {
                        "limits": {"cpu": "500m", "memory": "256Mi"},
                        "requests": {"cpu": "100m", "memory": "128Mi"},
                    },
                    "volumeMounts": [
                        {
                            "name": "kube-api-access",
                            "readOnly": True,
                            "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                        }
                    ],
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                    "imagePullPolicy": "IfNotPresent",
                }
            ],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "nodeName": f"node-{index % 7}",
            "schedulerName": "default-scheduler",
            "volumes": [{"name": "kube-api-access", "projected": {"defaultMode": 420, "sources": []}}],
        },
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": t, "status": "True", "lastTransitionTime": "2026-01-01T00:00:05Z"}
                for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")
            ],
            "hostIP": f"10.0.0.{index % 250 + 1}",
            "podIP": f"10.244.{index // 250}.{index % 250 + 2}",
            "startTime": "2026-01-01T00:00:00Z",
            "containerStatuses": [
                {
                    "name": "web",
                    "state": {"running": {"startedAt": "2026-01-01T00:00:04Z"}},
                    "ready": True,
                    "restartCount": 0,
                    "image": "registry.example/web:1.27.3",
                    "imageID": "registry.example/web@sha256:" + "ab" * 32,
                    "containerID": "containerd://" + f"{index:064x}",
                    "started": True,
                }
            ],
            "qosClass": "Burstable",
        },
    }


POD = json.dumps(make_pod(0)).encode()
PODS = [make_pod(i) for i in range(POD_COUNT)]
POD_LIST = json.dumps(
    {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "5000"}, "items": PODS}
).encode()
WATCH_ADDED = json.dumps({"type": "ADDED", "object": PODS[0]}).encode() + b"\n"
WATCH_BOOKMARK = (
    json.dumps(
        {
            "type": "BOOKMARK",
            "object": {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": "5000"}},
        }
    ).encode()
    + b"\n"
)
EXEC_SUCCESS = b"\x03" + json.dumps({"metadata": {}, "status": "Success"}).encode()
UNAUTHORIZED = json.dumps(
    {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "Unauthorized", "code": 401}
).encode()


SECRET_COUNT = 5000
LOG_BYTES = 64 * 1024 * 1024


def make_secret(index: int) -> dict:
    value = f"s3cret-value-{index:05d}-{'q' * 24}"
    return {
        "metadata": {"name": f"app-secret-{index:05d}", "namespace": "prod", "uid": f"uid-{index}",
                     "resourceVersion": str(1000 + index), "creationTimestamp": "2026-01-01T00:00:00Z",
                     "labels": {"app": "web"}},
        "type": "Opaque",
        "data": {"password": base64.b64encode(value.encode()).decode(),
                 "username": base64.b64encode(b"app").decode(),
                 "url": base64.b64encode(f"postgres://app:{value}@db:5432/app".encode()).decode()},
    }  # fmt: skip


SECRET_LIST = json.dumps(
    {"kind": "SecretList", "apiVersion": "v1", "metadata": {"resourceVersion": "9999"},
     "items": [make_secret(i) for i in range(SECRET_COUNT)]}
).encode()  # fmt: skip
# A log line as an app writes it, with a known secret value and a cloud key in it.
LOG_LINE = (
    b"2026-01-01T00:00:00Z request served in 12ms db=postgres://app:s3cret-value-00042-qqqqqqqqqqqqqqqqqqqqqqqq@db"
    b":5432/app user=alice path=/api/orders?id=12345 status=200 AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG\n"
)
PLAIN_LINE = (
    b"2026-01-01T00:00:00Z request served in 12ms user=alice path=/api/orders?id=12345 status=200 bytes=5123"
    b" upstream=10.0.0.7:8080\n"
)
# Worst case: a secret on every line. Typical: one line in a hundred carries one.
LOG_CHUNKS = {
    "worst": LOG_LINE * (65536 // len(LOG_LINE)),
    "typical": (PLAIN_LINE * 99 + LOG_LINE) * (65536 // (99 * len(PLAIN_LINE) + len(LOG_LINE))),
}


def make_app(token: str) -> web.Application:
    expected = f"Bearer {token}"
    json_type = "application/json"

    def unauthorized() -> web.Response:
        return web.Response(status=401, body=UNAUTHORIZED, content_type=json_type)

    async def pod(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != expected:
            return unauthorized()
        return web.Response(body=POD, content_type=json_type)

    async def pods(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != expected:
            return unauthorized()
        if request.query.get("watch") in ("true", "1"):
            resp = web.StreamResponse(headers={"Content-Type": json_type})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            await resp.write(WATCH_ADDED)
            try:
                while True:
                    await asyncio.sleep(30)
                    await resp.write(WATCH_BOOKMARK)
            except (ConnectionResetError, asyncio.CancelledError):
                pass
            return resp
        return web.Response(body=POD_LIST, content_type=json_type)

    async def exec_(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != expected:
            return unauthorized()
        command = request.query.getall("command", [])
        ws = web.WebSocketResponse(protocols=("v5.channel.k8s.io",), max_msg_size=0, autoping=True)
        await ws.prepare(request)
        if command[:1] == ["cat"]:  # an interactive echo: stdin comes back on stdout, frame by frame
            async for msg in ws:
                if msg.type is WSMsgType.BINARY and msg.data[:1] == b"\x00":
                    await ws.send_bytes(b"\x01" + msg.data[1:])
                elif msg.type is WSMsgType.CLOSE:
                    break
            return ws
        try:
            total = int(command[-1])
        except (IndexError, ValueError):
            total = 0
        frame = b"\x01" + b"x" * EXEC_FRAME
        sent = 0
        while sent + EXEC_FRAME <= total:
            await ws.send_bytes(frame)
            sent += EXEC_FRAME
        if total - sent:
            await ws.send_bytes(frame[: 1 + total - sent])
        await ws.send_bytes(EXEC_SUCCESS)
        await ws.close()
        # Drain whatever the client still says (its close frame).
        async for msg in ws:
            if msg.type is WSMsgType.CLOSE:
                break
        return ws

    async def secrets_(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != expected:
            return unauthorized()
        if request.query.get("watch") in ("true", "1"):  # the masking plugin's follower: no changes here
            resp = web.StreamResponse(headers={"Content-Type": json_type})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            with contextlib.suppress(ConnectionResetError, asyncio.CancelledError):
                await asyncio.sleep(3600)
            return resp
        return web.Response(body=SECRET_LIST, content_type=json_type)

    async def log(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != expected:
            return unauthorized()
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        sent = 0
        chunk = LOG_CHUNKS.get(request.query.get("kind", "typical"), LOG_CHUNKS["typical"])
        while sent < LOG_BYTES:
            await resp.write(chunk)
            sent += len(chunk)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/api/v1/namespaces/prod/secrets", secrets_)
    app.router.add_get("/api/v1/secrets", secrets_)
    app.router.add_get("/api/v1/namespaces/prod/pods/web/log", log)
    app.router.add_get("/api/v1/namespaces/prod/pods/web", pod)
    app.router.add_get("/api/v1/namespaces/prod/pods", pods)
    app.router.add_get("/api/v1/namespaces/prod/pods/web/exec", exec_)
    return app


async def serve_jwks(body: bytes) -> tuple[web.AppRunner, str]:
    async def jwks(_request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=body, content_type="application/json", headers={"Cache-Control": "max-age=3600"}
        )

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    await web.SockSite(runner, sock).start()
    return runner, f"http://127.0.0.1:{sock.getsockname()[1]}/jwks"


async def serve(directory: Path, port: int, jwks: bytes | None = None) -> None:
    from kubegate.core.tls import ensure_self_signed

    files = ensure_self_signed(directory / "tls", common_name="bench-upstream", hostnames=["127.0.0.1"])
    token_path = directory / "token"
    if not token_path.exists():
        token_path.write_text(secrets.token_urlsafe(32))
    token = token_path.read_text().strip()

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(files.cert), str(files.key))
    ctx.set_alpn_protocols(["http/1.1"])

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)
    runner = web.AppRunner(make_app(token), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.SockSite(runner, sock, ssl_context=ctx, backlog=4096)
    await site.start()
    real_port = sock.getsockname()[1]
    jwks_runner, jwks_url = await serve_jwks(jwks) if jwks else (None, None)
    print(
        json.dumps(
            {
                "url": f"https://127.0.0.1:{real_port}",
                "port": real_port,
                "ca_file": str(files.ca_cert),
                "token": token,
                "jwks_url": jwks_url,
                "pid": os.getpid(),
            }
        ),
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    if jwks_runner is not None:
        await jwks_runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--jwks", type=Path, help="also serve this JWKS at http://127.0.0.1:PORT/jwks")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    jwks = args.jwks.read_bytes() if args.jwks else None
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(serve(args.dir, args.port, jwks))
    else:
        uvloop.install()
        asyncio.run(serve(args.dir, args.port, jwks))


if __name__ == "__main__":
    main()
