"""Masked values in representations beside the object itself (red team, masking2): the last-applied
annotation kubectl writes without a namespace, pod templates kept elsewhere (ControllerRevisions), the API
server's own refusal messages, and response headers. Each test fails on the code before its fix."""

from __future__ import annotations

import base64
import json
import re
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import orjson
import pytest

from kubegate.plugins.masking import JsonBody, Masking, MaskingSettings, WatchLines
from kubegate.plugins.masking.objects import LAST_APPLIED

MARKER = "<masked by kubegate>"
ENV_VALUE = "s3cr3t-env-value-not-in-any-secret"  # no known value, no detector: only the name rules see it
HOOK = "https://hooks.example.invalid/T0k3nInTheUrlPath"
RULE = {"namespaces": "prod", "names": "app-*", "keys": ["*_URL"]}


def flow(resource: str, verb: str = "get") -> Any:
    return SimpleNamespace(attributes=SimpleNamespace(resource=resource, verb=verb), state={},
                           connection=SimpleNamespace(name="c"), request=SimpleNamespace(path="/x"))  # fmt: skip


def served(masking: Masking, doc: Any, resource: str) -> str:
    body = JsonBody(masking, flow(resource), None)
    return (body.feed(orjson.dumps(doc)) + body.end()).decode()


# -- the last-applied annotation ----------------------------------------------------------------------------


def configmap(applied_meta: dict[str, Any]) -> dict[str, Any]:
    # `kubectl create configmap app-hooks --from-literal=SLACK_URL=… --save-config` in a context whose namespace
    # is prod: create_configmap.go sets Namespace only with EnforceNamespace (-n), so the annotation has none.
    applied = {"apiVersion": "v1", "kind": "ConfigMap", "data": {"SLACK_URL": HOOK, "MODE": "fast"},
               "metadata": {"creationTimestamp": None, **applied_meta}}  # fmt: skip
    return {"kind": "ConfigMap", "apiVersion": "v1",
            "metadata": {"name": "app-hooks", "namespace": "prod",
                         "annotations": {LAST_APPLIED: json.dumps(applied, separators=(",", ":")) + "\n"}},
            "data": {"SLACK_URL": HOOK, "MODE": "fast"}}  # fmt: skip


@pytest.mark.parametrize(
    "applied_meta",
    [{"name": "app-hooks"}, {}, {"name": "other", "namespace": "staging"}],
    ids=["no-namespace", "no-metadata-names", "names-that-differ"],
)
def test_configmap_keys_in_the_last_applied_annotation_match_the_enclosing_object(applied_meta):
    """The annotation is masked as the object it says it is and as the ConfigMap it is on: either reading
    matching a `configmap_keys` rule masks the key."""
    masking = Masking(MaskingSettings(configmap_keys=[RULE]))
    for resource, doc in [
        ("configmaps", configmap(applied_meta)),
        ("configmaps", {"kind": "ConfigMapList", "apiVersion": "v1", "metadata": {},
                        "items": [{k: v for k, v in configmap(applied_meta).items() if k != "kind"}]}),
        # `?includeObject=Metadata` / `kubectl get --show-managed-fields -o metadata`: no data, the annotation
        ("configmaps", {**configmap(applied_meta), "kind": "PartialObjectMetadata", "data": None}),
    ]:  # fmt: skip
        out = json.loads(served(masking, doc, resource))
        obj = out["items"][0] if "items" in out else out
        assert HOOK not in json.dumps(out)
        applied = json.loads(obj["metadata"]["annotations"][LAST_APPLIED])
        assert applied["data"] == {"SLACK_URL": MARKER, "MODE": "fast"}  # the other key is kept
        assert applied["metadata"] == {"creationTimestamp": None, **applied_meta}  # what it says is kept


def test_last_applied_of_another_namespace_or_name_is_not_masked_by_the_rule():
    masking = Masking(MaskingSettings(configmap_keys=[RULE]))
    doc = configmap({"name": "app-hooks"})
    doc["metadata"]["namespace"] = "staging"
    out = json.loads(served(masking, doc, "configmaps"))
    assert out["data"]["SLACK_URL"] == HOOK
    assert json.loads(out["metadata"]["annotations"][LAST_APPLIED])["data"]["SLACK_URL"] == HOOK


# -- env lists outside the pod templates the masker knows ------------------------------------------------------

TEMPLATE = {"metadata": {"labels": {"app": "db"}},
            "spec": {"containers": [{"name": "db", "image": "postgres",
                                     "env": [{"name": "DB_PASSWORD", "value": ENV_VALUE},
                                             {"name": "PGDATA", "value": "/var/lib/pg"}]}]}}  # fmt: skip
