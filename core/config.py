"""The gateway configuration file (YAML), validated at start.

A bad file never produces a traceback: :class:`ConfigError` names the file, the key and the reason, and the
CLI prints it and exits non-zero. Connection upstreams and plugin settings are validated by the models
their connection type and plugin declare (see the ``kubegate_connection_types`` and
``kubegate_plugin_settings`` hooks).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, cast, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError as ConfigError  # re-exported: callers catch config errors from here
from .people import PeopleSettings

CONNECTION_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


MAX_WORKERS = 1024

LOOPBACK_HTTP = ("http://127.0.0.1", "http://localhost", "http://[::1]")


def _https_or_loopback(url: str) -> str:
    if not url.startswith("https://") and not url.startswith(LOOPBACK_HTTP):
        raise ValueError("must be https (http only on loopback)")
    return url


# Where the gateway sends events (webhooks): https, or plain http to this host only.
WebhookURL = Annotated[str, AfterValidator(_https_or_loopback)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TLSSettings(StrictModel):
    enabled: bool = Field(True, description="Serve https. kubectl sends bearer tokens only over https.")
    cert_file: Path | None = Field(None, description="Server certificate (PEM); generated when unset.")
    key_file: Path | None = Field(None, description="Server private key (PEM); generated when unset.")
    hostnames: list[str] = Field(default_factory=list, description="Extra names for a generated certificate.")


class LimitSettings(StrictModel):
    max_request_body_bytes: int = Field(3 * 1024 * 1024, gt=0, description="Larger bodies get 413.")
    upstream_connect_timeout_seconds: float = Field(5.0, gt=0)
    upstream_response_timeout_seconds: float = Field(
        75.0,
        gt=0,
        description="Longest wait for upstream response headers (not for the body: watches stream).",
    )
    max_websocket_message_bytes: int = Field(16 * 1024 * 1024, gt=0)
    audit_body_bytes: int = Field(
        64 * 1024,
        ge=0,
        description="Request bodies up to this size go into audit events (masked); larger ones only as size "
        "and SHA-256.",
    )
    upstream_pool_size: int = Field(
        0,
        ge=0,
        description="Open connections to each upstream, at most; 0 = no cap. Every watch and `logs -f` holds "
        "one for as long as it runs, so a cap below the number of concurrent streams makes the next request "
        "wait for a free connection (503 after the connect timeout).",
    )


class DatabaseSettings(StrictModel):
    url: str | None = Field(
        None,
        description="SQLAlchemy URL of the database for tokens and other state; default "
        "`sqlite:///STATE_DIR/kubegate.db`.",
    )


class ConnectionSettings(StrictModel):
    type: str = "kubernetes"
    description: str = ""
    upstream: dict[str, Any]
    plugins: dict[str, dict[str, Any] | None] = Field(default_factory=dict)


class GatewaySettings(StrictModel):
    listen: str = Field("127.0.0.1:8443", description="HOST:PORT to serve on.")
    public_url: str | None = Field(None, description="URL clients use; defaults to one built from `listen`.")
    state_dir: Path = Field(Path(".kubegate"), description="Generated certificates and local state.")
    tls: TLSSettings = Field(default_factory=lambda: TLSSettings())
    limits: LimitSettings = Field(default_factory=lambda: LimitSettings())
    database: DatabaseSettings = Field(default_factory=lambda: DatabaseSettings())
    log_level: str = "info"
    log_format: Literal["text", "json"] = Field(
        "text", description="`json`: one JSON object per log line, with the request id where there is one."
    )
    shutdown_grace_seconds: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="On SIGTERM/SIGINT (and for the old config after a SIGHUP reload), how long open requests, "
        "watches and `logs -f` may go on before they are closed (uvicorn closes exec/attach/port-forward "
        "sessions at once); 0: at once; fractions round up to whole seconds.",
    )
    server: Literal["uvicorn", "hypercorn"] = Field(
        "uvicorn",
        description="ASGI server: uvicorn (HTTP/1.1, the faster data path) or hypercorn (adds HTTP/2).",
    )
    workers: int | Literal["auto"] = Field(
        1,
        description="Gateway processes serving the one listener: an integer from 1 to 1024, or `auto` (one per "
        "usable CPU). 1 serves in one process, as before.",
    )
    plugins: dict[str, dict[str, Any] | None] = Field(
        default_factory=dict,
        description="Gateway-wide plugins and their settings (e.g. `login`), validated by the model each "
        "plugin declares with `kubegate_gateway_settings`.",
    )
    people: PeopleSettings = Field(
        default_factory=lambda: PeopleSettings(),
        description="How identities map to people (an explicit map, then claims, then the user name): "
        "approvals refuse a person's own request and count distinct people. See docs/identity.md.",
    )
    connections: dict[str, ConnectionSettings]

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        split_listen(value)
        return value

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: Any) -> int | str:
        # bool is an int to Python: `workers: yes` is a mistake, not 1.
        if value == "auto" or (
            isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_WORKERS
        ):
            return cast("int | str", value)
        raise ValueError(f"must be an integer from 1 to {MAX_WORKERS}, or auto")

    @field_validator("connections")
    @classmethod
    def _names(cls, value: dict[str, ConnectionSettings]) -> dict[str, ConnectionSettings]:
        if not value:
            raise ValueError("at least one connection is needed")
        for name in value:
            if not CONNECTION_NAME.match(name):
                raise ValueError(f"connection name {name!r} must be a DNS label (a-z, 0-9, '-')")
        return value

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]


def private(model: BaseModel, name: str) -> Any:
    """A pydantic model's private attribute (`PrivateAttr`), read from its private dict. `model._name` goes
    through BaseModel.__getattr__, about 5 µs a read; plugins' settings keep what they built at config load
    there, and read it on every request."""
    values = model.__pydantic_private__
    if values is None or name not in values:
        raise AttributeError(f"{type(model).__name__} has no private attribute {name!r}")
    return values[name]


def split_listen(address: str) -> tuple[str, int]:
    """HOST and PORT of a listening address (`127.0.0.1:8443`, `localhost:8443`, `[::1]:8443`; port 0: any
    free port). ValueError saying what is wrong in words a user can act on: the same check serves the
    `listen` key, `kubegate serve --bind` and the server's own bind."""
    if address.startswith("["):  # [IPv6]:PORT
        host, bracket, rest = address[1:].partition("]")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{address!r}: expected [IPv6]:PORT, e.g. [::1]:8443") from None
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{address!r}: expected [IPv6]:PORT, e.g. [::1]:8443")
        port = rest[1:]
    else:
        host, colon, port = address.rpartition(":")
        if not colon:  # `localhost`: a host without a port
            host, port = address, ""
        if ":" in host:
            raise ValueError(f"{address!r}: an IPv6 address goes in brackets, e.g. [{host}]:{port or 8443}")
    if not port:
        example = address.rstrip(":") or "127.0.0.1"
        raise ValueError(f"{address!r} has no port: expected HOST:PORT, e.g. {example}:8443")
    if not (port.isascii() and port.isdigit()):
        raise ValueError(f"{address!r}: port {port!r} is not a number")
    if int(port) > 65535:
        raise ValueError(f"{address!r}: port {int(port)} is out of range (0-65535)")
    if not host:
        raise ValueError(f"{address!r} has no host: expected HOST:PORT, e.g. 127.0.0.1:{port}")
    return host, int(port)


