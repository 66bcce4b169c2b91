"""The MCP tools: each one a few Kubernetes API requests through the gateway's data path (`calls`).

Every tool takes a required `reason`, sent with its requests as `Kubegate-Intent`: reviewers see it on a
held request, audit events keep it (masked). While a request waits (held for approval, say) the tool sends
progress notifications, when the client asked for them. Whatever the API server or the gateway refused
comes back as a tool error with its message: a reviewer's denial with the comment.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import yaml
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from kubegate.core.flow import MAX_INTENT_CHARS

from . import calls, paths
from .audit import ToolCall

if TYPE_CHECKING:
    from .endpoint import Endpoint

T = TypeVar("T")

Reason = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_INTENT_CHARS,
        description="Why you make this call, in a sentence: reviewers read it before they approve a held "
        "request, and the audit log keeps it.",
    ),
]
Namespace = Annotated[str | None, Field(default=None, description="The namespace (namespaced resources).")]
ResourceName = Annotated[
    str, Field(description="Resource type: plural (pods, deployments) or short (deploy).")
]
ApiVersion = Annotated[
    str | None, Field(default=None, description="group/version for resources kubegate does not know (e.g. apps/v1).")
]  # fmt: skip
ObjectName = Annotated[str, Field(min_length=1, max_length=253, description="The object's name.")]


def build_server(endpoint: Endpoint) -> MCPServer:
    server: MCPServer = MCPServer(
        "kubegate",
        instructions="Kubernetes through kubegate: every call goes through the gateway's policy, approvals, "
        "masking and audit as your own identity. Give each call an honest `reason`. A write may be held "
        "until a person approves it; the call then waits and reports progress. Secret values are masked.",
        log_level="WARNING",
    )

    async def run(ctx: Context, tool: str, reason: str, arguments: dict[str, Any],
                  body: Callable[[ToolCall], Awaitable[str]]) -> str:  # fmt: skip
        call = endpoint.begin(ctx, tool, reason, arguments)
        try:
            result = await body(call)
        except paths.ArgumentError as exc:
            await endpoint.finish(call, "refused", str(exc))
            raise ToolError(str(exc)) from None
        except ToolError as exc:
            await endpoint.finish(call, "error", str(exc))
            raise
        except asyncio.CancelledError:
            await asyncio.shield(endpoint.finish(call, "cancelled", "the client went away"))
            raise
        except Exception as exc:
            await endpoint.finish(call, "error", f"internal error: {type(exc).__name__}")
            raise
        await endpoint.finish(call, "ok", "")
        return result

    async def api(call: ToolCall, ctx: Context, **kwargs: Any) -> calls.Answer:
        settings = endpoint.settings(call.caller)
        answer = await waiting(
            ctx, call, calls.request(endpoint.gateway, call.caller, reason=call.reason, tool=call.tool,
                                     max_bytes=kwargs.pop("max_bytes", settings.max_result_bytes), **kwargs),
            kwargs["path"],
        )  # fmt: skip
        call.request_ids.append(answer.request_id)
        if answer.status >= 400:
            raise ToolError(f"{answer.status}: {answer.message()}")
        return answer

    async def waiting(ctx: Context, call: ToolCall, work: Awaitable[T], path: str) -> T:
        """`work`, with a progress notification every `progress_seconds` while it has not answered: naming the
        approval request when the caller's request to `path` is the one held."""
        task = asyncio.ensure_future(work)
        every = endpoint.settings(call.caller).progress_seconds
        started = time.monotonic()
        ticks = 0
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=every)
                if done:
                    return task.result()
                ticks += 1
                await ctx.report_progress(
                    ticks, None, await held_message(call, path, time.monotonic() - started)
                )
        except asyncio.CancelledError:
            task.cancel()
            raise

    async def held_message(call: ToolCall, path: str, waited: float) -> str:
        try:
            held = await calls.pending_approval(endpoint.gateway, call.caller, path)
        except Exception:  # a progress message is no reason to fail the call
            held = None
        if held is None:
            return (
                f"waiting {waited:.0f} s for the gateway (the request may be held for a reviewer's approval)"
            )
        why = f": {held['reason']}" if held.get("reason") else ""
        return (f"waiting {waited:.0f} s: held for approval {held.get('id')} (rule {held.get('rule')}{why}); "
                f"a reviewer in {', '.join(held.get('reviewer_groups') or [])} decides, then this call returns")  # fmt: skip

    # -- reads --------------------------------------------------------------------------------------------

    @server.tool(structured_output=False)
    async def list_resources(
        resource: ResourceName, reason: Reason, ctx: Context, namespace: Namespace = None,
        api_version: ApiVersion = None,
        label_selector: Annotated[str | None, Field(default=None, max_length=1000)] = None,
        limit: Annotated[int, Field(ge=1, le=500)] = 100,
    ) -> str:  # fmt: skip
        """List objects of a resource type (all namespaces when namespace is left out): names, namespaces,
        labels, age and phase. Use get_resource or describe for one object."""

        async def body(call: ToolCall) -> str:
            target = paths.target(resource, api_version)
            query = [("limit", str(limit))] + ([("labelSelector", label_selector)] if label_selector else [])
            answer = await api(call, ctx, method="GET", path=target.collection_path(namespace),
                               query=calls.query_string(query))  # fmt: skip
            listing = _json(answer)
            items = [_summary(item) for item in listing.get("items") or []]
            result: dict[str, Any] = {"kind": listing.get("kind"), "items": items}
            if (listing.get("metadata") or {}).get("continue"):
                result["more"] = "more objects exist: narrow with label_selector or a namespace"
            return json.dumps(result)

        return await run(ctx, "list_resources", reason, _args(resource=resource, namespace=namespace,
                         api_version=api_version, label_selector=label_selector, limit=limit), body)  # fmt: skip

    @server.tool(structured_output=False)
    async def get_resource(
        resource: ResourceName, name: ObjectName, reason: Reason, ctx: Context, namespace: Namespace = None,
        api_version: ApiVersion = None,
    ) -> str:  # fmt: skip
        """One object as JSON (Secret values masked; managedFields left out)."""

        async def body(call: ToolCall) -> str:
            target = paths.target(resource, api_version)
            answer = await api(call, ctx, method="GET", path=target.path(namespace, name))
            return json.dumps(_trim(_json(answer)))

        return await run(ctx, "get_resource", reason, _args(resource=resource, name=name, namespace=namespace,
                         api_version=api_version), body)  # fmt: skip

    @server.tool(structured_output=False)
    async def describe(
        resource: ResourceName, name: ObjectName, reason: Reason, ctx: Context, namespace: Namespace = None,
        api_version: ApiVersion = None,
    ) -> str:  # fmt: skip
        """One object and the events about it (like kubectl describe, as JSON)."""

        async def body(call: ToolCall) -> str:
            target = paths.target(resource, api_version)
            obj = _trim(_json(await api(call, ctx, method="GET", path=target.path(namespace, name))))
            selector = f"involvedObject.name={name}" + (
                f",involvedObject.namespace={namespace}" if namespace else ""
            )
            events_path = paths.target("events").collection_path(namespace if target.namespaced else None)
            answer = await api(call, ctx, method="GET", path=events_path,
                               query=calls.query_string([("fieldSelector", selector), ("limit", "200")]))  # fmt: skip
            events = [
                {"type": e.get("type"), "reason": e.get("reason"), "message": e.get("message"),
                 "count": e.get("count"), "last": e.get("lastTimestamp") or e.get("eventTime")}
                for e in _json(answer).get("items") or []
                if (e.get("involvedObject") or {}).get("name") == name
                and (not target.kind or (e.get("involvedObject") or {}).get("kind") in (None, target.kind))
            ]  # fmt: skip
            return json.dumps({"object": obj, "events": events})

        return await run(ctx, "describe", reason, _args(resource=resource, name=name, namespace=namespace,
                         api_version=api_version), body)  # fmt: skip

    @server.tool(structured_output=False)
    async def logs(
        pod: ObjectName, namespace: Annotated[str, Field(description="The pod's namespace.")], reason: Reason,
        ctx: Context, container: Annotated[str | None, Field(default=None, max_length=253)] = None,
        tail_lines: Annotated[int, Field(ge=1, le=5000)] = 100, previous: bool = False,
    ) -> str:  # fmt: skip
        """The last lines of a container's log (bounded in lines and bytes; secrets masked)."""

        async def body(call: ToolCall) -> str:
            settings = endpoint.settings(call.caller)
            path = paths.target("pods").path(namespace, pod, "log")
            query = [("tailLines", str(min(tail_lines, settings.max_log_lines))),
                     ("limitBytes", str(settings.max_log_bytes))]  # fmt: skip
            if container:
                query.append(("container", paths.check_name(container)))
            if previous:
                query.append(("previous", "true"))
            answer = await api(call, ctx, method="GET", path=path, query=calls.query_string(query),
                               max_bytes=settings.max_log_bytes)  # fmt: skip
            text = answer.body.decode(errors="replace")
            return text + ("\n[truncated]" if answer.truncated else "")

        return await run(ctx, "logs", reason, _args(pod=pod, namespace=namespace, container=container,
                         tail_lines=tail_lines, previous=previous), body)  # fmt: skip

    # -- writes -------------------------------------------------------------------------------------------

    @server.tool(structured_output=False)
    async def apply(
        manifest: Annotated[str, Field(min_length=1, max_length=512 * 1024, description="One object, YAML or JSON.")],
        reason: Reason, ctx: Context, namespace: Namespace = None,
        resource: Annotated[str | None, Field(default=None, description="The plural, for kinds kubegate does not know.")] = None,
        force: Annotated[bool, Field(description="Take over fields another manager owns.")] = False,
    ) -> str:  # fmt: skip
        """Server-side apply of one object (like kubectl apply --server-side)."""

        async def body(call: ToolCall) -> str:
            try:
                obj = yaml.safe_load(manifest)
            except yaml.YAMLError:
                raise paths.ArgumentError("the manifest is not valid YAML or JSON") from None
            if not isinstance(obj, dict):
                raise paths.ArgumentError("the manifest must be one object (a mapping)")
            metadata = obj.get("metadata") or {}
            name = metadata.get("name") if isinstance(metadata, dict) else None
            if not isinstance(name, str) or not name:
                raise paths.ArgumentError("the manifest has no metadata.name")
            target = paths.target_of_manifest(
                str(obj.get("apiVersion") or ""), str(obj.get("kind") or ""), resource
            )
            in_manifest = metadata.get("namespace")
            if in_manifest and namespace and in_manifest != namespace:
                raise paths.ArgumentError(
                    f"the manifest says namespace {in_manifest!r}, the call {namespace!r}"
                )
            ns = (in_manifest or namespace) if target.namespaced else None
            query = [("fieldManager", endpoint.settings(call.caller).field_manager)]
            if force:
                query.append(("force", "true"))
            # JSON is YAML: the API server takes it as apply-patch+yaml, and records can render it (masked).
            answer = await api(call, ctx, method="PATCH", path=target.path(ns, name), query=calls.query_string(query),
                               body=json.dumps(obj).encode(), content_type="application/apply-patch+yaml")  # fmt: skip
            applied = _json(answer)
            return json.dumps(
                {
                    "applied": _ref(applied),
                    "resourceVersion": (applied.get("metadata") or {}).get("resourceVersion"),
                }
            )

        return await run(ctx, "apply", reason, _args(manifest=manifest, namespace=namespace, resource=resource,
                         force=force), body)  # fmt: skip

    @server.tool(structured_output=False)
    async def delete(
        resource: ResourceName, name: ObjectName, reason: Reason, ctx: Context, namespace: Namespace = None,
        api_version: ApiVersion = None,
    ) -> str:  # fmt: skip
        """Delete one object."""

        async def body(call: ToolCall) -> str:
            target = paths.target(resource, api_version)
            answer = await api(call, ctx, method="DELETE", path=target.path(namespace, name))
            return json.dumps({"deleted": {"resource": target.resource, "namespace": namespace, "name": name},
                               "status": answer.status})  # fmt: skip

        return await run(ctx, "delete", reason, _args(resource=resource, name=name, namespace=namespace,
                         api_version=api_version), body)  # fmt: skip

    @server.tool(structured_output=False)
    async def scale(
        name: ObjectName, namespace: Annotated[str, Field(description="The namespace.")],
        replicas: Annotated[int, Field(ge=0, le=10000)], reason: Reason, ctx: Context,
        resource: ResourceName = "deployments",
    ) -> str:  # fmt: skip
        """Set the replicas of a deployment, statefulset or replicaset (its scale subresource)."""

        async def body(call: ToolCall) -> str:
            target = paths.target(resource)
            patch = json.dumps({"spec": {"replicas": replicas}}).encode()
            answer = await api(call, ctx, method="PATCH", path=target.path(namespace, name, "scale"), body=patch,
                               content_type="application/merge-patch+json")  # fmt: skip
            scaled = _json(answer)
            return json.dumps({"scaled": name, "replicas": (scaled.get("spec") or {}).get("replicas")})

        return await run(ctx, "scale", reason, _args(resource=resource, name=name, namespace=namespace,
                         replicas=replicas), body)  # fmt: skip

    @server.tool(structured_output=False)
    async def rollout_restart(
        name: ObjectName, namespace: Annotated[str, Field(description="The namespace.")], reason: Reason,
        ctx: Context, resource: ResourceName = "deployments",
    ) -> str:  # fmt: skip
        """Restart a deployment's, statefulset's or daemonset's pods (the patch kubectl rollout restart sends)."""

        async def body(call: ToolCall) -> str:
            target = paths.target(resource)
            if target.resource not in ("deployments", "statefulsets", "daemonsets"):
                raise paths.ArgumentError("rollout_restart takes deployments, statefulsets or daemonsets")
            now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            patch = {
                "spec": {
                    "template": {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": now}}}
                }
            }
            await api(call, ctx, method="PATCH", path=target.path(namespace, name), body=json.dumps(patch).encode(),
                      content_type="application/strategic-merge-patch+json")  # fmt: skip
            return json.dumps({"restarted": name, "restartedAt": now})

        return await run(ctx, "rollout_restart", reason, _args(resource=resource, name=name,
                         namespace=namespace), body)  # fmt: skip

    @server.tool(structured_output=False)
    async def exec(
        pod: ObjectName, namespace: Annotated[str, Field(description="The pod's namespace.")],
        command: Annotated[list[Annotated[str, Field(max_length=4096)]], Field(min_length=1, max_length=64,
                           description="The command and its arguments (no shell unless you run one).")],
        reason: Reason, ctx: Context, container: Annotated[str | None, Field(default=None, max_length=253)] = None,
        timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 30,
    ) -> str:  # fmt: skip
        """Run a command in a container (no stdin, no terminal) and return its output (bounded; masked)."""

        async def body(call: ToolCall) -> str:
            settings = endpoint.settings(call.caller)
            path = paths.target("pods").path(namespace, pod, "exec")
            query = [("command", part) for part in command] + [("stdout", "true"), ("stderr", "true")]
            if container:
                query.append(("container", paths.check_name(container)))
            output = await waiting(ctx, call, calls.exec_command(
                endpoint.gateway, call.caller, path=path, query=calls.query_string(query), reason=call.reason,
                tool=call.tool, max_bytes=settings.max_exec_output_bytes,
                time_limit=min(timeout_seconds, settings.max_exec_seconds)), path)  # fmt: skip
            call.request_ids.append(output.request_id)
            if output.refused is not None:
                raise ToolError(f"{output.refused.status}: {output.refused.message()}")
            result: dict[str, Any] = {
                "stdout": output.stdout.decode(errors="replace"),
                "stderr": output.stderr.decode(errors="replace"),
                "exit_code": _exit_code(output.exit_status),
            }
            if output.truncated:
                result["truncated"] = True
            if output.timed_out:
                result["timed_out"] = True
            return json.dumps(result)

        return await run(ctx, "exec", reason, _args(pod=pod, namespace=namespace, command=command,
                         container=container, timeout_seconds=timeout_seconds), body)  # fmt: skip

    return server


def _args(**arguments: Any) -> dict[str, Any]:
    return {key: value for key, value in arguments.items() if value is not None}


def _json(answer: calls.Answer) -> dict[str, Any]:
    if answer.truncated:
        raise ToolError(
            "the answer is larger than this connection's mcp.max_result_bytes: narrow the request"
        )
    try:
        value = answer.json()
    except ValueError:
        raise ToolError("the API server's answer is not JSON") from None
    if not isinstance(value, dict):
        raise ToolError("the API server's answer is not a JSON object")
    return value


def _trim(obj: dict[str, Any]) -> dict[str, Any]:
    metadata = obj.get("metadata")
    if isinstance(metadata, dict):
        metadata.pop("managedFields", None)
    return obj


def _ref(obj: dict[str, Any]) -> dict[str, Any]:
    metadata = obj.get("metadata") or {}
    return {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "namespace": metadata.get("namespace"),
            "name": metadata.get("name")}  # fmt: skip


def _summary(item: dict[str, Any]) -> dict[str, Any]:
    metadata = item.get("metadata") or {}
    status = item.get("status") or {}
    summary: dict[str, Any] = {"name": metadata.get("name")}
    for key, value in (("namespace", metadata.get("namespace")), ("labels", metadata.get("labels")),
                       ("created", metadata.get("creationTimestamp")), ("phase", status.get("phase")),
                       ("replicas", status.get("replicas")), ("ready", status.get("readyReplicas"))):  # fmt: skip
        if value is not None:
            summary[key] = value
    return summary


def _exit_code(status: dict[str, Any] | None) -> int | None:
    """The exit code in an exec's final Status: 0 on Success, the ExitCode cause otherwise."""
    if not status:
        return None
    if status.get("status") == "Success":
        return 0
    for cause in (status.get("details") or {}).get("causes") or []:
        if cause.get("reason") == "ExitCode":
            try:
                return int(cause.get("message", ""))
            except ValueError:
                return None
    return None