# What the StatefulSet and DaemonSet controllers store (history.go / controller_history.go: the template as a
# strategic-merge patch, `$patch: replace`); `kubectl rollout history statefulset/db --revision=1` prints it.
REVISION = {"kind": "ControllerRevision", "apiVersion": "apps/v1",
            "metadata": {"name": "db-7d9f8b6c5", "namespace": "prod"}, "revision": 1,
            "data": {"spec": {"template": {"$patch": "replace", **TEMPLATE}}}}  # fmt: skip
CUSTOM = {"kind": "Workflow", "apiVersion": "argoproj.io/v1alpha1", "metadata": {"name": "w", "namespace": "prod"},
          "spec": {"templates": [{"name": "main", "container": {"image": "x", "env": TEMPLATE["spec"][
              "containers"][0]["env"]}}]}}  # fmt: skip


@pytest.mark.parametrize(
    ("resource", "doc"),
    [
        ("controllerrevisions", REVISION),
        ("controllerrevisions", {"kind": "ControllerRevisionList", "apiVersion": "apps/v1", "metadata": {},
                                 "items": [{k: v for k, v in REVISION.items() if k != "kind"}]}),
        ("controllerrevisions", {"type": "ADDED", "object": REVISION}),
        ("workflows", CUSTOM),
        # a pod template the masker reads (counted twice: as its own kind and the path's) beside one it does not
        ("deployments", {"kind": "Rollout", "metadata": {"name": "r"}, "spec": {
            "template": TEMPLATE, "canary": {"analysis": {"env": TEMPLATE["spec"]["containers"][0]["env"]}}}}),
        # the last-applied annotation of a custom resource
        ("workflows", {**CUSTOM, "spec": {}, "metadata": {"name": "w", "annotations": {
            LAST_APPLIED: json.dumps(CUSTOM)}}}),
    ],
)  # fmt: skip
def test_env_values_are_masked_by_name_in_any_env_list(resource, doc):
    masking = Masking(MaskingSettings())
    out = served(masking, json.loads(json.dumps(doc)), resource)
    assert ENV_VALUE not in out
    assert "/var/lib/pg" in out  # only values of secret-looking names
    if doc.get("type") is None:
        return
    watch = WatchLines(masking, flow(resource, "watch"), None)
    assert ENV_VALUE not in (watch.feed(orjson.dumps(doc) + b"\n") + watch.end()).decode()


# -- the API server's refusals quoting a pod template --------------------------------------------------------

