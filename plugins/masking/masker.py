"""`Masking`: one connection's masking rules, its current text masker and its known values; the default
rules that records get where a connection does not mask."""

from __future__ import annotations

import fnmatch
import functools
import re
from typing import Any

import orjson
from prometheus_client import Gauge

from kubegate.core.flow import Flow, Identity
from kubegate.core.observe import REGISTRY

from .forms import KnownForms
from .known import KnownIndex, KnownSecrets
from .objects import ObjectRules, mask_document, mask_env_anywhere, restore_identifiers, scrub_document
from .settings import PLUGIN_NAME, MaskingSettings
from .text import TextMasker, custom_patterns, detector_patterns


def env_name_rule(env_names: list[str], non_secret_names: list[str]) -> re.Pattern[str]:
    """One regex for "this env var name holds a secret", searched in a whole name (objects, records, command
    lines): any of `env_names` (case-insensitive), unless the name is exactly one of `non_secret_names`
    (case-sensitive: `pwd` or `Pwd` are not the shell's PWD)."""
    secret = "|".join(f"(?:{p})" for p in env_names)
    if not secret:
        return re.compile("(?!)")
    if not non_secret_names:
        return re.compile(secret, re.I)
    allowed = "|".join(re.escape(name) for name in non_secret_names)
    # Anchored at the name's start, so `search` tries the exception once; then any position, as before.
    return re.compile(rf"\A(?!(?-i:{allowed})\Z)[\s\S]*?(?:{secret})", re.I)


ENV_LIST = b'"env":['
# Set by each worker whenever its index of a connection's known values changes (no scrape needed).
KNOWN_FORMS = Gauge("kubegate_masking_known_forms", "Forms of known Secret values a connection's masking searches "
                    "for (raw, base64, URL-encoded…).", ["connection"], registry=REGISTRY,
                    multiprocess_mode="livemin")  # fmt: skip
KNOWN_LITERAL = Gauge("kubegate_masking_known_literal", "1 when every known value is searched by Hyperscan's "
                      "literal database, 0 while (or where) the slower automaton searches.", ["connection"],
                      registry=REGISTRY, multiprocess_mode="livemin")  # fmt: skip
# Set before each scrape (`kubegate_metrics`): what /readyz says of the follower, for alerts.
KNOWN_UP = Gauge("kubegate_masking_known_values_up", "1 while a connection's masking follows the cluster's Secrets, "
                 "0 while it cannot (the reason is in /readyz and the log).", ["connection"], registry=REGISTRY,
                 multiprocess_mode="livemin")  # fmt: skip


