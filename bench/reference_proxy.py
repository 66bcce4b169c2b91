"""An experiment, not a contender by default: the gateway's REST job on aiohttp's own server (C parser).

It does what the gateway's data path does for a REST request with static tokens: strip ``/k8s/NAME``,
hash the bearer token and look it up, drop the caller's credential, impersonation and hop-by-hop headers,
add the upstream token and ``Impersonate-User``/``Impersonate-Group``, and stream the answer back through the
same aiohttp client. It skips what the gateway adds on top (request attributes, pluggy hooks, audit,
WebSockets, body limits). `bench/run --contenders direct,gateway,aiohttp-ref` sets it beside the gateway to
show how much of the per-request cost is the server-side HTTP stack (Hypercorn + h11).

    python bench/reference_proxy.py --upstream URL --ca CA --token-file F --gateway-token T --port P \\
        --cert C --key K
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import ssl

import aiohttp
from aiohttp import web

DROP = frozenset({"authorization", "host", "connection", "keep-alive", "transfer-encoding", "te", "upgrade"})


def make_handler(session: aiohttp.ClientSession, upstream: str, upstream_token: str, tokens: dict):
    prefix = "/k8s/bench"

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        path = request.raw_path
        if not path.startswith(prefix + "/"):
            return web.Response(status=404)
        _, _, token = request.headers.get("Authorization", "").partition(" ")
        identity = tokens.get(hashlib.sha256(token.encode()).hexdigest())
        if identity is None:
            return web.Response(status=401)
        user, groups = identity
        headers = [
            (k, v)
            for k, v in request.headers.items()
            if k.lower() not in DROP and not k.lower().startswith("impersonate-")
        ]
        headers.append(("Authorization", f"Bearer {upstream_token}"))
        headers.append(("Impersonate-User", user))
        headers += [("Impersonate-Group", g) for g in groups]
        async with session.request(request.method, upstream + path[len(prefix) :], headers=headers) as resp:
            out = web.StreamResponse(
                status=resp.status,
                headers={k: v for k, v in resp.headers.items() if k.lower() not in DROP | {"content-length"}},
            )
            if resp.content_length is not None:
                out.content_length = resp.content_length
            await out.prepare(request)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    return handler


async def serve(args: argparse.Namespace) -> None:
    client_ctx = ssl.create_default_context(cafile=args.ca)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=client_ctx, limit=100),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
    )
    upstream_token = args.upstream_token
    tokens = {hashlib.sha256(args.gateway_token.encode()).hexdigest(): ("bench", ("bench",))}
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(args.cert, args.key)
    server = web.Server(make_handler(session, args.upstream.rstrip("/"), upstream_token, tokens))
    await asyncio.get_running_loop().create_server(server, "127.0.0.1", args.port, ssl=server_ctx)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--upstream", "--ca", "--token-file", "--gateway-token", "--cert", "--key"):
        parser.add_argument(name, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    with open(args.token_file) as f:
        args.upstream_token = f.read().strip()
    import uvloop

    uvloop.install()
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
