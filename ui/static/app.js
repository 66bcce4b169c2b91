// kubegate web UI: fills each page's shell from the gateway's JSON APIs. No framework, no build step.
// Every state-changing request carries the CSRF token of the page (the session cookie alone is refused).
"use strict";

const csrf = document.querySelector('meta[name="csrf-token"]')?.content || "";
const body = document.body;
const content = document.getElementById("content");
const me = { user: body.dataset.user, groups: [], roles: {} };

async function api(path, options = {}) {
  const init = { credentials: "same-origin", headers: { Accept: "application/json" }, ...options };
  if (init.method && init.method !== "GET") {
    init.headers = { ...init.headers, "Content-Type": "application/json", "X-CSRF-Token": csrf };
  }
  const response = await fetch(path, init);
  if (response.status === 401) {
    window.location.assign("/ui/login");
    throw new Error("logged out");
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error || data.message || `HTTP ${response.status}`);
  return data;
}

// Elements are built, never parsed from strings: nothing from the API can become markup.
function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function show(...nodes) {
  content.replaceChildren(...nodes);
}

function fail(error) {
  show(el("p", { class: "error", role: "alert" }, `Could not load: ${error.message}`));
}

const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "—");
function ago(seconds) {
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 60) return `${seconds} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${seconds % 60} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
}
const now = () => Date.now() / 1000;

function table(headings, rows, caption) {
  return el(
    "table",
    {},
    caption ? el("caption", { text: caption }) : null,
    el("thead", {}, el("tr", {}, headings.map((h) => el("th", { scope: "col", text: h })))),
    el("tbody", {}, rows),
  );
}

function what(record) {
  const parts = [record.verb, record.resource, record.name].filter(Boolean).join(" ");
  return record.namespace ? `${parts} in ${record.namespace}` : parts;
}

// -- approvals inbox ------------------------------------------------------------------------------------

async function inbox() {
  const freshness = el("p", { class: "muted freshness", "aria-live": "off" });
  const list = el("div");
  let updated = 0;
  async function refresh() {
    try {
      const [pending, recent] = await Promise.all([
        api("/api/approvals?state=pending"),
        api("/api/approvals?state=all"),
      ]);
      list.replaceChildren(...renderInbox(pending.items, recent.items));
      updated = now();
    } catch (error) {
      list.replaceChildren(el("p", { class: "error", role: "alert" }, error.message));
    }
  }
  show(freshness, list);
  await refresh();
  setInterval(refresh, 2000);
  setInterval(() => {
    freshness.textContent = updated ? `Live: updated ${ago(now() - updated)} ago` : "Connecting…";
  }, 500);
}

function renderInbox(pending, recent) {
  const rows = pending.map((r) =>
    el(
      "tr",
      { class: isOwn(r) ? "own" : "" },
      el("td", {}, el("a", { href: `/ui/approvals/${encodeURIComponent(r.id)}` }, r.requester)),
      el("td", {}, what(r), r.command?.length ? el("code", {}, ` ${r.command.join(" ")}`) : null),
      el("td", { text: r.connection }),
      el("td", { text: r.rule }),
      el("td", { text: ago(now() - r.created_at) }),
      el("td", { text: isOwn(r) ? "your request" : "needs review" }),
    ),
  );
  const done = recent
    .filter((r) => r.state !== "pending")
    .slice(0, 10)
    .map((r) =>
      el(
        "tr",
        {},
        el("td", {}, el("a", { href: `/ui/approvals/${encodeURIComponent(r.id)}` }, r.requester)),
        el("td", { text: what(r) }),
        el("td", { text: r.connection }),
        el("td", { text: outcome(r) }),
      ),
    );
  return [
    pending.length
      ? table(["Who", "What", "Connection", "Rule", "Waiting", ""], rows, `${pending.length} waiting`)
      : el("p", { class: "empty" }, "Nothing is waiting for review."),
    done.length ? table(["Who", "What", "Connection", "Outcome"], done, "Recently decided") : null,
  ];
}

function outcome(r) {
  const reviewers = (r.approvals || []).map((a) => a.reviewer).join(", ");
  switch (r.state) {
    case "approved":
      return `approved by ${reviewers}; waiting for the client to go on`;
    case "used":
      return `approved by ${reviewers}; the held kubectl command went through`;
    case "denied":
      return `denied by ${r.denial?.reviewer || "a reviewer"}${r.denial?.comment ? `: “${r.denial.comment}”` : ""}`;
    case "expired":
      return "expired without a decision";
    default:
      return r.state;
  }
}

// -- one approval: the dialog ---------------------------------------------------------------------------

async function approval() {
  const id = body.dataset.approval;
  let record;
  try {
    record = await api(`/api/approvals/${encodeURIComponent(id)}`);
  } catch (error) {
    return fail(error);
  }
  const status = el("p", { class: "outcome", role: "status" });
  const dialog = renderApproval(record, status);
  show(dialog);
  if (["pending", "approved"].includes(record.state)) {
    const timer = setInterval(async () => {
      try {
        const latest = await api(`/api/approvals/${encodeURIComponent(id)}`);
        if (latest.state !== record.state) {
          record = latest;
          show(renderApproval(record, status));
        }
        if (!["pending", "approved"].includes(latest.state)) clearInterval(timer);
      } catch (_) {
        /* keep the last view */
      }
    }, 1000);
  }
}

function kindOfRequester(r) {
  const claims = r.requester_claims || {};
  if (r.requester.startsWith("system:serviceaccount:") || claims.repository || claims.workflow) return "CI / bot";
  if (/bot\b|-ci\b|^ci-/.test(r.requester)) return "CI / bot";
  return "person";
}

// Own requests by person, as the gateway decides self-approval: another identity of yours is still you.
function isOwn(r) {
  return r.requester === me.user || (Boolean(me.person) && r.requester_person === me.person);
}

// What a media type makes of the same bytes: the reviewer approves one reading, not the bytes alone.
const READINGS = {
  "application/strategic-merge-patch+json": "strategic merge patch: lists of known keys are merged by key",
  "application/merge-patch+json": "JSON merge patch (RFC 7386): every list given replaces the whole list",
  "application/json-patch+json": "JSON patch (RFC 6902): the operations in order",
  "application/apply-patch+yaml": "server-side apply: the fields this manager owns",
  "application/json": "the whole object, JSON",
  "application/yaml": "the whole object, YAML (shown as JSON)",
  "application/vnd.kubernetes.protobuf": "the whole object, protobuf (shown as JSON)",
};

// The record's body, pretty-printed when it is JSON; control, format (bidi) and separator characters shown
// as escapes, so that none can hide or reorder what the reviewer reads.
function shownBody(r) {
  let text = r.body ?? r.body_preview ?? "";
  try {
    text = JSON.stringify(JSON.parse(text), null, 2);
  } catch (_) {
    /* not JSON: shown as stored */
  }
  return text.replace(/[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]/gu, (c) => (c === "\n" ? c : `\\u${c.codePointAt(0).toString(16).padStart(4, "0")}`));
}

function renderApproval(r, status) {
  const own = isOwn(r);
  const canReview = !own && r.state === "pending" && (me.groups || []).some((g) => (r.reviewer_groups || []).includes(g));
  const facts = el(
    "dl",
    { class: "facts" },
    el("dt", { text: "Who" }),
    el(
      "dd",
      {},
      el("strong", { text: r.requester }),
      ` (${kindOfRequester(r)}; ${r.requester_method || "unknown method"})`,
      r.requester_person && r.requester_person !== r.requester ? el("div", {}, `person: ${r.requester_person}`) : null,
      el("br"),
      `groups: ${(r.requester_groups || []).join(", ") || "none"}`,
    ),
    el("dt", { text: "What" }),
    el(
      "dd",
      {},
      el("strong", { text: what(r) }),
      r.kubectl_command ? el("div", {}, "kubectl: ", el("code", { text: r.kubectl_command })) : null,
      r.command?.length ? el("div", {}, "command: ", el("code", { text: r.command.join(" ") })) : null,
      el("div", { class: "muted" }, el("code", { text: r.path })),
    ),
    el("dt", { text: "Where" }),
    el("dd", { text: `connection ${r.connection}` }),
    el("dt", { text: "Why" }),
    el(
      "dd",
      {},
      r.reason || "—",
      el("span", { class: "muted" }, ` (rule ${r.rule})`),
      r.intent ? el("div", {}, "stated reason: ", el("q", { text: r.intent })) : null,
    ),
    el("dt", { text: "Waiting" }),
    el(
      "dd",
      {},
      `${ago(now() - r.created_at)}; expires ${when(r.expires_at)}`,
      r.scope === "window" ? ` · approving grants a ${ago(r.window_seconds)} window` : "",
      r.min_approvals > 1 ? ` · needs ${r.min_approvals} approvals (${(r.approvals || []).length} so far)` : "",
    ),
  );
  const parts = [facts];
  // What cannot be approved: a body the record does not hold whole, or a record from before the body's
  // media type was bound (it can release no request). The gateway refuses approving them too.
  const unapprovable = r.body_truncated
    ? "The body was stored cut (a request held by an older gateway): nobody can see what it would approve. Deny it; the requester's retry is held anew."
    : r.media_type === null
      ? "This request was held before approvals bound the body's media type: it can release no request. Deny it; the requester's retry is held anew."
      : "";
  const body = shownBody(r);
  if (body) {
    const lines = body.split("\n").length;
    parts.push(
      el(
        "details",
        { open: true, class: "body" },
        el("summary", { text: `Request body (masked, ${r.body_truncated ? "CUT: only its start" : `whole: ${lines} line${lines === 1 ? "" : "s"}`})` }),
        r.media_type ? el("p", {}, "Sent as ", el("code", { text: r.media_type }), READINGS[r.media_type] ? ` — ${READINGS[r.media_type]}` : "") : null,
        el("pre", { text: body }),
      ),
    );
  }
  if (unapprovable) parts.push(el("p", { class: "note" }, unapprovable));
  if (own && r.state === "pending") {
    parts.push(el("p", { class: "note" }, "This is your own request: another reviewer has to decide it."));
  } else if (canReview) {
    const comment = el("textarea", { id: "comment", name: "comment", rows: "2", maxlength: "500" });
    const decide = (approve) => async (event) => {
      event.preventDefault();
      for (const button of form.querySelectorAll("button")) button.disabled = true;
      status.textContent = approve ? "Approving…" : "Denying…";
      try {
        const updated = await api(`/api/approvals/${encodeURIComponent(r.id)}/${approve ? "approve" : "deny"}`, {
          method: "POST",
          body: JSON.stringify({ comment: comment.value }),
        });
        status.textContent = outcome(updated);
      } catch (error) {
        status.textContent = `Failed: ${error.message}`;
        for (const button of form.querySelectorAll("button")) button.disabled = false;
      }
    };
    const form = el(
      "form",
      { class: "decide" },
      el("label", { for: "comment" }, "Comment (shown to the requester; kubectl prints a denial's)"),
      comment,
      el(
        "div",
        { class: "buttons" },
        unapprovable ? null : el("button", { type: "submit", class: "approve", onclick: decide(true) }, "Approve"),
        el("button", { type: "button", class: "deny", onclick: decide(false) }, "Deny"),
      ),
    );
    parts.push(form);
  } else if (r.state === "pending") {
    parts.push(el("p", { class: "note" }, `Waiting for a reviewer of: ${(r.reviewer_groups || []).join(", ")}`));
  }
  status.textContent = r.state === "pending" ? "" : outcome(r);
  parts.push(status);
  return el("section", { class: "dialog", "aria-labelledby": "dialog-title" }, el("h2", { id: "dialog-title" }, `Request ${r.id}`), parts);
}

// -- grants -----------------------------------------------------------------------------------------------

async function grants() {
  try {
    const data = await api("/api/grants?all=1");
    const rows = data.items.map((g) =>
      el(
        "tr",
        {},
        el("td", { text: g.user }),
        el("td", { text: g.connection }),
        el("td", { text: g.rule }),
        el("td", { text: when(g.expires_at) }),
        el("td", { text: g.state }),
        el(
          "td",
          {},
          g.state === "active" && g.can_revoke
            ? el(
                "button",
                {
                  type: "button",
                  onclick: async (event) => {
                    event.target.disabled = true;
                    try {
                      await api(`/api/grants/${encodeURIComponent(g.id)}/revoke`, { method: "POST", body: "{}" });
                      grants();
                    } catch (error) {
                      event.target.replaceWith(el("span", { class: "error" }, error.message));
                    }
                  },
                },
                "Revoke",
              )
            : "",
        ),
      ),
    );
    show(rows.length ? table(["User", "Connection", "Rule", "Until", "State", ""], rows) : el("p", { class: "empty" }, "No grants."));
  } catch (error) {
    fail(error);
  }
}

// -- audit ------------------------------------------------------------------------------------------------

const FILTERS = ["user", "connection", "verb", "resource", "namespace", "decision", "since", "until"];

async function audit() {
  const params = new URLSearchParams(window.location.search);
  if (!params.has("since")) params.set("since", "24h");
  const form = el(
    "form",
    { class: "filters", method: "get", action: "/ui/audit" },
    FILTERS.map((name) =>
      el("label", {}, name, el("input", { name, value: params.get(name) || "", placeholder: name === "since" ? "24h" : "" })),
    ),
    el("button", { type: "submit" }, "Search"),
  );
  const chain = el("p", { class: "chain muted" });
  const results = el("div", {}, el("p", { class: "muted" }, "Searching…"));
  show(chain, form, results);
  const query = new URLSearchParams([...params].filter(([k, v]) => FILTERS.includes(k) && v));
  try {
    const data = await api(`/api/audit/commands?${query}`);
    results.replaceChildren(
      data.items.length
        ? el("ol", { class: "commands", reversed: true }, data.items.reverse().map(renderCommand))
        : el("p", { class: "empty" }, "No API calls match."),
    );
  } catch (error) {
    results.replaceChildren(el("p", { class: "error", role: "alert" }, error.message));
  }
  if (me.roles.auditor) {
    try {
      const state = await api("/api/audit/verify");
      chain.textContent = state.intact
        ? `Hash chain intact: ${state.checked} records, head ${state.head.seq}.`
        : `Hash chain BROKEN: ${state.problem}`;
      chain.className = state.intact ? "chain ok" : "chain error";
    } catch (error) {
      chain.textContent = `Hash chain: ${error.message}`;
    }
  }
}

function renderCommand(group) {
  const title = group.command ? `ran ${group.command}` : `called ${group.requests[0].verb} ${group.requests[0].resource}`;
  const summary = `${group.calls} call${group.calls === 1 ? "" : "s"}${group.denied ? `, ${group.denied} denied` : ""}${group.failed ? `, ${group.failed} failed` : ""}`;
  const calls = group.requests.map((r) =>
    el(
      "tr",
      { class: r.decision === "deny" || r.status === 403 ? "denied" : "" },
      el("td", { text: new Date(r.time * 1000).toLocaleTimeString() }),
      el("td", { text: what(r) }),
      el("td", { text: r.status }),
      el("td", { text: r.decision || "" }),
      el("td", {}, el("button", { type: "button", class: "link", onclick: (e) => detail(e.target, r.seq) }, "detail")),
    ),
  );
  return el(
    "li",
    {},
    el(
      "details",
      {},
      el("summary", {}, el("strong", { text: group.user || "(unauthenticated)" }), ` ${title} on ${group.connection} at ${when(group.started)} → ${summary}`),
      table(["Time", "Call", "Status", "Decision", ""], calls),
    ),
  );
}

async function detail(button, seq) {
  const cell = button.parentElement;
  try {
    const data = await api(`/api/audit/events?seq=${seq}`);
    const event = data.items.find((e) => e.seq === seq) || data.items[0];
    cell.replaceChildren(el("pre", { class: "event", text: JSON.stringify(event, null, 2) }));
  } catch (error) {
    cell.replaceChildren(el("span", { class: "error" }, error.message));
  }
}

// -- sessions ---------------------------------------------------------------------------------------------

async function sessions() {
  try {
    const data = await api("/api/sessions");
    const rows = data.items.map((s) =>
      el(
        "tr",
        {},
        el("td", {}, s.kind === "portforward" ? s.id : el("a", { href: `/ui/sessions/${encodeURIComponent(s.id)}` }, s.id)),
        el("td", { text: when(s.started) }),
        el("td", { text: s.user }),
        el("td", { text: s.connection }),
        el("td", { text: `${s.namespace}/${s.pod}` }),
        el("td", { text: s.kind === "portforward" ? `ports ${s.ports || ""}` : (s.command || []).join(" ") }),
        el("td", { text: s.exit_code ?? (s.ended ? "" : "running") }),
      ),
    );
    show(rows.length ? table(["Session", "Started", "User", "Connection", "Pod", "Command", "Exit"], rows) : el("p", { class: "empty" }, "No recorded sessions."));
  } catch (error) {
    fail(error);
  }
}

async function session() {
  const id = body.dataset.session;
  let record;
  try {
    record = await api(`/api/sessions/${encodeURIComponent(id)}`);
  } catch (error) {
    return fail(error);
  }
  const speed = el(
    "select",
    { id: "speed", name: "speed" },
    ["0.5", "1", "2", "4", "8"].map((s) => el("option", { value: s, selected: s === "1" }, `${s}×`)),
  );
  const stage = el("div", { class: "player", id: "player" });
  const timeline = el("ol", { class: "timeline" });
  show(
    el(
      "p",
      {},
      el("strong", { text: record.user }),
      ` · ${record.connection} · ${record.namespace}/${record.pod} · `,
      el("code", { text: (record.command || []).join(" ") }),
      ` · started ${when(record.started)} · exit ${record.exit_code ?? "—"}`,
    ),
    el("label", { for: "speed" }, "Speed "),
    speed,
    el("div", { class: "replay" }, stage, el("aside", {}, el("h2", { text: "API calls" }), timeline)),
  );
  const castUrl = `/api/sessions/${encodeURIComponent(id)}/cast`;
  const mount = () => {
    stage.replaceChildren();
    if (window.AsciinemaPlayer) {
      window.AsciinemaPlayer.create(castUrl, stage, { speed: Number(speed.value), autoPlay: true, fit: "width", idleTimeLimit: 2 });
    } else {
      textReplay(castUrl, stage);
    }
  };
  speed.addEventListener("change", mount);
  mount();
  try {
    const until = record.ended ? record.ended + 1 : now();
    const calls = await api(`/api/audit/events?user=${encodeURIComponent(record.user)}&since=${new Date((record.started - 10) * 1000).toISOString()}&until=${new Date(until * 1000).toISOString()}&limit=200`);
    timeline.replaceChildren(
      ...calls.items.map((e) => {
        const a = e.data.attributes || {};
        return el("li", {}, el("time", { text: new Date(e.time * 1000).toLocaleTimeString() }), ` ${e.kind === "request" ? what(a) : e.kind} `, el("span", { class: "muted", text: e.data.status ?? "" }));
      }),
    );
  } catch (error) {
    timeline.replaceChildren(el("li", { class: "muted" }, error.message));
  }
}

// Without the player (assets not built): the output as text, ANSI sequences stripped.
async function textReplay(url, stage) {
  const response = await fetch(url, { credentials: "same-origin" });
  const lines = (await response.text()).split("\n").slice(1).filter(Boolean);
  const output = lines
    .map((line) => JSON.parse(line))
    .filter((event) => event[1] === "o")
    .map((event) => event[2])
    .join("")
    .replace(/\u001b\[[0-9;?]*[A-Za-z]/g, "")
    .replace(/\r/g, "");
  stage.replaceChildren(el("pre", { class: "terminal", text: output }));
}

// -- connections ------------------------------------------------------------------------------------------

// A connection served by agents: whether one is connected to this replica, and each tunnel.
function agentStatus(upstream) {
  const state = el("p", { class: upstream.agents.length ? "agent-up" : "agent-down" }, "Agent tunnel: ",
    el("strong", { text: upstream.state }), upstream.replica ? ` (replica ${upstream.replica})` : "");
  if (!upstream.agents.length) return state;
  return el("div", {}, state, table(
    ["Agent", "Version", "Connected since", "From", "Open channels"],
    upstream.agents.map((a) => el("tr", {}, el("td", { text: a.agent }), el("td", { text: a.version }),
      el("td", { text: new Date(a.since * 1000).toISOString() }), el("td", { text: a.peer }),
      el("td", { text: String(a.channels_open) }))),
    "Agents",
  ));
}

async function connections() {
  try {
    const data = await api("/api/connections");
    show(
      ...data.items.map((c) =>
        el(
          "section",
          { class: "connection" },
          el("h2", { text: c.name }),
          c.description ? el("p", { text: c.description }) : null,
          c.upstream && c.upstream.kind === "agent" ? agentStatus(c.upstream) : null,
          el("p", {}, "Plugins: ", c.plugins.map((p) => el("span", { class: "tag", text: p }))),
          c.policy
            ? table(
                ["Rule", "Action", "Message"],
                c.policy.rules.map((r) => el("tr", {}, el("td", { text: r.name }), el("td", { text: r.action }), el("td", { text: r.message || "" }))),
                `Policy (default: ${c.policy.default})`,
              )
            : null,
        ),
      ),
    );
  } catch (error) {
    fail(error);
  }
}

const PAGES = { inbox, approval, grants, audit, sessions, session, connections };

async function start() {
  const page = PAGES[body.dataset.page];
  if (!page) return;
  try {
    Object.assign(me, await api("/api/me"));
  } catch (error) {
    return fail(error);
  }
  await page();
}

start();
