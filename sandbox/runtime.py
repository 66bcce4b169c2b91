"""Pod runtime for the sandbox cluster: real subprocesses per container (stub, being filled in)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

Resolver = Callable[[str, str, str], str | None]


class PodRuntime:
    def __init__(self, root: Path, resolve_secret: Resolver, resolve_configmap: Resolver) -> None:
        self.root = Path(root)
        self.resolve_secret = resolve_secret
        self.resolve_configmap = resolve_configmap

    async def start_pod(self, pod: dict[str, Any]) -> None:
        return None

    async def stop_pod(self, namespace: str, name: str) -> None:
        return None

    def container_state(self, namespace: str, name: str, container: str) -> dict[str, Any]:
        return {"waiting": {"reason": "ContainerCreating"}}

    async def stream_logs(
        self,
        namespace: str,
        name: str,
        container: str,
        *,
        follow: bool,
        tail_lines: int | None,
        timestamps: bool,
        limit_bytes: int | None,
    ) -> AsyncIterator[bytes]:
        if False:
            yield b""

    async def close(self) -> None:
        return None
