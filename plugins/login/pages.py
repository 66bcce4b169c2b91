"""The few HTML pages of the browser half of a login. Self-contained: no external assets."""

from __future__ import annotations

from html import escape
from urllib.parse import quote

STYLE = """
body{font-family:system-ui,sans-serif;max-width:34rem;margin:3rem auto;padding:0 1rem;color:#1b1f24}
h1{font-size:1.4rem} .code{font:700 1.6rem ui-monospace,monospace;letter-spacing:.15em;background:#f3f4f6;
padding:.4rem .8rem;border-radius:.4rem;display:inline-block} a.button{display:block;margin:.6rem 0;
padding:.7rem 1rem;border:1px solid #1f6feb;border-radius:.4rem;color:#fff;background:#1f6feb;
text-decoration:none;text-align:center} .error{color:#b42318} .muted{color:#57606a;font-size:.9rem}
"""


def page(title: str, body: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)} · kubegate</title><style>{STYLE}</style></head>"
        f"<body><main>{body}</main></body></html>"
    )


def choose_provider(login_id: str, user_code: str, providers: list[tuple[str, str]], expires_in: int) -> str:
    buttons = "".join(
        f'<a class="button" href="/login/start/{quote(name)}?request={quote(login_id)}">'
        f"Continue with {escape(title or name)}</a>"
        for name, title in providers
    )
    return page(
        "Log in",
        "<h1>Log in to kubegate</h1>"
        f'<p>Your terminal shows this code:</p><p class="code" id="user-code">{escape(user_code)}</p>'
        "<p><strong>Continue only if it matches.</strong> If you did not just run <code>kubegate login</code>, "
        "close this page: someone may be trying to get a token in your name.</p>"
        f"{buttons}"
        f'<p class="muted">This link expires in {max(expires_in // 60, 1)} minutes.</p>',
    )


def logged_in(user: str, groups: list[str]) -> str:
    listed = ", ".join(escape(g) for g in groups) or "none"
    return page(
        "Logged in",
        f'<h1>Logged in as <span id="user">{escape(user)}</span></h1>'
        f"<p>Groups: {listed}</p><p>Return to your terminal; you can close this page.</p>",
    )


def failed(message: str) -> str:
    return page("Login failed", f'<h1>Login failed</h1><p class="error" id="error">{escape(message)}</p>')


def start_from_cli(providers: list[tuple[str, str]]) -> str:
    names = ", ".join(escape(title or name) for name, title in providers) or "none configured"
    return page(
        "Log in",
        "<h1>kubegate</h1><p>Start a login from your terminal:</p>"
        "<pre>kubegate login --gateway URL --connection NAME</pre>"
        f'<p class="muted">Identity providers: {names}</p>',
    )
