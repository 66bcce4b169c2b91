"""What reaches records: request bodies of every shape and exec/attach command lines, masked.

Records are what people read later or elsewhere: audit events (`request_body`, `query`), approval requests
(`body_preview`, `path`, `command`) and session recordings (the session row's `command`, the asciicast
title). Everything here is a pure function over an already decoded value; the plugin (`__init__.py`) applies
it with a connection's rules, or the default rules where the connection does not mask.

Bodies are masked by their shape (see `mask_record_document`): a whole object, a JSON patch (a list of
operations whose values are placed where they land in an object of the resource's kind and masked by the
object rules there), or a merge, strategic-merge or apply patch (a partial object). A body sent to a
resource is masked as that resource's kind *and* as the kind it names: a Secret sent as `kind: ConfigMap` is
still a Secret to the API server.

Command lines are masked argument by argument (see `mask_command`): the text rules (known values,
detectors, `PASSWORD=value` assignments), `NAME=value` where NAME is a secret-looking environment variable
name, the value after a secret-named flag (`--password X`, `--token=X`), the password options of common
clients (`mysql -pX`, `sshpass -p X`, `redis-cli -a X`, `mongosh -p X`, `curl -u user:X`) and credential
headers (`-H 'Authorization: Bearer X'`), also inside a shell string (`sh -c '…'`).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeAlias
from urllib.parse import quote, unquote_plus

from kubegate.core import bodies

from .objects import ObjectRules, _scrub_strings, mask_env_anywhere, mask_object_as

Shape: TypeAlias = bodies.Shape
SECRET_FIELDS = ("data", "stringData", "binaryData")
SECRET_OTHER_FIELDS = ("apiVersion", "kind", "metadata", "type", "immutable", "items")
# Where a JSON pointer segment indexes a list (an index, or "-" for the end): the skeleton gets a list there.
LIST_INDEX = re.compile(r"^(?:0|[1-9][0-9]*|-)$")


# -- bodies -----------------------------------------------------------------------------------------------


def mask_record_document(
    doc: Any, shape: Shape, rules: ObjectRules, resource_kind: str, namespace: str = "", name: str = ""
) -> Any:
    """A decoded request body, masked for records; returns the masked value (dicts and lists are edited in
    place). `rules` carries the text scrub (`scrub_text`) for every other string.

    :param shape: how the API server reads the body: a whole object, or one of the patch types.
    :param resource_kind: the kind of the resource the request is for (`Secret` for `secrets`), "" unknown.
    :param namespace: the request's namespace, for ConfigMap key rules when the body does not name it.
    :param name: the request's object name, likewise.
    """
    if shape == "json-patch":
        return mask_json_patch(doc, rules, resource_kind, namespace, name)
    if isinstance(doc, list):
        # Not what this shape holds (the API server refuses it): masked as operations and as objects both.
        doc = mask_json_patch(doc, rules, resource_kind, namespace, name)
    return mask_record_object(
        doc, rules, resource_kind, partial=shape != "object", namespace=namespace, name=name
    )


def mask_record_object(
    doc: Any,
    rules: ObjectRules,
    resource_kind: str,
    *,
    partial: bool = False,
    namespace: str = "",
    name: str = "",
) -> Any:
    """An object (or a `List` of them, nested at any depth) masked as the resource's kind and its own.

    :param partial: a patch: env entries that carry a value but no name (the name is in the stored object,
        not visible here) are masked too.
    :param namespace: the request's namespace: the object is masked as named by its own metadata *and* as
        in this namespace (a create without `-n`, a merge patch, name none: the API server takes them from
        the path).
    :param name: the request's object name, likewise.
    """
    if isinstance(doc, list):
        return [mask_record_object(item, rules, resource_kind, partial=partial, namespace=namespace, name=name)
                for item in doc]  # fmt: skip
    if not isinstance(doc, dict):
        return _scrub_value(doc, rules)
    structure = replace(rules, scrub_text=None)
    _mask_structure(doc, structure, resource_kind, partial, namespace, name)
    _mask_container_commands(doc, rules)
    if rules.scrub_text is not None:
        _scrub_strings(doc, rules.scrub_text)
    return doc


def _mask_container_commands(node: Any, rules: ObjectRules) -> None:
    """A container's `command` and `args` (anywhere: pod templates, custom resources, a patch) are a
    command line: masked like an exec's (`--password X`, `mysql -pX`, `env DB_PASSWORD=…`)."""
    if isinstance(node, dict):
        command, args = node.get("command"), node.get("args")
        argv_lists = [
            v for v in (command, args) if isinstance(v, list) and all(isinstance(a, str) for a in v)
        ]
        if argv_lists:
            joined = [arg for argv in argv_lists for arg in argv]
            masked = mask_command(joined, rules.scrub_text or _same, rules.env_name, rules.marker)
            for argv in argv_lists:
                argv[:], masked = masked[: len(argv)], masked[len(argv) :]
        for value in node.values():
            if isinstance(value, dict | list):
                _mask_container_commands(value, rules)
    elif isinstance(node, list):
        for item in node:
            _mask_container_commands(item, rules)