def worker_count(settings: GatewaySettings) -> int:
    """How many gateway processes `workers` asks for (`auto`: the CPUs this process may run on)."""
    if settings.workers != "auto":
        return int(settings.workers)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    return min(max(usable, 1), MAX_WORKERS)


def format_location(loc: tuple[int | str, ...], prefix: str = "") -> str:
    parts = [prefix] if prefix else []
    parts += [str(p) for p in loc]
    return ".".join(parts)


def first_error(
    exc: ValidationError, prefix: str = "", model: type[BaseModel] | None = None
) -> tuple[str, str]:
    """(dotted key, reason) of the first error (unknown keys first). An unknown key names the closest valid one (or the valid keys
    there); `model` is the model that was validated (found by `exc.title` when not given)."""
    errors = exc.errors()
    # A typo'd key also makes the real key "missing": the unknown key is the one to name.
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    msg = err["msg"].removeprefix("Value error, ")
    loc = tuple(err["loc"])
    if err["type"] == "extra_forbidden":
        msg = "unknown key" + _key_hint(str(loc[-1]), valid_keys(model or _model_named(exc.title), loc[:-1]))
    elif err["type"] == "missing":
        msg = "required key is missing"
    return format_location(loc, prefix), msg


def _key_hint(key: str, valid: list[str] | None) -> str:
    if not valid:
        return ""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (valid here: {', '.join(valid)})"


