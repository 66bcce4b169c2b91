"""Browser login at a SAML 2.0 identity provider, with python3-saml (OneLogin's toolkit, on xmlsec).

SP-initiated only: the gateway sends an AuthnRequest (HTTP-Redirect) and accepts the IdP's Response at its
assertion consumer service (HTTP-POST) only `InResponseTo` that request. python3-saml in strict mode checks
the signature (assertions must be signed), issuer, audience, destination, recipient and validity window;
the plugin adds the assertion's age and refuses an assertion ID it has seen (replay).
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from onelogin.saml2.auth import OneLogin_Saml2_Auth
from onelogin.saml2.authn_request import OneLogin_Saml2_Authn_Request
from onelogin.saml2.errors import OneLogin_Saml2_Error, OneLogin_Saml2_ValidationError
from onelogin.saml2.idp_metadata_parser import OneLogin_Saml2_IdPMetadataParser
from onelogin.saml2.settings import OneLogin_Saml2_Settings
from onelogin.saml2.utils import OneLogin_Saml2_Utils

from kubegate.core.headers import names_system_identity

from .oidc_flow import LoginError
from .settings import SAMLLoginProvider


def read_idp(provider: SAMLLoginProvider) -> dict[str, Any]:
    """The IdP's entity ID, SSO URL and signing certificate, from its metadata or explicit settings."""
    if provider.idp_metadata_file is not None:
        try:
            xml = provider.idp_metadata_file.read_text()
        except OSError as exc:
            raise ValueError(f"cannot read idp_metadata_file: {exc.strerror}") from None
        try:
            parsed = OneLogin_Saml2_IdPMetadataParser.parse(
                xml, required_sso_binding="urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect"
            )
        except Exception as exc:  # the parser raises plain Exceptions for bad XML
            raise ValueError(f"idp_metadata_file is not usable IdP metadata: {exc}") from None
        idp = dict(parsed.get("idp") or {})
        if not idp.get("entityId") or not idp.get("singleSignOnService", {}).get("url"):
            raise ValueError("idp_metadata_file names no IdP entity with an HTTP-Redirect SSO service")
        if not idp.get("x509cert") and not idp.get("x509certMulti"):
            raise ValueError("idp_metadata_file has no signing certificate")
        return idp
    assert provider.idp_certificate_file is not None
    try:
        cert = provider.idp_certificate_file.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read idp_certificate_file: {exc.strerror}") from None
    try:
        x509.load_pem_x509_certificate(cert.encode())
    except ValueError:
        raise ValueError("idp_certificate_file is not a PEM certificate") from None
    return {
        "entityId": provider.idp_entity_id,
        "singleSignOnService": {
            "url": provider.idp_sso_url,
            "binding": "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect",
        },
        "x509cert": OneLogin_Saml2_Utils.format_cert(cert, heads=False),
    }


