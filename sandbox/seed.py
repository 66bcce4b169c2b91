"""The objects a fresh sandbox starts with: a small, realistic `prod` namespace full of secrets to leak.

Everything is a plain manifest created through the same code path as a client's POST, so seeded objects get
uids, resourceVersions, pod status and running pod processes exactly like created ones.
"""

from __future__ import annotations

import base64
from typing import Any

NAMESPACES = ["default", "prod", "dev", "kube-system"]

DB_PASSWORD = "hunter2-prod-s3cret"
API_TOKEN = (
    "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9."
    "eyJpc3MiOiJodHRwczovL2F1dGguZXhhbXBsZS5jb20iLCJzdWIiOiJhcHAtcHJvZCIsImF1ZCI6ImFwaSJ9."
    "c2FuZGJveC1zaWduYXR1cmUtbm90LXJlYWxseS1zaWduZWQ"
)
AWS_ACCESS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
AWS_SECRET_ACCESS_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"

# The web container logs a line per second that embeds a database URL with the password (resolved from the
# Secret through the environment) and a cloud key: the kind of output a masking gateway must catch.
WEB_COMMAND = [
    "sh",
    "-c",
    'i=0; while true; do i=$((i+1)); echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) request $i served; '
    "db=postgres://app:$DB_PASSWORD@db:5432/app AWS_SECRET_ACCESS_KEY=" + AWS_SECRET_ACCESS_KEY + '"; '
    "sleep 1; done",
]


def _b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


def _web_pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "prod", "labels": {"app": "web"}},
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "image": "registry.example.com/web:1.4.2",
                    "command": WEB_COMMAND,
                    "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                    "env": [
                        {
                            "name": "DB_PASSWORD",
                            "valueFrom": {"secretKeyRef": {"name": "db-credentials", "key": "password"}},
                        },
                        {"name": "LOG_LEVEL", "value": "info"},
                    ],
                }
            ]
        },
    }


def objects() -> list[dict[str, Any]]:
    """Manifests in creation order (namespaces first)."""
    out: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}} for ns in NAMESPACES
    ]
    out += [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": ns}}
        for ns in NAMESPACES
    ]
    out += [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "db-credentials", "namespace": "prod", "labels": {"app": "web"}},
            "type": "Opaque",
            "data": {"username": _b64("app"), "password": _b64(DB_PASSWORD), "api-token": _b64(API_TOKEN)},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "app-config", "namespace": "prod", "labels": {"app": "web"}},
            "data": {
                "LOG_LEVEL": "info",
                "DB_HOST": "db.prod.svc.cluster.local",
                "FEATURE_FLAGS": "checkout-v2,search-beta",
                "app.properties": "server.port=8080\nserver.shutdown=graceful\n",
            },
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "prod", "labels": {"app": "web"}},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {
                        "containers": [
                            {
                                "name": "app",
                                "image": "registry.example.com/web:1.4.2",
                                "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                                "env": [
                                    {
                                        "name": "DB_PASSWORD",
                                        "valueFrom": {
                                            "secretKeyRef": {"name": "db-credentials", "key": "password"}
                                        },
                                    },
                                    {"name": "API_KEY", "value": AWS_ACCESS_KEY_ID},
                                ],
                            }
                        ]
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "prod", "labels": {"app": "web"}},
            "spec": {
                "selector": {"app": "web"},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
            },
        },
        _web_pod("web"),
        _web_pod("web-0"),
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "worker", "namespace": "prod", "labels": {"app": "worker"}},
            "spec": {"containers": [{"name": "main", "image": "registry.example.com/worker:2.0.0"}]},
        },
    ]
    return out
