"""HTML of the web UI: one shell per page (navigation, who is logged in, the CSRF token) that `app.js` fills
from the JSON APIs, and the login pages. Everything is escaped; no inline script (the CSP forbids it)."""

from __future__ import annotations

from html import escape

from quart import Response

from kubegate.core.flow import Identity
from kubegate.core.routes import NO_STORE

HEADERS = {
    **NO_STORE,
    "Content-Security-Policy": "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; font-src 'self' data:; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}
NAV = [("inbox", "/ui/", "Approvals"), ("grants", "/ui/grants", "Grants"), ("audit", "/ui/audit", "Audit"),
       ("sessions", "/ui/sessions", "Sessions"), ("connections", "/ui/connections", "Connections")]  # fmt: skip


def html(body: str, status: int = 200) -> Response:
    return Response(body, status=status, content_type="text/html; charset=utf-8", headers=HEADERS)


def _head(title: str, csrf: str = "") -> str:
    meta = f'<meta name="csrf-token" content="{escape(csrf)}">' if csrf else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"{meta}<title>{escape(title)} · kubegate</title>"
        '<link rel="stylesheet" href="/ui/static/app.css">'
        '<link rel="stylesheet" href="/ui/static/vendor/asciinema-player.css">'
        "</head>"
    )


def shell(page: str, title: str, identity: Identity, csrf: str, data: dict[str, str]) -> str:
    links = "".join(
        f'<a href="{href}"{" aria-current=page" if name == page or (page, name) in PARENTS else ""}>{label}</a>'
        for name, href, label in NAV
    )
    attributes = "".join(f' data-{escape(k)}="{escape(v)}"' for k, v in data.items())
    groups = ", ".join(identity.groups)
    return (
        f'{_head(title, csrf)}<body data-page="{escape(page)}" data-user="{escape(identity.user)}"{attributes}>'
        '<a class="skip" href="#main">Skip to content</a>'
        '<header><span class="brand">kubegate</span>'
        f'<nav aria-label="Main">{links}</nav>'
        f'<div class="me"><span title="{escape(groups)}">{escape(identity.user)}</span>'
        f'<form method="post" action="/ui/logout"><input type="hidden" name="csrf" value="{escape(csrf)}">'
        '<button type="submit" class="link">Log out</button></form></div></header>'
        f'<main id="main" tabindex="-1"><h1>{escape(title)}</h1>'
        '<div id="content" aria-live="polite"><p class="muted">Loading…</p></div></main>'
        '<script src="/ui/static/vendor/asciinema-player.min.js" defer></script>'
        '<script src="/ui/static/app.js" defer></script></body></html>'
    )


PARENTS = {("approval", "inbox"), ("session", "sessions")}


def login(providers: list[tuple[str, str]], error: str = "") -> str:
    items = "".join(
        f'<li><a class="button" href="/ui/login/start/{escape(name)}">Log in with {escape(title)}</a></li>'
        for name, title in providers
    )
    problem = f'<p class="error" role="alert">{escape(error)}</p>' if error else ""
    choices = (
        f'<ul class="providers">{items}</ul>'
        if items
        else ""
        if error
        else "<p>No identity providers are configured (<code>plugins.login</code>).</p>"
    )
    return (
        f'{_head("Log in")}<body data-page="login"><main id="main" class="narrow"><h1>kubegate</h1>'
        f"<p>Review held requests, search the audit log and replay sessions.</p>{problem}{choices}"
        '<p class="muted"><a href="/ui/login">Start again</a></p></main></body></html>'
    )


def moving_on(target: str) -> str:
    # A refresh from our own page is a same-site navigation: the new SameSite=Strict cookie goes with it.
    head = _head("Logged in").replace(
        "</head>", f'<meta http-equiv="refresh" content="0;url={escape(target)}"></head>'
    )
    return (
        f'{head}<body data-page="moving-on"><main id="main" class="narrow"><h1>Logged in</h1>'
        f'<p><a href="{escape(target)}">Continue</a></p></main></body></html>'
    )