def _same(text: str) -> str:
    return text


def _mask_structure(
    obj: dict[str, Any], rules: ObjectRules, resource_kind: str, partial: bool, namespace: str, name: str
) -> None:
    kind_field = obj.get("kind")
    own_kind = kind_field if isinstance(kind_field, str) else ""
    items = obj.get("items")
    if isinstance(items, list) and (not own_kind or own_kind.endswith("List")):
        item_kind = own_kind[: -len("List")] if own_kind.endswith("List") and own_kind != "List" else ""
        for index, item in enumerate(items):
            if isinstance(item, dict):
                for kind in {item_kind, resource_kind} - {""} or {""}:
                    _mask_structure(item, rules, kind, partial, namespace, name)
            else:
                items[index] = _scrub_value(item, rules)
    kinds = {own_kind, resource_kind} - {""} or {""}
    for kind in kinds:
        mask_object_as(obj, rules, kind, "", "")  # as the body names itself
        if namespace or name:
            mask_object_as(obj, rules, kind, namespace, name)  # and where the request puts it
    if "Secret" in kinds:
        # The API server refuses a Secret whose data is not a map, but the record is written all the same;
        # fields a Secret does not have (dropped there) may hold a copy of a value (a YAML alias): masked.
        for section in list(obj):
            if section in SECRET_FIELDS and not isinstance(obj[section], dict):
                obj[section] = rules.marker
            elif section not in SECRET_FIELDS and section not in SECRET_OTHER_FIELDS:
                obj[section] = _all_masked(obj[section], rules.marker)
    mask_env_anywhere(obj, rules, partial)


def mask_json_patch(
    ops: Any, rules: ObjectRules, resource_kind: str, namespace: str = "", name: str = ""
) -> Any:
    """A JSON patch (RFC 6902): each operation's `value` masked where it lands. `op`, `path` and `from` are
    kept (scrubbed by value like any text); a Secret's values are all masked (its annotations may echo its data)."""
    if not isinstance(ops, list):
        return mask_record_object(ops, rules, resource_kind, partial=True, namespace=namespace, name=name)
    for index, op in enumerate(ops):
        if not isinstance(op, dict):
            ops[index] = mask_record_object(
                op, rules, resource_kind, partial=True, namespace=namespace, name=name
            )
            continue
        for key in list(op):
            if key == "value":
                op[key] = _mask_patch_value(op.get("path"), op[key], rules, resource_kind, namespace, name)
            else:
                op[key] = _scrub_value(op[key], rules)
    return ops


def pointer_segments(pointer: str) -> list[str] | None:
    """A JSON pointer's reference tokens (`~1` → `/`, `~0` → `~`); None when it is not a pointer."""
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        return None
    return [token.replace("~1", "/").replace("~0", "~") for token in pointer[1:].split("/")]


def _mask_patch_value(path: Any, value: Any, rules: ObjectRules, kind: str, namespace: str, name: str) -> Any:
    segments = pointer_segments(path) if isinstance(path, str) else None
    if segments is None:
        return _all_masked(value, rules.marker)  # the API server refuses it; nothing of it is kept
    if kind == "Secret":
        return _all_masked(value, rules.marker)  # data, stringData, or an annotation that may echo them
    if not segments:  # the whole object replaced
        return mask_record_object(value, rules, kind, partial=True, namespace=namespace, name=name)
    if segments[0] in ("kind", "apiVersion"):
        return _scrub_value(value, rules)
    # A skeleton object of the kind with the value where the pointer puts it, masked by the object rules
    # (an env entry placed by index has no name there, so its value is masked). A segment like `0` or `-`
    # indexes a list or names a map key, depending on the stored object: both are tried, and where either
    # reading masks something, that masked value is kept.
    as_lists = _placed(segments, copy.deepcopy(value), True, rules, kind, namespace, name)
    as_maps = _placed(segments, copy.deepcopy(value), False, rules, kind, namespace, name)
    if as_lists is _UNPLACEABLE or as_maps is _UNPLACEABLE:
        return _all_masked(value, rules.marker)
    return as_maps if as_lists == value else as_lists