class SAMLLogin:
    def __init__(self, provider: SAMLLoginProvider, public_url: str):
        self.provider = provider
        base = f"{public_url.rstrip('/')}/login/saml/{provider.name}"
        self.metadata_url = base
        self.acs_url = f"{base}/acs"
        self.sp_entity_id = provider.sp_entity_id or base
        self._public = urlsplit(public_url)
        idp = provider.idp
        self.idp_entity_id: str = idp["entityId"]
        self.settings = self._settings(idp)

    def _settings(self, idp: dict[str, Any]) -> OneLogin_Saml2_Settings:
        try:
            return self._make_settings(idp)
        except OneLogin_Saml2_Error as exc:
            raise ValueError(f"SAML provider {self.provider.name}: {exc}") from None

    def _make_settings(self, idp: dict[str, Any]) -> OneLogin_Saml2_Settings:
        return OneLogin_Saml2_Settings(
            {
                "strict": True,
                "debug": False,
                "sp": {
                    "entityId": self.sp_entity_id,
                    "assertionConsumerService": {
                        "url": self.acs_url,
                        "binding": "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST",
                    },
                    "NameIDFormat": "urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified",
                },
                "idp": idp,
                "security": {
                    "wantAssertionsSigned": True,
                    "wantMessagesSigned": False,
                    "authnRequestsSigned": False,
                    "wantNameId": True,
                    "requestedAuthnContext": False,
                    "rejectDeprecatedAlgorithm": True,
                    "wantAttributeStatement": False,
                },
            },
            sp_validation_only=False,
        )

    def _request_data(self, post: dict[str, str] | None = None) -> dict[str, Any]:
        # The toolkit compares Destination/Recipient with "the current URL"; that is the public URL (the
        # gateway may sit behind a load balancer that terminates TLS), never the Host header.
        scheme = self._public.scheme
        port = self._public.port or (443 if scheme == "https" else 80)
        return {
            "https": "on" if scheme == "https" else "off",
            "http_host": self._public.hostname,
            "server_port": str(port),
            "script_name": urlsplit(self.acs_url).path,
            "get_data": {},
            "post_data": post or {},
        }

    def metadata(self) -> str:
        xml = self.settings.get_sp_metadata()
        return xml.decode() if isinstance(xml, bytes) else str(xml)

    def authorization_url(self, relay_state: str, request_id: str) -> str:
        """The IdP URL carrying a new AuthnRequest with this ID (derived from the login: nothing is stored
        until the response comes)."""

        class AuthnRequest(OneLogin_Saml2_Authn_Request):  # type: ignore[misc]
            def _generate_request_id(self) -> str:
                return request_id

        auth = OneLogin_Saml2_Auth(self._request_data(), self.settings)
        auth.authn_request_class = AuthnRequest
        url: str = auth.login(return_to=relay_state)
        if auth.get_last_request_id() != request_id:
            raise LoginError("the SAML toolkit did not use the login's request ID")  # fails closed
        return url

    def finish(self, form: dict[str, str], request_id: str) -> tuple[dict[str, Any], str, float]:
        """Validate the posted Response; returns (identity fields, assertion ID, replay-guard expiry)."""
        if not request_id:
            raise LoginError("no SAML request is pending for this login")
        auth = OneLogin_Saml2_Auth(self._request_data(form), self.settings)
        try:
            auth.process_response(request_id=request_id)
        except (OneLogin_Saml2_Error, OneLogin_Saml2_ValidationError) as exc:
            raise LoginError(f"the SAML response was refused: {exc}") from None
        except Exception as exc:  # malformed XML/base64 surface as assorted exceptions
            raise LoginError(f"the SAML response is malformed ({exc.__class__.__name__})") from None
        if auth.get_errors() or not auth.is_authenticated():
            reason = auth.get_last_error_reason() or ", ".join(auth.get_errors()) or "not authenticated"
            raise LoginError(f"the SAML response was refused: {reason}")
        now = time.time()
        issued = auth.get_last_assertion_issue_instant()
        if issued is None or issued < now - self.provider.max_assertion_age_seconds - 60:
            raise LoginError("the SAML assertion is too old")
        assertion_id = auth.get_last_assertion_id()
        if not assertion_id:
            raise LoginError("the SAML assertion has no ID")
        not_after = auth.get_last_assertion_not_on_or_after()
        guard_until = max(float(not_after or 0), now + self.provider.max_assertion_age_seconds + 60)
        return self._identity(auth), assertion_id, guard_until

    def _identity(self, auth: OneLogin_Saml2_Auth) -> dict[str, Any]:
        provider = self.provider
        attributes: dict[str, list[str]] = auth.get_attributes()
        if provider.username_attribute:
            values = attributes.get(provider.username_attribute) or []
            if not values or not values[0]:
                raise LoginError(f"the SAML assertion has no {provider.username_attribute} attribute")
            name = values[0]
        else:
            name = auth.get_nameid() or ""
            if not name:
                raise LoginError("the SAML assertion has no NameID")
        prefix = (
            provider.username_prefix if provider.username_prefix is not None else f"{self.idp_entity_id}#"
        )
        user = prefix + name
        if names_system_identity(user):  # as the API server reads it: spaces around it dropped
            raise LoginError(f"user name {user!r} is not allowed")
        groups: list[str] = []
        for group in attributes.get(provider.groups_attribute) or []:
            mapped = provider.groups_prefix + group
            if names_system_identity(group) or names_system_identity(mapped):
                raise LoginError(f"group {group!r} is not allowed")
            if mapped not in groups:
                groups.append(mapped)
        claims: dict[str, Any] = {"nameid": auth.get_nameid()}
        for key in provider.keep_attributes:
            if key in attributes:
                claims[key] = attributes[key]
        return {
            "user": user,
            "groups": groups,
            "issuer": self.idp_entity_id,
            "claims": claims,
            "method": "saml",
        }
