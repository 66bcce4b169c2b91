"""Server-side printing: meta.k8s.io/v1 Table conversion like the apiserver's printers (pkg/printers/internalversion).

`kubectl get` asks for `application/json;as=Table;v=v1;g=meta.k8s.io` and prints the cells verbatim, so the
columns and cell formats below are what a user sees.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from .resources import Resource


def _col(
    name: str, typ: str = "string", description: str = "", priority: int = 0, fmt: str = ""
) -> dict[str, Any]:
    return {"name": name, "type": typ, "format": fmt, "description": description, "priority": priority}


NAME_COL = _col(
    "Name",
    fmt="name",
    description="Name must be unique within a namespace. Is required when creating resources, although some "
    "resources may allow a client to request the generation of an appropriate name automatically.",
)
AGE_COL = _col(
    "Age",
    description="CreationTimestamp is a timestamp representing the server time when this object was created.",
)
CONTAINERS_COL = _col("Containers", description="Names of each container in the template.", priority=1)
IMAGES_COL = _col("Images", description="Images referenced by each container in the template.", priority=1)
SELECTOR_COL = _col("Selector", description="Label selector for pods.", priority=1)


def human_duration(seconds: float) -> str:
    """apimachinery's duration.HumanDuration, which the apiserver uses for AGE cells."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        rem = s % 60
        return f"{minutes}m" if rem == 0 else f"{minutes}m{rem}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        rem = minutes % 60
        return f"{hours}h" if rem == 0 else f"{hours}h{rem}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rem = hours % 24
        return f"{hours // 24}d" if rem == 0 else f"{hours // 24}d{rem}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        rem = (hours // 24) % 365
        return f"{hours // 24 // 365}y" if rem == 0 else f"{hours // 24 // 365}y{rem}d"
    return f"{hours // 24 // 365}y"


def _age(ts: str | None) -> str:
    if not ts:
        return "<unknown>"
    try:
        when = dt.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        return "<unknown>"
    return human_duration((dt.datetime.now(dt.UTC) - when).total_seconds())


def _selector(sel: dict[str, Any] | None) -> str:
    if not sel:
        return "<none>"
    parts = [f"{k}={v}" for k, v in sorted((sel.get("matchLabels") or {}).items())]
    for expr in sel.get("matchExpressions") or []:
        op = expr.get("operator", "")
        values = ",".join(expr.get("values") or [])
        if op == "In":
            parts.append(f"{expr['key']} in ({values})")
        elif op == "NotIn":
            parts.append(f"{expr['key']} notin ({values})")
        elif op == "Exists":
            parts.append(expr["key"])
        elif op == "DoesNotExist":
            parts.append(f"!{expr['key']}")
    return ",".join(parts) or "<none>"


def _template_containers(
    obj: dict[str, Any], path: tuple[str, ...] = ("spec", "template", "spec")
) -> list[str]:
    spec: Any = obj
    for p in path:
        spec = (spec or {}).get(p) or {}
    containers = spec.get("containers") or []
    return [",".join(c.get("name", "") for c in containers), ",".join(c.get("image", "") for c in containers)]


def _pod(obj: dict[str, Any]) -> list[Any]:
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    statuses = status.get("containerStatuses") or []
    ready = sum(1 for c in statuses if c.get("ready"))
    restarts = sum(int(c.get("restartCount", 0)) for c in statuses)
    reason = status.get("reason") or status.get("phase") or "Pending"
    for c in statuses:
        state = c.get("state") or {}
        if "waiting" in state and state["waiting"].get("reason"):
            reason = state["waiting"]["reason"]
        elif "terminated" in state:
            term = state["terminated"]
            reason = term.get("reason") or (
                f"Signal:{term['signal']}" if term.get("signal") else f"ExitCode:{term.get('exitCode', 0)}"
            )
    if obj.get("metadata", {}).get("deletionTimestamp"):
        reason = "Terminating"
    gates = spec.get("readinessGates") or []
    return [
        obj["metadata"]["name"],
        f"{ready}/{len(spec.get('containers') or [])}",
        reason,
        str(restarts),
        _age(obj["metadata"].get("creationTimestamp")),
        status.get("podIP") or "<none>",
        spec.get("nodeName") or "<none>",
        status.get("nominatedNodeName") or "<none>",
        f"{len(gates)}/{len(gates)}" if gates else "<none>",
    ]