_UNPLACEABLE = object()


def _placed(
    segments: list[str], value: Any, indexes: bool, rules: ObjectRules, kind: str, namespace: str, name: str
) -> Any:
    """`value` masked where `segments` put it in an object of `kind` (index-like segments as list indexes
    when `indexes`, else as map keys)."""
    node: Any = value
    for segment in reversed(segments):
        node = [node] if indexes and LIST_INDEX.match(segment) else {segment: node}
    if not isinstance(node, dict):
        return _UNPLACEABLE
    skeleton: dict[str, Any] = node
    if kind:
        skeleton["kind"] = kind
    if segments[0] != "metadata":
        skeleton["metadata"] = {"namespace": namespace, "name": name}
    # Read as maps, index-like segments made maps where the object has lists (containers, env): kept and
    # skipped there. Read as lists, a container list or env that is not one goes whole, as in responses.
    placed_rules = replace(rules, replace_unreadable=indexes)
    mask_record_object(skeleton, placed_rules, kind, partial=True, namespace=namespace, name=name)
    found: Any = skeleton
    for segment in segments:
        if isinstance(found, list) and found:
            found = found[0]
        elif isinstance(found, dict) and segment in found:
            found = found[segment]
        else:
            return rules.marker  # a part on the way went whole: so did the value
    return found


def _all_masked(value: Any, marker: str) -> Any:
    """Every leaf replaced by the marker; keys (field names) kept."""
    if isinstance(value, dict):
        return {key: _all_masked(item, marker) for key, item in value.items()}
    if isinstance(value, list):
        return [_all_masked(item, marker) for item in value]
    return marker if value is not None else None


def _scrub_value(value: Any, rules: ObjectRules) -> Any:
    scrub = rules.scrub_text
    if scrub is None:
        return value
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict | list):
        _scrub_strings(value, scrub)
    return value


# -- command lines ----------------------------------------------------------------------------------------

# A flag whose name says it carries a secret: `--password X`, `--password=X`, `-token X`, `--db-pass X`.
_SECRET_WORD = (
    r"(?:password|passwd|passphrase|pass|pwd|token|secret|api-?key|access-?key|private-?key|credentials?)"
)
_VALUE = r"""(?:'[^']*'|"(?:[^"\\]|\\.)*"|[^\s\x00'";&|<>()]+)"""
_GAP = r"[\s\x00]"
SECRET_FLAG = re.compile(
    rf"(?i)(?<![\w-])(--?[A-Za-z0-9-]*{_SECRET_WORD}[A-Za-z0-9-]*)(=|{_GAP}+(?!-))({_VALUE})"
)
# Clients whose short password option is not spelled as a secret: the program, then its option.
PASSWORD_OPTIONS: dict[str, str] = {
    "mysql": "p", "mysqldump": "p", "mysqladmin": "p", "mysqlimport": "p", "mysqlsh": "p", "mariadb": "p",
    "mariadb-dump": "p", "mariadb-admin": "p", "sshpass": "p", "mongo": "p", "mongosh": "p",
    "mongodump": "p", "mongorestore": "p", "mongoexport": "p", "mongoimport": "p", "redis-cli": "a",
    "keydb-cli": "a", "valkey-cli": "a", "rabbitmqadmin": "p",
}  # fmt: skip
_PROGRAM = re.compile(r"(?:(?<=[\s\x00;&|(`])|^)(?:[\w./-]*/)?(" + "|".join(
    re.escape(p) for p in sorted(PASSWORD_OPTIONS, key=len, reverse=True)) + r")(?=[\s\x00]|$)")  # fmt: skip
_SEGMENT_END = re.compile(r"[;&|\n`]")
# mysql takes its password only attached (`-pX`; `-p X` prompts and X is the database); the others either way.
ATTACHED_ONLY = frozenset({"mysql", "mysqldump", "mysqladmin", "mysqlimport", "mysqlsh", "mariadb",
                           "mariadb-dump", "mariadb-admin"})  # fmt: skip
