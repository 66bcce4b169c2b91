"""A browser's part of a login, over HTTP: open pages, follow the login's redirects one by one, post forms.

Used by the login tests and the demo test; the IdP is oidc-provider-mock, whose authorization page is a
form that takes the subject to log in as."""

from __future__ import annotations

import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Browser:
    """Just enough of a browser: GET/POST without following redirects, so each hop can be checked."""

    def __init__(self, ca_file: Path):
        context = ssl.create_default_context(cafile=str(ca_file))
        self.opener = urllib.request.build_opener(NoRedirect, urllib.request.HTTPSHandler(context=context))

    def open(self, url: str, form: dict[str, str] | None = None) -> tuple[int, Any, str]:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        try:
            with self.opener.open(urllib.request.Request(url, data=data), timeout=20) as response:
                return response.status, response.headers, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, exc.read().decode()


def mock_idp_authorize(browser: Browser, authorize_url: str, sub: str, deny: bool = False) -> str:
    """Pick `sub` on oidc-provider-mock's authorization form; returns the redirect back to the client."""
    status, _, page = browser.open(authorize_url)
    assert status == 200, page
    form = {"action": "deny"} if deny else {"sub": sub}
    status, headers, page = browser.open(authorize_url, form)
    assert status == 302, page
    return headers["Location"]


def read_login_prompt(stream: Any, deadline: float = 30) -> tuple[str, str]:
    """The login URL and code that `kubegate login`/`credential` print on stderr."""
    text = ""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        line = stream.readline()
        if not line:
            break
        text += line
        found = re.search(r"(https://\S+/login\?request=\S+)[\s\S]*code ([A-Z]{4}-[A-Z]{4})", text)
        if found:
            return found.group(1), found.group(2)
    raise AssertionError(f"no login prompt in: {text!r}")


def browser_login(
    gateway_url: str, ca_file: Path, provider: str, idp_url: str, login_url: str, code: str, sub: str
) -> str:
    """The person's part: check the code, pick the provider, log in at the IdP, land back on the gateway."""
    browser = Browser(ca_file)
    status, _, page = browser.open(login_url)
    assert status == 200 and code in page, page
    start = re.search(rf'href="(/login/start/{provider}\?request=[^"]+)"', page).group(1)
    status, headers, page = browser.open(gateway_url + start.replace("&amp;", "&"))
    assert status == 302, page
    assert headers["Location"].startswith(f"{idp_url}/oauth2/authorize?")
    callback = mock_idp_authorize(browser, headers["Location"], sub)
    assert callback.startswith(f"{gateway_url}/login/oidc/callback?")
    status, _, page = browser.open(callback)
    return page