def _service(obj: dict[str, Any]) -> list[Any]:
    spec = obj.get("spec") or {}
    ports = []
    for p in spec.get("ports") or []:
        text = f"{p.get('port')}"
        if p.get("nodePort"):
            text += f":{p['nodePort']}"
        ports.append(f"{text}/{p.get('protocol', 'TCP')}")
    ingress = ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    external = ",".join(i.get("ip") or i.get("hostname", "") for i in ingress) or (
        ",".join(spec.get("externalIPs") or [])
        or ("<pending>" if spec.get("type") == "LoadBalancer" else "<none>")
    )
    selector = ",".join(f"{k}={v}" for k, v in sorted((spec.get("selector") or {}).items())) or "<none>"
    return [
        obj["metadata"]["name"],
        spec.get("type", "ClusterIP"),
        spec.get("clusterIP") or "<none>",
        external,
        ",".join(ports) or "<none>",
        _age(obj["metadata"].get("creationTimestamp")),
        selector,
    ]


def _event(obj: dict[str, Any]) -> list[Any]:
    inv = obj.get("involvedObject") or {}
    last = obj.get("lastTimestamp") or obj.get("eventTime") or obj["metadata"].get("creationTimestamp")
    first = obj.get("firstTimestamp") or obj.get("eventTime") or obj["metadata"].get("creationTimestamp")
    source = obj.get("source") or {}
    return [
        _age(last),
        obj.get("type", ""),
        obj.get("reason", ""),
        f"{(inv.get('kind') or '').lower()}/{inv.get('name', '')}",
        inv.get("fieldPath", ""),
        ", ".join(v for v in (source.get("component"), source.get("host")) if v)
        or obj.get("reportingComponent", ""),
        (obj.get("message") or "").strip(),
        _age(first),
        int(obj.get("count") or 1),
        obj["metadata"]["name"],
    ]


def _deployment(obj: dict[str, Any]) -> list[Any]:
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    return [
        obj["metadata"]["name"],
        f"{status.get('readyReplicas', 0)}/{spec.get('replicas', 1)}",
        status.get("updatedReplicas", 0),
        status.get("availableReplicas", 0),
        _age(obj["metadata"].get("creationTimestamp")),
        *_template_containers(obj),
        _selector(spec.get("selector")),
    ]


def _replicaset(obj: dict[str, Any]) -> list[Any]:
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    return [
        obj["metadata"]["name"],
        spec.get("replicas", 1),
        status.get("replicas", 0),
        status.get("readyReplicas", 0),
        _age(obj["metadata"].get("creationTimestamp")),
        *_template_containers(obj),
        _selector(spec.get("selector")),
    ]


def _statefulset(obj: dict[str, Any]) -> list[Any]:
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    return [
        obj["metadata"]["name"],
        f"{status.get('readyReplicas', 0)}/{spec.get('replicas', 1)}",
        _age(obj["metadata"].get("creationTimestamp")),
        *_template_containers(obj),
    ]


def _daemonset(obj: dict[str, Any]) -> list[Any]:
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    node_selector = ((spec.get("template") or {}).get("spec") or {}).get("nodeSelector") or {}
    return [
        obj["metadata"]["name"],
        status.get("desiredNumberScheduled", 0),
        status.get("currentNumberScheduled", 0),
        status.get("numberReady", 0),
        status.get("updatedNumberScheduled", 0),
        status.get("numberAvailable", 0),
        ",".join(f"{k}={v}" for k, v in sorted(node_selector.items())) or "<none>",
        _age(obj["metadata"].get("creationTimestamp")),
        *_template_containers(obj),
        _selector(spec.get("selector")),
    ]


def _job(obj: dict[str, Any]) -> list[Any]:
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    state = "Running"
    for cond in status.get("conditions") or []:
        if cond.get("status") == "True" and cond.get("type") in ("Complete", "Failed"):
            state = cond["type"]
    return [
        obj["metadata"]["name"],
        state,
        f"{status.get('succeeded', 0)}/{spec.get('completions', 1)}",
        "",
        _age(obj["metadata"].get("creationTimestamp")),
        *_template_containers(obj),
        _selector(spec.get("selector")),
    ]