USER_PASSWORD = re.compile(
    rf"(?<![\w-])(-u|--user|--proxy-user)(={_GAP}*|{_GAP}+|)([^\s\x00'\":]+):({_VALUE})"
)
CREDENTIAL_HEADER = re.compile(
    r"(?i)\b(authorization|proxy-authorization|x-api-key|api-key|x-auth-token|private-token|cookie)"
    r"(\s*:\s*(?:(?:bearer|basic|token|digest)\s+)?)([^\s\x00'\"]+)"
)
ENV_ASSIGNMENT = re.compile(r"(?<![\w$-])([A-Za-z_][A-Za-z0-9_]*)=(" + _VALUE + ")")
ARG_SEPARATOR = "\x00"


def mask_command(
    argv: list[str], text_mask: Callable[[str], str], env_name: re.Pattern[str], marker: str
) -> list[str]:
    """An exec/attach command line (argv) as records may keep it: the same number of arguments, secrets
    replaced by `marker` (quotes around a value are kept).

    :param text_mask: the connection's text masker (known values, detectors, assignments).
    :param env_name: secret-looking environment variable names (`NAME=value` arguments and shell words).
    """
    if not argv:
        return []
    if any(ARG_SEPARATOR in arg for arg in argv):
        # Cannot be joined safely: each argument on its own (a flag's value in the next one is lost).
        return [_mask_args_text(arg, env_name, marker) for arg in map(text_mask, argv)]
    joined = _mask_args_text(ARG_SEPARATOR.join(argv), env_name, marker)
    return [text_mask(arg) for arg in joined.split(ARG_SEPARATOR)]


def _mask_args_text(text: str, env_name: re.Pattern[str], marker: str) -> str:
    def masked(value: str) -> str:
        return value[0] + marker + value[-1] if value[:1] in "'\"" and len(value) >= 2 else marker

    text = SECRET_FLAG.sub(lambda m: m.group(1) + m.group(2) + masked(m.group(3)), text)
    text = USER_PASSWORD.sub(lambda m: m.group(1) + m.group(2) + m.group(3) + ":" + masked(m.group(4)), text)
    text = CREDENTIAL_HEADER.sub(lambda m: m.group(1) + m.group(2) + marker, text)
    text = ENV_ASSIGNMENT.sub(
        lambda m: m.group(1) + "=" + masked(m.group(2)) if env_name.search(m.group(1)) else m.group(0), text
    )
    return _mask_password_options(text, marker)


def _mask_password_options(text: str, marker: str) -> str:
    """`mysql -uroot -pX db`, `sshpass -p X ssh …`, `redis-cli -a X`: the option's value, up to the end of
    the program's shell command (`;`, `&&`, `|`)."""
    out: list[str] = []
    position = 0
    for program in _PROGRAM.finditer(text):
        if program.start() < position:
            continue
        name = program.group(1)
        end_match = _SEGMENT_END.search(text, program.end())
        end = end_match.start() if end_match else len(text)
        option = PASSWORD_OPTIONS[name]
        gap = "" if name in ATTACHED_ONLY else rf"{_GAP}*"
        pattern = re.compile(rf"(?<=[\s\x00])(-{option}){gap}({_VALUE})")
        segment = pattern.sub(
            lambda m: m.group(1) + m.string[m.end(1) : m.start(2)] + marker, text[program.end() : end]
        )
        out.append(text[position : program.end()] + segment)
        position = end
    out.append(text[position:])
    return "".join(out)


def mask_command_query(
    query: str, mask_argv: Callable[[list[str]], list[str]], mask_text: Callable[[str], str] | None = None
) -> str | None:
    """A request's query string with its `command` parameters masked as a command line, and every other
    parameter (`name=value` as text) by `mask_text` (a proxied `?token=…`, a known value): the masked
    re-encoding, or None when nothing changed. Unchanged parameters are kept byte for byte; a `command` key
    is recognised as the API server decodes it (percent-escapes, `+`), in any letter case (masking more is
    harmless)."""
    pairs = query.split("&")
    positions: list[int] = []
    argv: list[str] = []
    changed = False
    for index, pair in enumerate(pairs):
        key, mark, value = pair.partition("=")
        if unquote_plus(key).strip().lower() == "command":
            positions.append(index)
            argv.append(unquote_plus(value))
        elif mask_text is not None:
            text = unquote_plus(key) + mark + unquote_plus(value)
            masked_text = mask_text(text)
            if masked_text != text:
                new_key, new_mark, new_value = masked_text.partition("=")
                pairs[index] = quote(new_key, safe="") + new_mark + quote(new_value, safe="")
                changed = True
    for index, before, after in zip(positions, argv, mask_argv(argv) if argv else [], strict=True):
        if after != before:
            pairs[index] = "command=" + quote(after, safe="")
            changed = True
    return "&".join(pairs) if changed else None