FORBIDDEN = (
    'Pod "web" is invalid: spec: Forbidden: pod updates may not change fields other than '
    "`spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,"
    "`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` "
    "(allow it to be set to 1 if it was previously negative)\n"
)
# ValidatePodUpdate (kubernetes pkg/apis/core/validation/validation.go) appends cmp.Diff(oldPod.Spec,
# mungedPodSpec) to that message; cmp prints changed entries whole and neighbouring fields as context.
POD_DIFF_COMPACT = FORBIDDEN + (  # a resources change: the env list beside it, elided to one line
    "  core.PodSpec{\n  \tContainers: []core.Container{\n  \t\t{\n  \t\t\t... // 6 identical fields\n"
    "  \t\t\tEnvFrom: nil,\n"
    f'  \t\t\tEnv:     {{{{Name: "DB_PASSWORD", Value: "{ENV_VALUE}"}}, {{Name: "PGDATA", Value: "/pg"}}}},\n'
    "  \t\t\tResources: core.ResourceRequirements{\n"
    '- \t\t\t\tRequests: core.ResourceList{s"memory": {s: "10Gi"}},\n'
    '+ \t\t\t\tRequests: core.ResourceList{s"memory": {s: "2Gi"}},\n'
    "  \t\t\t},\n  \t\t},\n  \t},\n  \t... // 28 identical fields\n  }\n"
)
POD_DIFF_LINES = FORBIDDEN + (  # the env entry itself changed: name and value on lines of their own
    "  core.PodSpec{\n  \tContainers: []core.Container{\n  \t\t{\n  \t\t\tEnv: []core.EnvVar{\n"
    "  \t\t\t\t{\n"
    '  \t\t\t\t\tName:      "DB_PASSWORD",\n'
    f'- \t\t\t\t\tValue:     "{ENV_VALUE}",\n'
    f'+ \t\t\t\t\tValue:     "{ENV_VALUE}-new",\n'
    "  \t\t\t\t\tValueFrom: nil,\n  \t\t\t\t},\n"
    f'- \t\t\t\t{{Name: "API_KEY", Value: "{ENV_VALUE}-k"}},\n'  # a removed entry, printed whole
    "  \t\t\t},\n  \t\t},\n  \t},\n  }\n"
)
# cmp prints a removed or inserted string of four lines or more as a """ block (report_reflect.go
# formatString) and a changed multi-line string as strings.Join of its lines (report_slices.go).
POD_DIFF_MULTILINE = FORBIDDEN + (
    '  \t\t\tEnv: []core.EnvVar{\n  \t\t\t\t{\n  \t\t\t\t\tName: "TLS_KEY",\n'
    '- \t\t\t\t\tValue: """\n'
    "- \t\t\t\t\t-----BEGIN FAKE KEY-----\n"
    f"- \t\t\t\t\t{ENV_VALUE}\n- \t\t\t\t\t{ENV_VALUE}\n"
    "- \t\t\t\t\t-----END FAKE KEY-----\n"
    '- \t\t\t\t\t"""\n'
    "  \t\t\t\t},\n"
    '  \t\t\t\t{\n  \t\t\t\t\tName: "CERT",\n'
    "  \t\t\t\t\tValue: strings.Join({\n"
    f'- \t\t\t\t\t\t"{ENV_VALUE}",\n'
    '+ \t\t\t\t\t\t"other",\n'
    '  \t\t\t\t\t}, "\\n"),\n'
    "  \t\t\t\t},\n  \t\t\t},\n"
)
# ValidateJobSpecUpdate → ValidateImmutableField → field.Invalid(path, newVal): field.Error.ErrorBody prints a
# struct BadValue with %#v (apimachinery pkg/util/validation/field/errors.go), the whole template.
JOB_IMMUTABLE = (
    'Job.batch "migrate" is invalid: spec.template: Invalid value: core.PodTemplateSpec{ObjectMeta:'
    'v1.ObjectMeta{Name:"", Labels:map[string]string{"job-name":"migrate"}}, Spec:core.PodSpec{'
    'Containers:[]core.Container{core.Container{Name:"migrate", Image:"app:2", '
    f'Env:[]core.EnvVar{{core.EnvVar{{Name:"DB_PASSWORD", Value:"{ENV_VALUE}", '
    'ValueFrom:(*core.EnvVarSource)(nil)}, core.EnvVar{Name:"HOST", Value:"db\\"1\\"", '
    'ValueFrom:(*core.EnvVarSource)(nil)}}}}, RestartPolicy:"Never"}}: field is immutable'
)


def status(message: str, kind: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": "Invalid", "code": 422,
            "details": {"name": "x", "kind": kind,
                        "causes": [{"reason": "FieldValueInvalid", "field": "spec",
                                    "message": message.split(": ", 1)[1]}]}}  # fmt: skip


@pytest.mark.parametrize(
    ("resource", "message"),
    [
        ("pods", POD_DIFF_COMPACT),
        ("pods", POD_DIFF_LINES),
        ("pods", POD_DIFF_MULTILINE),
        ("jobs", JOB_IMMUTABLE),
    ],
    ids=["cmp-compact", "cmp-lines", "cmp-multiline", "go-syntax"],
)
def test_value_fields_quoted_in_the_api_servers_refusals_are_masked(resource, message):
    """`kubectl patch pod web --dry-run=server -p …` (422) or re-applying a Job whose template changed: the
    refusal quotes the pod template, env values included, that a GET of the object masks."""
    masking = Masking(MaskingSettings())
    out = json.loads(served(masking, status(message, "Pod"), resource))
    for text in (out["message"], out["details"]["causes"][0]["message"]):
        assert ENV_VALUE not in text, text
        assert "/pg" not in text and 'db\\"1' not in text  # every Value, whatever its name
        assert re.search(r'Name:\s*"(DB_PASSWORD|TLS_KEY)"', text)  # names are kept
        assert re.search(rf'Value:\s*"{MARKER}"', text)
    assert out["message"][:60] == message[:60]  # the reason itself is kept
    # A watch's ERROR event carries a Status too
    watch = WatchLines(masking, flow(resource, "watch"), None)
    event = {"type": "ERROR", "object": status(message, "Pod")}
    assert ENV_VALUE not in (watch.feed(orjson.dumps(event) + b"\n") + watch.end()).decode()


# -- response headers -------------------------------------------------------------------------------------------

KNOWN = "hunter2-prod-s3cret"  # a value the connection learned from its Secrets


