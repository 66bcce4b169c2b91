"""Holding requests until reviewers decide, and the reviewers' actions.

A held request is bound to its exact intent: connection, identity (user and groups), verb, resource, the
full path and query as sent, the SHA-256 of the body, the body's media type as the API server reads it
(the same bytes are another change as a merge patch than as a strategic merge patch), the exec command,
and the rule that held it with what that rule asked of reviewers — and, for a request that may create its
object without the verb create (a server-side apply, a PUT the API server creates on), that it may:
approving a merge patch never releases the same bytes sent as an apply that creates. The same intent
retried attaches to the same approval request, so a client that gave up and retries proceeds once it is
approved; any other request needs its own approval.

Reviewers are shown the whole body (masked), never a cut of it: a body whose masked rendering is too long
to show whole is refused before it is held (413).

Waiting is a poll of the database (every `POLL_SECONDS`), woken at once by an approval given through the
same process: an approval given on another replica releases the request within `POLL_SECONDS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from kubegate.core import bodies
from kubegate.core.attributes import may_create
from kubegate.core.db import Database
from kubegate.core.errors import StatusError
from kubegate.core.flow import ApprovalSpec, AuditEvent, Decision, Flow, Identity, Verdict
from kubegate.core.people import EXCHANGED_FROM_CLAIM, PeopleResolver, normalize, person_key

from . import store

if TYPE_CHECKING:
    from kubegate.connections.registry import Connection

log = logging.getLogger("kubegate.approvals")
POLL_SECONDS = 0.5
REPEAT_SECONDS = 30.0
# How much longer than the request body cap the masked rendering shown to reviewers may be: JSON rendered
# again escapes non-ASCII text (up to 3x), protobuf and YAML aliases expand further.
SHOWN_BODY_FACTOR = 4


class ReviewError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Intent:
    fields: dict[str, Any]

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.fields, sort_keys=True).encode()).hexdigest()


# exec/attach/port-forward arrive as GET (WebSocket) or POST (SPDY); the API server authorizes them as
# `create` on the subresource, and so does the policy (its `api_verb`): an intent names the verb the same way.
CONNECT_SUBRESOURCES = frozenset({"pods/exec", "pods/attach", "pods/portforward"})


def authorized_verb(verb: str, resource: str) -> str:
    return "create" if resource in CONNECT_SUBRESOURCES else verb


def bound_media_type(flow: Flow, body: bytes) -> str:
    """The body's media type as the API server will read it, which the intent binds: the patch type of a
    PATCH (handlers/patch.go picks JSON, merge, strategic-merge or apply from the Content-Type alone), the
    serializer of a POST/PUT/DELETE body (JSON, YAML, protobuf; parameters ignored); "" without a body.
    Raises BodyError (415, as the API server answers) for a type it would refuse, or for two Content-Type
    headers (which one counts could differ between hops). A body the API server does not decode (a
    pod's, through `proxy`; exec/attach/port-forward) binds its Content-Type as sent."""
    if not body:
        return ""
    content_type = ", ".join(flow.request.header_values("content-type"))
    attrs = flow.attributes
    if not attrs.is_resource_request or attrs.is_proxy or attrs.resource_path in CONNECT_SUBRESOURCES:
        return content_type
    method = flow.request.method.upper()
    if method == "PATCH":
        return bodies.patch_media_type(content_type)
    if method in ("POST", "PUT", "DELETE"):
        return bodies.object_media_type(content_type)
    return content_type  # a GET's body: the API server reads none


def intent_of(flow: Flow, body: bytes, media_type: str, decision: Decision) -> Intent:
    attrs = flow.attributes
    assert flow.identity is not None
    # The canonical query is what upstream receives, so an approval binds exactly what will run.
    path = flow.request.path + (f"?{flow.request.query}" if flow.request.query else "")
    # Whether it may create its object: a key only when it may
    creates = {"creates": True} if may_create(attrs, flow.request.header_values("content-type")) else {}
    return Intent(
        creates
        | {
            "connection": flow.connection.name,
            "user": flow.identity.user,
            "groups": sorted(flow.identity.groups),
            "verb": authorized_verb(attrs.verb, attrs.resource_path),
            "resource": attrs.resource_path,
            "namespace": attrs.namespace,
            "name": attrs.name,
            "path": path,
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "media_type": media_type,
            # The command exactly as the API server will decode it (every value, in order, blanks kept).
            "command": list(attrs.command),
            # What reviewers were asked under: a reload that renames the rule or changes whom it asks (or
            # how many) makes its open approvals release nothing; the request is held again under the new one.
            "rule": decision.rule,
            "approval": _requirement(decision.approval),
        }
    )


def _requirement(spec: ApprovalSpec | None) -> dict[str, Any] | None:
    if spec is None:
        return None
    return {"reviewer_groups": sorted(spec.reviewer_groups), "min_approvals": spec.min_approvals,
            "scope": spec.scope, "window_seconds": spec.window_seconds}  # fmt: skip


def _masked_path(flow: Flow, path: str) -> str:
    """An intent's path and query as records keep it: the exec command line in the query masked
    (`kubegate_record_query`)."""
    route, mark, query = path.partition("?")
    if not mark:
        return path
    masked = flow.connection.hooks.record_query(flow, query)
    return path if masked == query else f"{route}?{masked}"


def _shown_body(flow: Flow, body: bytes) -> str:
    """The whole body as reviewers see it (`kubegate_record_body`: masked); only its size and hash when no
    plugin renders it — a body is never shown as it came. Never cut: an approval binds every byte of the
    body, so a reviewer shown only its start could approve what comes after the cut unseen."""
    attrs = flow.attributes
    method = flow.request.method.upper()
    if (body and method in ("POST", "PUT", "PATCH") and attrs.is_resource_request and not attrs.is_proxy
            and attrs.resource_path not in CONNECT_SUBRESOURCES):  # fmt: skip
        # A body the API server decodes and the gateway cannot (a duplicate key, invalid JSON): reviewers
        # would approve bytes they were shown only as a size and a hash, which the API server reads its way.
        try:
            bodies.decode_write_body(method, flow.request.header("content-type"), body)
        except bodies.BodyError as exc:
            raise StatusError(
                exc.status, f"the request body cannot be shown to reviewers, so it cannot be approved: {exc}"
            ) from None
    rendered = flow.connection.hooks.record_body(flow, body)
    if rendered is None:
        digest = hashlib.sha256(body).hexdigest()[:16]
        rendered = f"<{len(body)} bytes, not decoded, sha256 {digest}…>" if body else ""
    bound = SHOWN_BODY_FACTOR * flow.connection.limits.max_request_body_bytes
    if len(rendered) > bound:
        raise StatusError(
            413, f"the request body is too large to show reviewers whole ({len(rendered)} characters "
            f"masked, at most {bound}), so it cannot be approved: send it in smaller requests"
        )  # fmt: skip
    return rendered


def _stated_intent(flow: Flow) -> str:
    """The requester's stated reason as reviewers see it: masked (`kubegate_record_text`), like the body."""
    if not flow.intent:
        return ""
    return flow.connection.hooks.record_text(flow, flow.intent.encode()).decode(errors="replace")


async def emit(connection: Connection, kind: str, flow_id: str, data: dict[str, Any]) -> None:
    """An audit event through the connection's audit hooks (approval events are audited like requests)."""
    if not connection.hooks.has_audit:
        return
    event = AuditEvent(kind=kind, flow_id=flow_id, connection=connection.name, time=time.time(), data=data)
    try:
        await connection.hooks.audit_event(event, connection)
    except Exception:
        log.exception("audit hook failed for %s", kind)


def requester_person(record: store.ApprovalRecord) -> str:
    """The requester's person key; a record held before person keys existed has its user name instead."""
    return record.requester_person or normalize(record.requester)


def approver_person(approval: dict[str, Any]) -> str:
    """The person key of one approval entry (an entry made before person keys: its user name)."""
    return str(approval.get("person") or normalize(approval["reviewer"]))


def _summary(record: store.ApprovalRecord) -> dict[str, Any]:
    return {
        "approval_id": record.id,
        "rule": record.rule,
        "requester": record.requester,
        "requester_person": requester_person(record),
        "verb": record.verb,
        "resource": record.resource,
        "namespace": record.namespace,
        "name": record.name,
        "path": record.path,
        "media_type": record.media_type,
        "command": record.command,
        "intent": record.intent,
        "state": record.state,
        "approvals": record.approvals,
        "denial": record.denial,
    }


class ApprovalService:
    def __init__(self, database: Database, connections: Any):
        self.db = database
        self.connections = connections
        self._wakeups: dict[str, asyncio.Event] = {}

    # -- the held side -----------------------------------------------------------------------------------

    async def hold(self, flow: Flow, decision: Decision) -> Decision:
        spec = decision.approval
        identity = flow.identity
        if spec is None or identity is None:
            return Decision(Verdict.DENY, decision.reason or "this request needs approval", decision.rule)
        connection = flow.connection
        if spec.scope == "window":
            grant = await self.db.run(
                lambda s: store.active_grant(s, connection.name, identity.user, decision.rule)
            )
            if grant is not None:
                flow.state["approval"] = {"grant_id": grant.id, "approval_id": grant.approval_id}
                await emit(connection, "grant.used", flow.id, {"grant_id": grant.id, "rule": decision.rule,
                                                                "user": identity.user, "path": flow.request.path})  # fmt: skip
                return Decision(Verdict.ALLOW, f"within grant {grant.id}", decision.rule, "approvals")
        body = b"" if flow.request.websocket else await flow.request.read_body()
        try:
            media_type = bound_media_type(flow, body)
        except bodies.BodyError as exc:
            # The API server would refuse it too (415): answered now, as the policy answers a condition
            # that needed this body, rather than asking a reviewer to approve what cannot run.
            flow.decision = Decision(Verdict.DENY, str(exc), decision.rule, "approvals")
            raise StatusError(exc.status, str(exc)) from None
        intent = intent_of(flow, body, media_type, decision)
        record = await self.db.run(lambda s: store.find_open(s, intent.hash))
        if record is None:
            # kubectl retries a refused exec/attach/port-forward WebSocket at once over SPDY; that retry
            # (and any immediate one) gets the same answer instead of a new request to review.
            refused = await self.db.run(lambda s: store.recently_refused(s, intent.hash, REPEAT_SECONDS))
            if refused is not None:
                flow.state["approval"] = {"approval_id": refused.id}
                return await self._outcome(flow, refused, decision.rule)
        if record is None:
            try:
                record = self._new_record(flow, decision, intent, body, identity)
            except StatusError as exc:
                flow.decision = Decision(Verdict.DENY, exc.message, decision.rule, "approvals")
                raise
            await self.db.run(lambda s: store.add(s, record))
            log.info("approval %s: %s %s held for %s (rule %s)", record.id, record.verb, record.path,
                     record.requester, record.rule)  # fmt: skip
            await emit(connection, "approval.requested", flow.id, _summary(record))
        flow.state["approval"] = {"approval_id": record.id}
        final = await self._wait(record.id, flow)
        if final is None:
            # The client left; the request stays for the reviewers, and a retry of it attaches to it.
            await emit(connection, "approval.client_left", flow.id, {"approval_id": record.id})
            return Decision(Verdict.DENY, "the client went away while waiting for approval", decision.rule)
        return await self._outcome(flow, final, decision.rule)

    def _new_record(
        self, flow: Flow, decision: Decision, intent: Intent, body: bytes, identity: Identity
    ) -> store.ApprovalRecord:
        spec = decision.approval
        assert spec is not None
        now = time.time()
        fields = intent.fields
        return store.ApprovalRecord(
            id=store.new_id(),
            intent_hash=intent.hash,
            connection=flow.connection.name,
            rule=decision.rule,
            reason=decision.reason,
            requester=identity.user,
            requester_person=person_key(identity),
            requester_groups=list(identity.groups),
            requester_method=identity.method,
            requester_claims=identity.claims,
            verb=fields["verb"],
            resource=fields["resource"],
            namespace=fields["namespace"],
            name=fields["name"],
            # Reviewers and the audit see the path and command masked; the intent hash binds them in clear.
            path=_masked_path(flow, fields["path"]),
            body_sha256=fields["body_sha256"],
            media_type=fields["media_type"],
            body=_shown_body(flow, body),
            command=flow.connection.hooks.record_command(flow, fields["command"]),
            kubectl_command=flow.kubectl_command,
            intent=_stated_intent(flow),
            reviewer_groups=list(spec.reviewer_groups),
            min_approvals=spec.min_approvals,
            scope=spec.scope,
            window_seconds=spec.window_seconds,
            created_at=now,
            expires_at=now + spec.ttl_seconds,
        )

    async def _wait(self, approval_id: str, flow: Flow) -> store.ApprovalRecord | None:
        """Until the request is decided or expires (the final record), or the client leaves (None)."""
        gone = asyncio.ensure_future(flow.request.wait_disconnected())
        wakeup = self._wakeups.setdefault(approval_id, asyncio.Event())
        try:
            while True:
                record = await self.db.run(lambda s: store.get(s, approval_id))
                if record is None:
                    return None
                if record.state != store.PENDING:
                    return record
                if record.expires_at <= time.time():
                    await self.db.run(
                        partial(store.change, record=record, state=store.EXPIRED, decided_at=time.time())
                    )
                    continue
                woke = asyncio.ensure_future(wakeup.wait())
                timeout = min(POLL_SECONDS, max(record.expires_at - time.time(), 0.01))
                done, _ = await asyncio.wait(
                    {gone, woke}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                woke.cancel()
                wakeup.clear()
                if gone in done:
                    return None
        finally:
            gone.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await gone
            self._wakeups.pop(approval_id, None)

    async def _outcome(self, flow: Flow, record: store.ApprovalRecord, rule: str) -> Decision:
        connection = flow.connection
        # The request's audit event says who decided it.
        flow.state.setdefault("approval", {"approval_id": record.id}).update(
            state=record.state,
            approvers=[a["reviewer"] for a in record.approvals],
            approver_persons=[approver_person(a) for a in record.approvals],
            denied_by=(record.denial or {}).get("reviewer"),
        )
        if record.state == store.DENIED:
            denial = record.denial or {}
            comment = f": {denial['comment']}" if denial.get("comment") else ""
            return Decision(Verdict.DENY, f"denied by {denial.get('reviewer', 'a reviewer')}{comment}", rule)
        if record.state == store.EXPIRED:
            await emit(connection, "approval.expired", flow.id, _summary(record))
            return Decision(
                Verdict.DENY, f"approval expired: nobody approved request {record.id} in time", rule
            )
        if record.state == store.USED:
            return Decision(Verdict.DENY, f"approval {record.id} was already used", rule)
        if record.scope == "once":
            used = await self.db.run(lambda s: store.change(s, record, state=store.USED, used_at=time.time()))
            if not used:
                return Decision(Verdict.DENY, f"approval {record.id} was already used", rule)
        reviewers = ", ".join(a["reviewer"] for a in record.approvals)
        await emit(connection, "approval.used", flow.id, _summary(record))
        return Decision(Verdict.ALLOW, f"approved by {reviewers}", rule, "approvals")

    # -- the reviewers' side -----------------------------------------------------------------------------

    async def review(
        self, approval_id: str, reviewer: Identity, approve: bool, comment: str
    ) -> store.ApprovalRecord:
        for _ in range(5):  # compare-and-set retries when two reviewers act at once
            record = await self.db.run(lambda s: store.get(s, approval_id))
            if record is None:
                raise ReviewError(404, f"no approval request {approval_id}")
            self._check_reviewer(record, reviewer, self._people(record.connection))
            if approve:
                self._check_approvable(record)
            now = time.time()
            entry = {"reviewer": reviewer.user, "person": person_key(reviewer), "method": reviewer.method,
                     "comment": comment[:1000], "at": now}  # fmt: skip
            if reviewer.claims.get(EXCHANGED_FROM_CLAIM):  # found again as the identity it came from
                entry[EXCHANGED_FROM_CLAIM] = reviewer.claims[EXCHANGED_FROM_CLAIM]
            if approve:
                approvals = [*record.approvals, entry]
                values: dict[str, Any] = {"approvals": approvals}
                # Distinct people, not identities: two credentials of one reviewer are one approval.
                if len({approver_person(a) for a in approvals}) >= record.min_approvals:
                    values.update(state=store.APPROVED, decided_at=now)
                    if record.scope == "window":
                        values["grant_id"] = store.new_id()
            else:
                values = {"state": store.DENIED, "denial": entry, "decided_at": now}
            if await self.db.run(partial(self._apply, record=record, values=values)):
                break
        else:
            raise ReviewError(409, "the request changed while it was being reviewed; try again")
        updated = await self.db.run(lambda s: store.get(s, approval_id))
        assert updated is not None
        event = self._wakeups.get(approval_id)
        if event is not None:
            event.set()
        connection = self.connections.get(updated.connection)
        if connection is not None:
            kind = (
                "approval.denied"
                if not approve
                else "approval.approved"
                if updated.state == store.APPROVED
                else "approval.partial"
            )
            await emit(connection, kind, "", {**_summary(updated), "reviewer": reviewer.user,
                                              "reviewer_person": person_key(reviewer), "comment": comment})  # fmt: skip
        log.info("approval %s: %s by %s", approval_id, "approved" if approve else "denied", reviewer.user)
        return updated

    @staticmethod
    def _apply(session: Any, record: store.ApprovalRecord, values: dict[str, Any]) -> bool:
        if not store.change(session, record, **values):
            return False
        if values.get("grant_id"):
            now = values["decided_at"]
            session.add(
                store.GrantRecord(
                    id=values["grant_id"],
                    approval_id=record.id,
                    connection=record.connection,
                    user=record.requester,
                    rule=record.rule,
                    created_at=now,
                    expires_at=now + record.window_seconds,
                )
            )
        return True

    def _people(self, connection_name: str) -> PeopleResolver | None:
        """The person rules of the config now in force (the record's connection's)."""
        connection = self.connections.get(connection_name)
        hooks = getattr(connection, "hooks", None)
        people = getattr(hooks, "people", None)
        return people if isinstance(people, PeopleResolver) else None

    @staticmethod
    def _check_approvable(record: store.ApprovalRecord) -> None:
        """Refuse to approve what reviewers could not see whole or what can release nothing: a record held
        before approvals bound the body's media type (its intent no longer matches any request) or one
        whose stored body was cut (records made before whole bodies were kept). Denying them is fine."""
        if record.media_type is None:
            raise ReviewError(
                409, f"approval request {record.id} was held before approvals bound the body's media type: "
                "it can release no request; deny it, and the requester's retry is held anew"
            )  # fmt: skip
        if record.body_truncated:
            raise ReviewError(
                409, f"the body of approval request {record.id} was stored cut, so nobody can see what it "
                "approves; deny it, and the requester's retry is held anew with the whole body"
            )  # fmt: skip

    @staticmethod
    def _check_reviewer(
        record: store.ApprovalRecord, reviewer: Identity, people: PeopleResolver | None = None
    ) -> None:
        """Refuse a review the record's state, the requester's person, the reviewer groups or an earlier
        approval by the same person forbids. With `people` (the config in force), the requester's and the
        approvers' persons are also found again by today's rules: a `people` section changed (by a
        reload) since the request was held cannot split a person in two."""
        if record.state != store.PENDING or record.expires_at <= time.time():
            state = record.state if record.state != store.PENDING else "expired"
            raise ReviewError(409, f"approval request {record.id} is {state}")
        # People, not user names: the requester's other identities (another method, another prefix) are
        # the requester too, and a second credential of a reviewer is not a second reviewer.
        person = person_key(reviewer)
        if reviewer.user == record.requester:
            raise ReviewError(403, "you cannot review your own request")
        if people is not None and not reviewer.person:
            raise ReviewError(
                403, f"{reviewer.user} has no person key (people.user_fallback is off and neither people.map "
                "nor people.claims names it), so it may not review: use a credential that names you"
            )  # fmt: skip
        requester_persons = {requester_person(record)}
        if people is not None:
            requester_persons.add(people.person_of(Identity(user=record.requester, method=record.requester_method,
                                                             claims=record.requester_claims or {})))  # fmt: skip
        if person in requester_persons - {""}:
            raise ReviewError(
                403, f"you cannot review your own request ({reviewer.user} and the requester "
                f"{record.requester} are the same person, {person})"
            )  # fmt: skip
        if not set(reviewer.groups) & set(record.reviewer_groups):
            raise ReviewError(
                403, f"only members of {', '.join(record.reviewer_groups)} may review this request"
            )
        for approval in record.approvals:
            if approval["reviewer"] == reviewer.user:
                raise ReviewError(409, "you already approved this request; another reviewer must")
            approver_persons = {approver_person(approval)}
            if people is not None:
                claims = {k: approval[k] for k in (EXCHANGED_FROM_CLAIM,) if approval.get(k)}
                approver_persons.add(people.person_of(Identity(user=approval["reviewer"],
                                                               method=str(approval.get("method", "")),
                                                               claims=claims)))  # fmt: skip
            if person in approver_persons - {""}:
                raise ReviewError(
                    409, f"you already approved this request as {approval['reviewer']} (the same person, "
                    f"{person}); another reviewer must"
                )  # fmt: skip
