"""What a request's header lookups cost: a kubectl GET's seven headers, the thirty lookups the full plugin chain
makes (authentication, kubectl's headers, Accept, identity checks), in process. It runs the code it is imported
with: for a revision, from a worktree with `PYTHONPATH=WORKTREE/.typecheck`.

    .venv/bin/python bench/header_lookups.py
"""

from __future__ import annotations

import timeit

from kubegate.core.flow import Request

H = [
    ("Host", "gw"),
    ("User-Agent", "kubectl/v1.32.0 (linux/amd64) kubernetes/abc"),
    ("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"),
    ("Authorization", "Bearer abc.def.ghi"),
    ("Kubectl-Command", "kubectl get"),
    ("Kubectl-Session", "0123-4567"),
    ("Accept-Encoding", "gzip"),
]
names = [
    "authorization",
    "user-agent",
    "kubectl-command",
    "kubectl-session",
    "accept",
    "content-type",
    "content-length",
    "upgrade",
    "impersonate-user",
    "x-remote-user",
] * 3


def run():
    r = Request(method="GET", path="/api/v1/pods", query="", headers=list(H))
    for n in names:
        r.header(n)


print("%.2f us per request (30 lookups)" % (min(timeit.repeat(run, number=20000, repeat=5)) / 20000 * 1e6))
