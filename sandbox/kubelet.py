"""The kubelet's part: start a created pod in the runtime, record its events, and keep its status
(container states, ephemeral containers) in step with the processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from typing import Any

from .apibase import ApiBase, log
from .resources import Resource
from .store import now_iso

NODE_NAME = "sandbox-node"
NODE_IP = "10.0.0.10"


def container_defaults(container: dict[str, Any], image: str) -> None:
    """The API server's defaults for a container (SetDefaults_Container): pull policy, resources,
    termination message."""
    container.setdefault(
        "imagePullPolicy",
        "Always" if image.endswith(":latest") or ":" not in image.split("/")[-1] else "IfNotPresent",
    )
    container.setdefault("resources", {})
    container.setdefault("terminationMessagePath", "/dev/termination-log")
    container.setdefault("terminationMessagePolicy", "File")


def _state_sig(state: dict[str, Any] | None) -> tuple[Any, ...]:
    state = state or {}
    if "running" in state:
        return ("running",)
    if "terminated" in state:
        return ("terminated", state["terminated"].get("exitCode"))
    return ("waiting", (state.get("waiting") or {}).get("reason"))


def container_status(container: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    running = "running" in state
    image = container.get("image", "")
    digest = hashlib.sha256(image.encode()).hexdigest()
    return {
        "name": container["name"],
        "state": state,
        "lastState": {},
        "ready": running,
        "restartCount": 0,
        "image": image,
        "imageID": f"{image.split(':')[0]}@sha256:{digest}",
        "containerID": f"containerd://{hashlib.sha256((container['name'] + str(time.time())).encode()).hexdigest()}",
        "started": running,
    }


class Kubelet(ApiBase):
    """What the kubelet would report: pod events and the containers' real states from the runtime."""

    async def _after_create(self, resource: Resource, obj: dict[str, Any]) -> None:
        if resource.kind != "Pod":
            return
        await self.runtime.start_pod(obj)
        meta = obj["metadata"]
        self._record_event(
            obj,
            "Scheduled",
            f"Successfully assigned {meta['namespace']}/{meta['name']} to {NODE_NAME}",
            "default-scheduler",
            "",
        )
        for c in obj["spec"]["containers"]:
            for reason, message, component in (
                ("Pulled", f'Container image "{c.get("image", "")}" already present on machine', "kubelet"),
                ("Created", f"Created container: {c['name']}", "kubelet"),
                ("Started", f"Started container {c['name']}", "kubelet"),
            ):
                self._record_event(obj, reason, message, component, f"spec.containers{{{c['name']}}}")
        self._refresh_pod_status(meta["namespace"], meta["name"])

    def _record_event(
        self, obj: dict[str, Any], reason: str, message: str, component: str, fieldpath: str
    ) -> None:
        meta = obj["metadata"]
        ts = now_iso()
        event = {
            "kind": "Event",
            "apiVersion": "v1",
            # Like client-go's recorder: name.<hex unix nanos>, so names sort in creation order.
            "metadata": {"name": f"{meta['name']}.{time.time_ns():x}", "namespace": meta["namespace"]},
            "involvedObject": {
                "kind": obj["kind"],
                "namespace": meta["namespace"],
                "name": meta["name"],
                "uid": meta["uid"],
                "apiVersion": obj["apiVersion"],
                "resourceVersion": meta["resourceVersion"],
                **({"fieldPath": fieldpath} if fieldpath else {}),
            },
            "reason": reason,
            "message": message,
            "source": {"component": component, **({"host": NODE_NAME} if component == "kubelet" else {})},
            "firstTimestamp": ts,
            "lastTimestamp": ts,
            "count": 1,
            "type": "Normal",
            "eventTime": None,
            "reportingComponent": component,
            "reportingInstance": NODE_NAME if component == "kubelet" else "",
        }
        with contextlib.suppress(KeyError):
            self.store.create("/events", event)

    def _refresh_pod_status(self, ns: str, name: str) -> None:
        """What the kubelet does: report the containers' real states (a crashed command shows up)."""
        pod = self.store.get("/pods", ns, name)
        if pod is None:
            return
        status = pod.get("status") or {}
        old = status.get("containerStatuses") or []
        new = []
        for c in pod["spec"]["containers"]:
            state = self.runtime.container_state(ns, name, c["name"])
            prev = next((s for s in old if s.get("name") == c["name"]), None)
            if prev is not None and _state_sig(prev.get("state")) == _state_sig(state):
                new.append(prev)
            else:
                new.append(container_status(c, state))
        ephemeral = self._ephemeral_statuses(pod, status)
        if new == old and ephemeral == status.get("ephemeralContainerStatuses"):
            return
        status["containerStatuses"] = new
        if ephemeral is not None:
            status["ephemeralContainerStatuses"] = ephemeral
        all_ready = all(s.get("ready") for s in new)
        if all("terminated" in (s.get("state") or {}) for s in new):
            failed = any(s["state"]["terminated"].get("exitCode") for s in new)
            status["phase"] = "Failed" if failed else "Succeeded"
        for cond in status.get("conditions") or []:
            if cond["type"] in ("Ready", "ContainersReady"):
                value = "True" if all_ready else "False"
                if cond["status"] != value:
                    cond["status"] = value
                    cond["lastTransitionTime"] = now_iso()
                    if value == "False":
                        cond["reason"] = (
                            "ContainersNotReady" if cond["type"] == "ContainersReady" else "PodCompleted"
                        )
        pod["status"] = status
        self.store.update("/pods", pod)

    def _ephemeral_statuses(self, pod: dict[str, Any], status: dict[str, Any]) -> list[dict[str, Any]] | None:
        """status.ephemeralContainerStatuses (kubectl debug -it waits for its container to run); never ready."""
        specs = pod["spec"].get("ephemeralContainers") or []
        if not specs:
            return None
        meta = pod["metadata"]
        old = status.get("ephemeralContainerStatuses") or []
        out = []
        for c in specs:
            state = self.runtime.container_state(meta["namespace"], meta["name"], c["name"])
            prev = next((s for s in old if s.get("name") == c["name"]), None)
            if prev is not None and _state_sig(prev.get("state")) == _state_sig(state):
                out.append(prev)
            else:
                out.append({**container_status(c, state), "ready": False})
        return out

    async def _kubelet(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                for pod in self.store.list("/pods"):
                    self._refresh_pod_status(pod["metadata"]["namespace"], pod["metadata"]["name"])
            except Exception:  # keep the loop alive; a status glitch must not stop status reporting
                log.exception("pod status refresh failed")
