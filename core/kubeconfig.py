"""kubeconfig files that point kubectl at the gateway."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import yaml


def gateway_kubeconfig(
    *,
    cluster: str,
    server: str,
    ca_pem: bytes | None,
    users: list[tuple[str, str]],
    current: str | None = None,
) -> dict[str, Any]:
    """A kubeconfig with one cluster (the gateway URL incl. ``/k8s/NAME``) and a context per user.

    :param users: (user name, bearer token) pairs; contexts are named ``USER@CLUSTER``.
    """
    cluster_entry: dict[str, Any] = {"server": server}
    if ca_pem:
        cluster_entry["certificate-authority-data"] = base64.b64encode(ca_pem).decode()
    contexts = [
        {"name": f"{user}@{cluster}", "context": {"cluster": cluster, "user": f"{user}@{cluster}"}}
        for user, _ in users
    ]
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster, "cluster": cluster_entry}],
        "users": [{"name": f"{user}@{cluster}", "user": {"token": token}} for user, token in users],
        "contexts": contexts,
        "current-context": current or (contexts[0]["name"] if contexts else ""),
        "preferences": {},
    }


def dump(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False)


def write_private(path: Path, text: str) -> None:
    """Write a file holding credentials, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
