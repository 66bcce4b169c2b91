"""A SAML 2.0 identity provider for tests, built with the gateway's own SAML library (python3-saml):
it reads the gateway's AuthnRequest and answers with a Response whose assertion it signs with xmlsec."""

from __future__ import annotations

import base64
import datetime as dt
import uuid
from dataclasses import dataclass
from html import escape
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from lxml import etree
from onelogin.saml2.constants import OneLogin_Saml2_Constants as C
from onelogin.saml2.utils import OneLogin_Saml2_Utils

NS = {"samlp": "urn:oasis:names:tc:SAML:2.0:protocol", "saml": "urn:oasis:names:tc:SAML:2.0:assertion"}


def make_signing_pair(common_name: str) -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return key_pem, cert.public_bytes(serialization.Encoding.PEM).decode()


def _instant(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class AuthnRequest:
    id: str
    acs_url: str
    issuer: str
    relay_state: str


class SAMLIdP:
    def __init__(self, directory: Path, entity_id: str = "https://idp.example.test/saml"):
        self.entity_id = entity_id
        self.sso_url = "https://idp.example.test/sso"
        self.key_pem, self.cert_pem = make_signing_pair("test-idp")
        directory.mkdir(parents=True, exist_ok=True)
        self.cert_file = directory / "idp.crt"
        self.cert_file.write_text(self.cert_pem)
        self.metadata_file = directory / "idp-metadata.xml"
        self.metadata_file.write_text(self.metadata())

    def metadata(self) -> str:
        """The IdP's SAML metadata, as an IdP publishes it for its service providers."""
        der_b64 = "".join(self.cert_pem.strip().splitlines()[1:-1])
        return (
            '<md:EntityDescriptor xmlns:md="urn:oasis:names:tc:SAML:2.0:metadata"'
            f' entityID="{escape(self.entity_id)}">'
            '<md:IDPSSODescriptor protocolSupportEnumeration="urn:oasis:names:tc:SAML:2.0:protocol">'
            '<md:KeyDescriptor use="signing"><ds:KeyInfo xmlns:ds="http://www.w3.org/2000/09/xmldsig#">'
            f"<ds:X509Data><ds:X509Certificate>{der_b64}</ds:X509Certificate></ds:X509Data></ds:KeyInfo>"
            "</md:KeyDescriptor>"
            '<md:SingleSignOnService Binding="urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect"'
            f' Location="{escape(self.sso_url)}"/>'
            "</md:IDPSSODescriptor></md:EntityDescriptor>"
        )

    @staticmethod
    def read_request(redirect_url: str) -> AuthnRequest:
        """Decode the AuthnRequest the gateway put in its redirect (HTTP-Redirect binding)."""
        query = parse_qs(urlsplit(redirect_url).query)
        xml = OneLogin_Saml2_Utils.decode_base64_and_inflate(query["SAMLRequest"][0])
        root = etree.fromstring(xml)
        issuer = root.find("saml:Issuer", NS)
        return AuthnRequest(
            id=root.get("ID"),
            acs_url=root.get("AssertionConsumerServiceURL"),
            issuer=issuer.text if issuer is not None else "",
            relay_state=query.get("RelayState", [""])[0],
        )

    def response(
        self,
        request: AuthnRequest,
        name_id: str,
        attributes: dict[str, list[str]] | None = None,
        *,
        audience: str | None = None,
        assertion_id: str | None = None,
        lifetime_seconds: int = 300,
        issued_offset_seconds: int = 0,
        sign: bool = True,
        signing_key: str | None = None,
        signing_cert: str | None = None,
    ) -> str:
        """A base64 SAMLResponse answering `request`; the knobs make the broken variants attack tests need."""
        now = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=issued_offset_seconds)
        until = now + dt.timedelta(seconds=lifetime_seconds)
        assertion_id = assertion_id or f"_a{uuid.uuid4().hex}"
        attrs = "".join(
            f'<saml:Attribute Name="{escape(k)}">'
            + "".join(
                f'<saml:AttributeValue xsi:type="xs:string">{escape(v)}</saml:AttributeValue>' for v in vs
            )
            + "</saml:Attribute>"
            for k, vs in (attributes or {}).items()
        )
        assertion = (
            f'<saml:Assertion xmlns:saml="{NS["saml"]}" xmlns:xs="http://www.w3.org/2001/XMLSchema"'
            f' xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" ID="{assertion_id}" Version="2.0"'
            f' IssueInstant="{_instant(now)}">'
            f"<saml:Issuer>{escape(self.entity_id)}</saml:Issuer>"
            "<saml:Subject>"
            f'<saml:NameID Format="urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified">{escape(name_id)}</saml:NameID>'
            '<saml:SubjectConfirmation Method="urn:oasis:names:tc:SAML:2.0:cm:bearer">'
            f'<saml:SubjectConfirmationData NotOnOrAfter="{_instant(until)}" Recipient="{escape(request.acs_url)}"'
            f' InResponseTo="{request.id}"/>'
            "</saml:SubjectConfirmation></saml:Subject>"
            f'<saml:Conditions NotBefore="{_instant(now - dt.timedelta(seconds=30))}" NotOnOrAfter="{_instant(until)}">'
            f"<saml:AudienceRestriction><saml:Audience>{escape(audience or request.issuer)}</saml:Audience>"
            "</saml:AudienceRestriction></saml:Conditions>"
            f'<saml:AuthnStatement AuthnInstant="{_instant(now)}" SessionIndex="_s{uuid.uuid4().hex}">'
            "<saml:AuthnContext><saml:AuthnContextClassRef>"
            "urn:oasis:names:tc:SAML:2.0:ac:classes:PasswordProtectedTransport"
            "</saml:AuthnContextClassRef></saml:AuthnContext></saml:AuthnStatement>"
            f"<saml:AttributeStatement>{attrs}</saml:AttributeStatement>"
            "</saml:Assertion>"
        )
        if not attrs:
            assertion = assertion.replace("<saml:AttributeStatement></saml:AttributeStatement>", "")
        if sign:
            signed = OneLogin_Saml2_Utils.add_sign(
                assertion,
                signing_key or self.key_pem,
                signing_cert or self.cert_pem,
                sign_algorithm=C.RSA_SHA256,
                digest_algorithm=C.SHA256,
            )
            assertion = signed.decode() if isinstance(signed, bytes) else signed
            assertion = assertion.split("?>", 1)[-1] if assertion.startswith("<?xml") else assertion
        response = (
            f'<samlp:Response xmlns:samlp="{NS["samlp"]}" xmlns:saml="{NS["saml"]}" ID="_r{uuid.uuid4().hex}"'
            f' Version="2.0" IssueInstant="{_instant(now)}" Destination="{escape(request.acs_url)}"'
            f' InResponseTo="{request.id}">'
            f"<saml:Issuer>{escape(self.entity_id)}</saml:Issuer>"
            '<samlp:Status><samlp:StatusCode Value="urn:oasis:names:tc:SAML:2.0:status:Success"/></samlp:Status>'
            f"{assertion}</samlp:Response>"
        )
        return base64.b64encode(response.encode()).decode()