class Masking:
    """One connection's masking: rules, the current text masker, the known-values follower."""

    def __init__(self, settings: MaskingSettings, connection: str = ""):
        """`connection`: the connection's name, for its gauges (none without one: records' default rules)."""
        self.settings = settings
        self.connection = connection
        self.patterns = [*detector_patterns(settings.detectors), *custom_patterns(settings.patterns)]
        self.env_name = env_name_rule(settings.env_names, settings.non_secret_names)
        self.known: KnownSecrets | None = None
        self.known_index = KnownIndex(self._use_known)
        self.set_known(set())

    def set_known(self, values: set[str]) -> None:
        """Mask exactly these known values from now on (synchronously; the follower of the cluster's
        Secrets calls `known_changed` instead)."""
        self.known_index.set_now(values)

    def known_changed(self, values: set[str]) -> None:
        """The known values are now `values`: new ones are masked at once, the rest is reindexed off the
        event loop (see `KnownIndex`)."""
        self.known_index.update(values)

    def known_values_changed(self, added: set[str], removed: set[str]) -> None:
        """The cluster's Secrets changed (the follower's `on_change`): as `known_changed`, told only what
        changed."""
        self.known_index.change(added, removed)

    def _use_known(self, forms: KnownForms) -> None:
        if self.connection:
            KNOWN_FORMS.labels(self.connection).set(sum(part.size for part in forms.parts))
            KNOWN_LITERAL.labels(self.connection).set(1 if forms.literal or not forms else 0)
        s = self.settings
        self.text = TextMasker(s.marker, (), self.patterns, s.assignments, s.engine, known_forms=forms,
                               non_secret_names=s.non_secret_names)  # fmt: skip
        configmap_keys = [(c.namespaces, c.names, k) for c in s.configmap_keys for k in c.keys]
        self.rules = ObjectRules(s.marker, self.env_name, configmap_keys, scrub_text=self.text.mask)
        self.structure_rules = ObjectRules(s.marker, self.env_name, configmap_keys)

    def mask_doc(self, doc: Any, resource_kind: str) -> Any:
        """Mask a parsed JSON document; the masked document (`doc` itself, edited, or a new one)."""
        return self._mask(doc, resource_kind)[0]

    def mask_json(self, doc: Any, resource_kind: str) -> bytes:
        """Mask a parsed JSON document; the masked document serialized (always: what goes out is exactly
        what was inspected, whatever the bytes it was parsed from)."""
        masked, serialized = self._mask(doc, resource_kind)
        return serialized if serialized is not None else orjson.dumps(masked)

    def _mask(self, doc: Any, resource_kind: str) -> tuple[Any, bytes | None]:
        """The masked document, and its serialization when nothing in it changed (None otherwise).

        Structure first (Secret data, env values… — a walk of the parsed document), then values and
        patterns over the serialized text in one pass (much faster than visiting every string). Markers
        contain no quote or backslash, so the text stays JSON; if a pattern ever broke it, the slow
        per-string scrub is used instead. When the text pass changes nothing, the text it read is the
        serialization of the masked document: returned so that it is not serialized a second time.
        """
        rules = self.structure_rules
        rules.env_lists = set()
        try:
            mask_document(doc, rules, resource_kind)
            known_env_lists = len(rules.env_lists)
        finally:
            rules.env_lists = None
        serialized = orjson.dumps(doc)
        # An `env` list outside the pod templates `mask_document` reads (a ControllerRevision's `data`, a
        # custom resource's, an aggregated API's): the document is walked for them only when it holds more
        # than were read, counted by their serialized key (`"env":[` is exactly an `env` key of a list: in a
        # string its quotes are escaped). A Pod list costs a count, not a walk (a walk of 500 Pods: ~8 ms).
        if serialized.count(ENV_LIST) > known_env_lists and mask_env_anywhere(doc, rules):
            serialized = orjson.dumps(doc)
        text = serialized.decode()
        scrubbed = self.text.mask(text)
        if scrubbed is text or scrubbed == text:
            return doc, serialized
        try:
            masked = orjson.loads(scrubbed)
        except ValueError:
            # The slow way: string by string, everywhere (not only where `mask_document` looks: list items
            # that are not objects, a top-level array or string), identifiers in their positions kept.
            if isinstance(doc, str):
                return self.text.mask(doc), None
            mask_document(doc, self.rules, resource_kind)
            mask_env_anywhere(doc, self.rules)
            scrub_document(doc, self.text.mask)
            return doc, None
        # The text pass saw names and uids too: a known value that is also an object's name must not
        # rename it — only identifiers in identifier positions are put back, never data keyed `name`.
        restore_identifiers(masked, doc)
        return masked, None

    def exempt(self, identity: Identity | None) -> bool:
        e = self.settings.exempt
        if identity is None:
            return False
        return any(fnmatch.fnmatchcase(identity.user, u) for u in e.users) or any(
            fnmatch.fnmatchcase(g, p) for g in identity.groups for p in e.groups
        )


def masking_of(flow: Flow) -> Masking | None:
    """The connection's masking for this flow's response; None where the connection does not mask or the
    caller is exempt."""
    masking: Masking | None = flow.connection.state.get(PLUGIN_NAME)
    if masking is None or flow.state.get(PLUGIN_NAME, {}).get("exempt"):
        return None
    return masking


def record_masking(flow: Flow) -> Masking:
    """The masking of what is recorded (approvals, audit, recordings): the connection's, or the default
    rules where it has none (records are masked even where responses are not)."""
    masking: Masking | None = flow.connection.state.get(PLUGIN_NAME)
    return masking or default_masking()


@functools.cache
def default_masking() -> Masking:
    return Masking(MaskingSettings())
