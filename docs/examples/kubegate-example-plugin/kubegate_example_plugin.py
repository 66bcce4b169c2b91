"""A third-party kubegate plugin: headers on requests to the API server; verbs refused per connection."""

from pydantic import BaseModel

from kubegate.core import hookimpl
from kubegate.core.flow import Decision, Flow

PLUGIN_NAME = "example-header"  # the entry point's name in pyproject.toml


class Settings(BaseModel):  # connections.NAME.plugins.example-header
    headers: dict[str, str] = {"X-Kubegate-Example": "via-kubegate"}
    deny_verbs: list[str] = []


@hookimpl
def kubegate_plugin_settings() -> type[BaseModel]:
    return Settings


@hookimpl
def kubegate_upstream_request(flow: Flow) -> None:
    flow.upstream_headers.extend(flow.connection.settings_for(PLUGIN_NAME).headers.items())


@hookimpl
def kubegate_decide(flow: Flow) -> Decision | None:
    denied = flow.attributes.verb in flow.connection.settings_for(PLUGIN_NAME).deny_verbs
    return Decision.deny(f"{flow.attributes.verb} is turned off on this connection") if denied else None