def _cronjob(obj: dict[str, Any]) -> list[Any]:
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    return [
        obj["metadata"]["name"],
        spec.get("schedule", ""),
        spec.get("timeZone") or "<none>",
        "True" if spec.get("suspend") else "False",
        len(status.get("active") or []),
        _age(status.get("lastScheduleTime")) if status.get("lastScheduleTime") else "<none>",
        _age(obj["metadata"].get("creationTimestamp")),
        *_template_containers(obj, ("spec", "jobTemplate", "spec", "template", "spec")),
        _selector(((spec.get("jobTemplate") or {}).get("spec") or {}).get("selector")),
    ]


def _name_age(obj: dict[str, Any]) -> list[Any]:
    return [obj["metadata"]["name"], _age(obj["metadata"].get("creationTimestamp"))]


PRINTERS: dict[str, tuple[list[dict[str, Any]], Any]] = {
    "/pods": (
        [
            NAME_COL,
            _col("Ready", description="The aggregate readiness state of this pod for accepting traffic."),
            _col("Status", description="The aggregate status of the containers in this pod."),
            _col(
                "Restarts",
                description="The number of times the containers in this pod have been restarted "
                "and when the last container in this pod has restarted.",
            ),
            AGE_COL,
            _col(
                "IP",
                description="IP address allocated to the pod. Routable at least within the cluster. "
                "Empty if not yet allocated.",
                priority=1,
            ),
            _col(
                "Node",
                description="NodeName is a request to schedule this pod onto a specific node.",
                priority=1,
            ),
            _col(
                "Nominated Node",
                description="nominatedNodeName is set only when this pod preempts other pods on the node.",
                priority=1,
            ),
            _col(
                "Readiness Gates",
                description="If specified, all readiness gates will be evaluated for pod readiness.",
                priority=1,
            ),
        ],
        _pod,
    ),
    "/namespaces": (
        [NAME_COL, _col("Status", description="The status of the namespace"), AGE_COL],
        lambda o: [
            o["metadata"]["name"],
            (o.get("status") or {}).get("phase", "Active"),
            _age(o["metadata"].get("creationTimestamp")),
        ],
    ),
    "/secrets": (
        [
            NAME_COL,
            _col("Type", description="Used to facilitate programmatic handling of secret data."),
            _col("Data", "string", "Data contains the secret data."),
            AGE_COL,
        ],
        lambda o: [
            o["metadata"]["name"],
            o.get("type", "Opaque"),
            len(o.get("data") or {}),
            _age(o["metadata"].get("creationTimestamp")),
        ],
    ),
    "/configmaps": (
        [NAME_COL, _col("Data", "string", "Data contains the configuration data."), AGE_COL],
        lambda o: [
            o["metadata"]["name"],
            len(o.get("data") or {}) + len(o.get("binaryData") or {}),
            _age(o["metadata"].get("creationTimestamp")),
        ],
    ),
    "/serviceaccounts": (
        [
            NAME_COL,
            _col(
                "Secrets",
                "string",
                "Secrets is a list of the secrets in the same namespace "
                "that pods running using this ServiceAccount are allowed to use.",
            ),
            AGE_COL,
        ],
        lambda o: [
            o["metadata"]["name"],
            len(o.get("secrets") or []),
            _age(o["metadata"].get("creationTimestamp")),
        ],
    ),
    "/services": (
        [
            NAME_COL,
            _col("Type", description="type determines how the Service is exposed."),
            _col("Cluster-IP", description="clusterIP is the IP address of the service."),
            _col(
                "External-IP",
                description="externalIPs is a list of IP addresses for which nodes in the "
                "cluster will also accept traffic for this service.",
            ),
            _col("Port(s)", description="The list of ports that are exposed by this service."),
            AGE_COL,
            _col(
                "Selector",
                description="Route service traffic to pods with label keys and values matching "
                "this selector.",
                priority=1,
            ),
        ],
        _service,
    ),
    "/events": (
        [
            _col(
                "Last Seen",
                description="The time at which the most recent occurrence of this event was recorded.",
            ),
            _col("Type", description="Type of this event (Normal, Warning)."),
            _col("Reason", description="This should be a short, machine understandable string."),
            _col("Object", description="The object that this event is about."),
            _col("Subobject", description="An optional field path within the object.", priority=1),
            _col("Source", description="The component reporting this event.", priority=1),
            _col("Message", description="A human-readable description of the status of this operation."),
            _col("First Seen", description="The time at which the event was first recorded.", priority=1),
            _col("Count", "integer", "The number of times this event has occurred.", priority=1),
            _col("Name", fmt="name", description="Name of the event.", priority=1),
        ],
        _event,
    ),
    "apps/deployments": (
        [
            NAME_COL,
            _col("Ready", description="Number of the pod with ready state"),
            _col(
                "Up-to-date",
                "string",
                "Total number of non-terminated pods targeted by this deployment that "
                "have the desired template spec.",
            ),
            _col(
                "Available",
                "string",
                "Total number of available pods (ready for at least minReadySeconds) "
                "targeted by this deployment.",
            ),
            AGE_COL,
            CONTAINERS_COL,
            IMAGES_COL,
            SELECTOR_COL,
        ],
        _deployment,
    ),
    "apps/replicasets": (
        [
            NAME_COL,
            _col("Desired", "integer", "Replicas is the number of desired replicas."),
            _col("Current", "integer", "Replicas is the most recently observed number of replicas."),
            _col("Ready", "integer", "The number of ready replicas for this replica set."),
            AGE_COL,
            CONTAINERS_COL,
            IMAGES_COL,
            SELECTOR_COL,
        ],
        _replicaset,
    ),
    "apps/statefulsets": (
        [
            NAME_COL,
            _col("Ready", description="Number of the pod with ready state"),
            AGE_COL,
            CONTAINERS_COL,
            IMAGES_COL,
        ],
        _statefulset,
    ),
    "apps/daemonsets": (
        [
            NAME_COL,
            _col("Desired", "integer", "The total number of nodes that should be running the daemon pod."),
            _col("Current", "integer", "The number of nodes running at least one daemon pod."),
            _col(
                "Ready",
                "integer",
                "The number of nodes that should be running the daemon pod and have one "
                "or more of the daemon pod running and ready.",
            ),
            _col("Up-to-date", "integer", "The total number of nodes that are running updated daemon pod"),
            _col(
                "Available",
                "integer",
                "The number of nodes that should be running the daemon pod and have "
                "one or more of the daemon pod running and available.",
            ),
            _col(
                "Node Selector",
                description="NodeSelector is a selector which must be true for the pod to fit on a node.",
            ),
            AGE_COL,
            CONTAINERS_COL,
            IMAGES_COL,
            SELECTOR_COL,
        ],
        _daemonset,
    ),
    "batch/jobs": (
        [
            NAME_COL,
            _col("Status", description="Status of the job."),
            _col(
                "Completions",
                description="The desired number of successfully finished pods the job should be run with.",
            ),
            _col("Duration", description="Time required to complete the job."),
            AGE_COL,
            CONTAINERS_COL,
            IMAGES_COL,
            SELECTOR_COL,
        ],
        _job,
    ),
    "batch/cronjobs": (
        [
            NAME_COL,
            _col("Schedule", description="The schedule in Cron format."),
            _col("Timezone", description="The time zone name for the given schedule."),
            _col("Suspend", "boolean", "This flag tells the controller to suspend subsequent executions."),
            _col("Active", "integer", "A list of pointers to currently running jobs."),
            _col(
                "Last Schedule",
                description="Information when was the last time the job was successfully scheduled.",
            ),
            AGE_COL,
            CONTAINERS_COL,
            IMAGES_COL,
            SELECTOR_COL,
        ],
        _cronjob,
    ),
}


def partial_metadata(obj: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata", {}),
    }


def columns(resource: Resource) -> list[dict[str, Any]]:
    printer = PRINTERS.get(resource.key)
    return printer[0] if printer else [NAME_COL, AGE_COL]


def row(resource: Resource, obj: dict[str, Any], include_object: str = "Metadata") -> dict[str, Any]:
    printer = PRINTERS.get(resource.key)
    cells = printer[1](obj) if printer else _name_age(obj)
    out: dict[str, Any] = {"cells": cells}
    if include_object == "Object":
        out["object"] = obj
    elif include_object != "None":
        out["object"] = partial_metadata(obj)
    return out


def table(
    resource: Resource,
    objs: list[dict[str, Any]],
    *,
    resource_version: str = "",
    include_object: str = "Metadata",
    with_columns: bool = True,
    list_meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = dict(list_meta or {})
    if resource_version:
        meta["resourceVersion"] = resource_version
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": meta,
        "columnDefinitions": columns(resource) if with_columns else [],
        "rows": [row(resource, o, include_object) for o in objs],
    }