def header_flow(headers: list[tuple[str, str]], subresource: str = "proxy", **settings: Any) -> Any:
    """The response to `GET …/pods/web/proxy/` (or another subresource) on a masked connection, as the
    response-headers hook sees it."""
    masking = Masking(MaskingSettings.model_validate(settings))
    masking.set_known({KNOWN})
    attributes = SimpleNamespace(resource="pods", verb="get", subresource=subresource, is_resource_request=True,
                                 is_streaming_subresource=False)  # fmt: skip
    return SimpleNamespace(
        attributes=attributes, state={}, identity=None, upstream_headers=[],
        connection=SimpleNamespace(name="c", state={"masking": masking}),
        request=SimpleNamespace(path="/api/v1/namespaces/prod/pods/web/proxy/", websocket=False),
        response=SimpleNamespace(status=200, headers=list(headers)),
    )  # fmt: skip


def test_response_header_values_are_masked_names_and_framing_kept():
    from kubegate.plugins.masking import kubegate_response_headers

    f = header_flow([
        ("Content-Type", "application/json"),
        ("X-Upstream-Token", KNOWN),
        ("Location", f"https://db.example.invalid/?token={KNOWN}&next=%2F"),
        ("Link", f"<https://x.invalid/{base64.b64encode(KNOWN.encode()).decode()}>; rel=next"),
        ("Warning", f'299 - "admission webhook \\"audit\\": password={"plain-" + "pw1234"} seen"'),
        ("X-Url-Encoded", quote(f"a {KNOWN}", safe="")),
        ("X-Utf8", f"é {KNOWN}".encode().decode("latin-1")),  # as the host reads raw bytes
        ("Set-Cookie", "session=opaque-pod-session; Path=/; HttpOnly"),
        ("X-Plain", "nothing to see"),
    ])  # fmt: skip
    kubegate_response_headers(f)
    out = dict(f.response.headers)
    assert [name for name, _ in f.response.headers] == ["Content-Type", "X-Upstream-Token", "Location", "Link",
                                                        "Warning", "X-Url-Encoded", "X-Utf8", "Set-Cookie",
                                                        "X-Plain"]  # fmt: skip
    text = "\n".join(out.values())
    assert (
        KNOWN not in text and "pw1234" not in text and base64.b64encode(KNOWN.encode()).decode() not in text
    )
    assert quote(KNOWN, safe="") not in text
    assert out["X-Upstream-Token"] == MARKER
    assert out["Location"] == f"https://db.example.invalid/?token={MARKER}&next=%2F"
    assert out["X-Utf8"] == f"é {MARKER}".encode().decode("latin-1")
    # the pod's cookie goes with its name and attributes, never its value
    assert out["Set-Cookie"] == f"session={quote(MARKER, safe='')}; Path=/; HttpOnly"
    assert out["X-Plain"] == "nothing to see" and out["Content-Type"] == "application/json"
    assert not any(c in value for value in out.values() for c in "\r\n\x00")
    for _, value in f.response.headers:
        value.encode("latin-1")  # as the host sends it


def test_the_api_servers_content_type_stays_a_media_type_a_pods_is_masked_whole():
    from kubegate.plugins.masking import kubegate_response_headers

    # A Secret whose value is a media type must not make every API answer undecodable.
    own = header_flow([("Content-Type", f"application/json;charset=utf-8;x={KNOWN}")], subresource="")
    own.connection.state["masking"].set_known({KNOWN, "application/json"})
    kubegate_response_headers(own)
    assert own.response.headers == [("Content-Type", f"application/json;charset=utf-8;x={MARKER}")]
    proxied = header_flow([("Content-Type", f"text/{KNOWN}")])
    kubegate_response_headers(proxied)
    assert KNOWN not in str(proxied.response.headers)


def test_headers_of_an_exempt_caller_or_an_unmasked_connection_pass():
    from kubegate.plugins.masking import kubegate_response_headers

    f = header_flow([("X-Upstream-Token", KNOWN)])
    f.state["masking"] = {"exempt": True}
    kubegate_response_headers(f)
    assert f.response.headers == [("X-Upstream-Token", KNOWN)]


def test_custom_patterns_are_applied_to_each_header_value_on_its_own():
    from kubegate.plugins.masking import kubegate_response_headers

    # Anchored at a value's start: a joined pass would see only the first header's start.
    f = header_flow([("X-A", "fine"), ("X-B", "tok_abcdef123")], patterns=["^tok_[a-z0-9]+"])
    kubegate_response_headers(f)
    assert f.response.headers == [("X-A", "fine"), ("X-B", MARKER)]
