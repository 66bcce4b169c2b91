"""Kubernetes `Status` errors: every refusal on the API path is one, so kubectl prints it like its own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    413: "RequestEntityTooLarge",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    502: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


class StatusError(Exception):
    """An error answered to the client as a `metav1.Status` JSON body with the same HTTP code."""

    def __init__(
        self, code: int, message: str, reason: str | None = None, details: dict[str, Any] | None = None
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or REASONS.get(code, "Unknown")
        self.details = details

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body

    def body(self) -> bytes:
        return json.dumps(self.status()).encode()

    def __repr__(self) -> str:
        return f"StatusError({self.code}, {self.message!r})"


STATUS_HEADERS = [("content-type", "application/json"), ("cache-control", "no-store")]


class ConfigError(Exception):
    """A configuration problem, reported as `FILE: KEY: REASON`."""

    def __init__(self, file: str | Path, key: str, reason: str):
        self.file, self.key, self.reason = str(file), key, reason
        super().__init__(f"{file}: {key}: {reason}" if key else f"{file}: {reason}")
