"""A local OIDC identity provider for tests: discovery and JWKS over loopback (the gateway fetches them), and
JWTs minted by the test with real keys."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, RSAKey

RSA_KEY = RSAKey.generate_key(2048, parameters={"kid": "rsa-e2e", "use": "sig"})
EC_KEY = ECKey.generate_key("P-256", parameters={"kid": "ec-e2e", "use": "sig"})


class IdP:
    """Discovery and JWKS for two issuers (a generic IdP at `/`, a GitHub-Actions-like one at `/gha`)."""

    def __init__(self, audience: str) -> None:
        self.audience = audience
        self.jwks_requests = 0
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                routes = {
                    "/.well-known/openid-configuration": {"issuer": idp.url, "jwks_uri": f"{idp.url}/jwks"},
                    "/gha/.well-known/openid-configuration": {
                        "issuer": f"{idp.url}/gha",
                        "jwks_uri": f"{idp.url}/jwks",
                    },
                    "/jwks": KeySet([RSA_KEY, EC_KEY]).as_dict(private=False),
                }
                if self.path == "/jwks":
                    idp.jwks_requests += 1
                doc = routes.get(self.path)
                body = json.dumps(doc).encode()
                self.send_response(200 if doc else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def mint(self, key: Any = RSA_KEY, alg: str = "RS256", **claims: Any) -> str:
        """A token of this issuer for its audience (sub `alice` unless given); a claim given as None is left
        out."""
        now = int(time.time())
        payload = {
            "iss": self.url,
            "aud": self.audience,
            "sub": "alice",
            "iat": now,
            "exp": now + 600,
            **claims,
        }
        payload = {name: value for name, value in payload.items() if value is not None}
        return jwt.encode({"alg": alg, "kid": key.kid}, payload, key, algorithms=[alg])
