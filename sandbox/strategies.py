"""What the API server's registry strategies do on create and update: defaults, server-set
fields, Secret stringData, pod and service defaults, and workloads that report themselves rolled out.
"""

from __future__ import annotations

import base64
import ipaddress
from typing import Any

from .apibase import ApiBase
from .kubelet import NODE_IP, NODE_NAME, container_defaults, container_status
from .resources import Resource
from .store import ApiError, now_iso


class Strategies(ApiBase):
    """Defaulting and strategy hooks (PrepareForCreate/Update) for the kinds that have them."""

    def _prepare(self, resource: Resource, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        """Defaulting and strategy hooks (PrepareForCreate/Update) for the kinds that have them."""
        meta = obj["metadata"]
        if old is not None:
            for keep in ("uid", "creationTimestamp", "generation"):
                if keep in old["metadata"]:
                    meta[keep] = old["metadata"][keep]
            if resource.has_status:
                if "status" in old:
                    obj["status"] = old["status"]
                else:
                    obj.pop("status", None)
            strip = lambda o: {k: v for k, v in o.items() if k not in ("metadata", "status")}  # noqa: E731
            if strip(obj) != strip(old) and "generation" in old["metadata"]:
                meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        kind = resource.kind
        if kind == "Secret":
            self._prepare_secret(resource, obj)
        elif kind == "Namespace":
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
            obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
            obj["status"] = (old or {}).get("status") or {"phase": "Active"}
        elif kind == "Pod":
            self._prepare_pod(resource, obj, old)
        elif kind == "Service":
            self._prepare_service(obj, old)
        elif kind in ("Deployment", "ReplicaSet", "StatefulSet", "DaemonSet"):
            _workload_status(obj)
        elif kind == "Job" and old is None:
            obj["status"] = {
                "startTime": now_iso(),
                "active": 1,
                "ready": 1,
                "terminating": 0,
                "uncountedTerminatedPods": {},
            }
        elif kind == "CronJob" and old is None:
            obj["status"] = {}
            obj.setdefault("spec", {}).setdefault("suspend", False)

    def _prepare_secret(self, resource: Resource, obj: dict[str, Any]) -> None:
        data = obj.get("data") or {}
        if not isinstance(data, dict):
            raise ApiError(400, "BadRequest", "Secret.data must be a map of base64 strings")
        for key, value in data.items():
            try:
                base64.b64decode(value or "", validate=True)
            except (ValueError, TypeError) as exc:
                raise ApiError(
                    400,
                    "BadRequest",
                    f'Secret in version "v1" cannot be handled as a Secret: illegal '
                    f"base64 data for key {key!r}",
                ) from exc
        # stringData is write-only: merged into data (base64) and never stored, like the apiserver.
        string_data = obj.pop("stringData", None) or {}
        for key, value in string_data.items():
            data[key] = base64.b64encode(str(value).encode()).decode()
        if data:
            obj["data"] = data
        obj.setdefault("type", "Opaque")

    def _prepare_pod(self, resource: Resource, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        spec = obj.setdefault("spec", {})
        containers = spec.get("containers")
        if not containers:
            raise self._invalid(resource, obj["metadata"]["name"], "spec.containers", "Required value", "")
        if old is not None:
            # Ephemeral containers are added through pods/NAME/ephemeralcontainers only (a rule on that
            # subresource must not be side-stepped by writing the pod itself).
            if spec.get("ephemeralContainers") != (old.get("spec") or {}).get("ephemeralContainers"):
                raise self._invalid(
                    resource,
                    obj["metadata"]["name"],
                    "spec",
                    "Forbidden",
                    "pod updates may not change fields other than `spec.containers[*].image`, ... "
                    "(ephemeral containers are added through the ephemeralcontainers subresource)",
                )
            return
        if spec.get("ephemeralContainers"):
            raise self._invalid(
                resource,
                obj["metadata"]["name"],
                "spec.ephemeralContainers",
                "Forbidden",
                "cannot be set on create",
            )
        for c in containers:
            if not c.get("name"):
                raise self._invalid(
                    resource, obj["metadata"]["name"], "spec.containers[0].name", "Required value", ""
                )
            image = c.get("image", "")
            container_defaults(c, image)
            for p in c.get("ports") or []:
                p.setdefault("protocol", "TCP")
        spec.setdefault("restartPolicy", "Always")
        spec.setdefault("terminationGracePeriodSeconds", 30)
        spec.setdefault("dnsPolicy", "ClusterFirst")
        spec.setdefault("serviceAccountName", "default")
        spec.setdefault("serviceAccount", spec["serviceAccountName"])
        spec.setdefault("securityContext", {})
        spec.setdefault("schedulerName", "default-scheduler")
        spec.setdefault("nodeName", NODE_NAME)
        spec.setdefault("enableServiceLinks", True)
        spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
        spec.setdefault("priority", 0)
        spec.setdefault(
            "tolerations",
            [
                {
                    "key": "node.kubernetes.io/not-ready",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 300,
                },
                {
                    "key": "node.kubernetes.io/unreachable",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 300,
                },
            ],
        )
        self._ip_counter += 1
        ip = f"10.244.{self._ip_counter // 250}.{self._ip_counter % 250 + 2}"
        started = now_iso()
        obj["status"] = {
            "phase": "Running",
            "conditions": [
                {"type": t, "status": "True", "lastProbeTime": None, "lastTransitionTime": started}
                for t in (
                    "PodReadyToStartContainers",
                    "Initialized",
                    "Ready",
                    "ContainersReady",
                    "PodScheduled",
                )
            ],
            "hostIP": NODE_IP,
            "hostIPs": [{"ip": NODE_IP}],
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "startTime": started,
            "containerStatuses": [
                container_status(c, {"running": {"startedAt": started}}) for c in containers
            ],
            "qosClass": "BestEffort",
        }

    def _prepare_service(self, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        spec = obj.setdefault("spec", {})
        spec.setdefault("type", "ClusterIP")
        if old is not None and (old.get("spec") or {}).get("clusterIP"):
            spec.setdefault("clusterIP", old["spec"]["clusterIP"])
        if spec["type"] != "ExternalName" and not spec.get("clusterIP"):
            self._svc_counter += 1
            spec["clusterIP"] = str(ipaddress.ip_address("10.96.0.0") + self._svc_counter)
        if spec.get("clusterIP"):
            spec.setdefault("clusterIPs", [spec["clusterIP"]])
            spec.setdefault("ipFamilies", ["IPv4"])
            spec.setdefault("ipFamilyPolicy", "SingleStack")
        spec.setdefault("sessionAffinity", "None")
        spec.setdefault("internalTrafficPolicy", "Cluster")
        for p in spec.get("ports") or []:
            p.setdefault("protocol", "TCP")
            p.setdefault("targetPort", p.get("port"))
        obj["status"] = (old or {}).get("status") or {"loadBalancer": {}}


def _workload_status(obj: dict[str, Any]) -> None:
    """Controllers are not simulated; workloads report themselves fully rolled out."""
    spec = obj.setdefault("spec", {})
    kind = obj["kind"]
    gen = obj["metadata"].get("generation", 1)
    if kind == "DaemonSet":
        obj["status"] = {
            "currentNumberScheduled": 1,
            "desiredNumberScheduled": 1,
            "numberAvailable": 1,
            "numberMisscheduled": 0,
            "numberReady": 1,
            "observedGeneration": gen,
            "updatedNumberScheduled": 1,
        }
        return
    replicas = spec.setdefault("replicas", 1)
    status: dict[str, Any] = {"observedGeneration": gen, "replicas": replicas}
    if replicas:
        status.update({"readyReplicas": replicas, "availableReplicas": replicas})
    if kind == "Deployment":
        if not (spec.get("strategy") or {}).get("type"):
            spec["strategy"] = {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"},
            }
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("progressDeadlineSeconds", 600)
        if replicas:
            status["updatedReplicas"] = replicas
        ts = now_iso()
        status["conditions"] = [
            {
                "type": "Available",
                "status": "True",
                "lastUpdateTime": ts,
                "lastTransitionTime": ts,
                "reason": "MinimumReplicasAvailable",
                "message": "Deployment has minimum availability.",
            },
            {
                "type": "Progressing",
                "status": "True",
                "lastUpdateTime": ts,
                "lastTransitionTime": ts,
                "reason": "NewReplicaSetAvailable",
                "message": f'ReplicaSet "{obj["metadata"]["name"]}-5d8f7c9b6" has successfully progressed.',
            },
        ]
    elif kind == "StatefulSet":
        status.update({"currentReplicas": replicas, "updatedReplicas": replicas})
    elif kind == "ReplicaSet":
        status["fullyLabeledReplicas"] = replicas
    obj["status"] = status