def _model_named(title: str) -> type[BaseModel] | None:
    """The one loaded model class called `title` (None when there is none, or several)."""
    found: list[type[BaseModel]] = []
    pending: list[type[BaseModel]] = [BaseModel]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.__name__ == title and cls not in found:
            found.append(cls)
    return found[0] if len(found) == 1 else None


def valid_keys(model: type[BaseModel] | None, loc: tuple[int | str, ...]) -> list[str] | None:
    """The keys the mapping at `loc` inside `model` accepts (None when that is not a model's mapping)."""
    node: Any = model
    for part in loc:
        node = _step(node, part)
        if node is None:
            return None
    if not (isinstance(node, type) and issubclass(node, BaseModel)):
        return None
    return [field.alias or name for name, field in node.model_fields.items()]


def _step(annotation: Any, part: int | str) -> Any:
    """The type one step (a field, a list index, a mapping key) into `annotation`."""
    for member in _members(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            if isinstance(part, str):
                if part == member.__name__ or part in _tags(
                    member
                ):  # a union's member, named by class or tag
                    return member
                for name, field in member.model_fields.items():
                    if part in (name, field.alias):
                        return field.annotation
        origin, args = get_origin(member), get_args(member)
        if isinstance(part, int) and origin in (list, tuple, set, frozenset) and args:
            return args[0]
        if isinstance(part, str) and origin is dict and len(args) == 2:
            return args[1]
    return None


def _tags(model: type[BaseModel]) -> set[Any]:
    """The values of `model`'s Literal fields: how pydantic names a discriminated union's member in a location."""
    return {
        value
        for field in model.model_fields.values()
        if get_origin(field.annotation) is Literal
        for value in get_args(field.annotation)
    }


def _members(annotation: Any) -> list[Any]:
    """`annotation` without Annotated/Optional wrapping: the union's members, or itself."""
    if get_origin(annotation) is Annotated:
        return _members(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        return [m for arg in get_args(annotation) for m in _members(arg)]
    return [annotation]


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found") from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(path, where, f"invalid YAML: {problem}") from None


ModelT = TypeVar("ModelT", bound=BaseModel)


def read_model(path: Path, model: type[ModelT]) -> ModelT:
    """A YAML mapping file validated against `model`; ConfigError naming the file, the key and the reason."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(path, "", "the file must be a YAML mapping")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        key, reason = first_error(exc, model=model)
        raise ConfigError(path, key, reason) from None


def parse_settings(path: Path) -> GatewaySettings:
    """Read and validate the top level of the config file (connections' inner blocks come later)."""
    settings = read_model(path, GatewaySettings)
    base = path.parent
    settings.state_dir = resolve(base, settings.state_dir)
    if settings.tls.cert_file:
        settings.tls.cert_file = resolve(base, settings.tls.cert_file)
    if settings.tls.key_file:
        settings.tls.key_file = resolve(base, settings.tls.key_file)
    if bool(settings.tls.cert_file) != bool(settings.tls.key_file):
        raise ConfigError(path, "tls", "cert_file and key_file go together")
    return settings


def check_readable(config_path: Path | str, key: str, path: Path) -> None:
    """ConfigError naming the key and the file when a file the config refers to cannot be read."""
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(config_path, key, f"cannot read {path}: {exc.strerror or exc}") from None


def resolve(base: Path, value: Path) -> Path:
    value = value.expanduser()
    return value if value.is_absolute() else (base / value).resolve()
