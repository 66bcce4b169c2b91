"""Prometheus metrics of the agent tunnels, read from this replica's hub at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from . import hub as hubs


class TunnelCollector(Collector):
    """``kubegate_agent_*``: one series per agent (and per connection it serves) connected to this replica."""

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        hub = hubs.current()
        serving = GaugeMetricFamily(
            "kubegate_agent_tunnels",
            "Tunnels of agents connected to this replica, by connection served and agent.",
            labels=["connection", "agent"],
        )
        channels = GaugeMetricFamily(
            "kubegate_agent_channels_open",
            "Upstream connections through the tunnel (data links and SSH channels) open now, per agent.",
            labels=["agent"],
        )
        opened = CounterMetricFamily(
            "kubegate_agent_channels_opened",
            "Upstream connections (data links and SSH channels) opened since the agent connected.",
            labels=["agent"],
        )
        links = GaugeMetricFamily(
            "kubegate_agent_links_open",
            "Of kubegate_agent_channels_open, how many are data links (the rest are SSH channels).",
            labels=["agent"],
        )
        since = GaugeMetricFamily(
            "kubegate_agent_connected_since_seconds",
            "When the agent's oldest tunnel to this replica was set up (Unix time).",
            labels=["agent"],
        )
        # Two agent pods may share one identity (an HA pair): their tunnels add up under one agent label.
        per_agent: dict[str, list[float]] = {}
        per_connection: dict[tuple[str, str], int] = {}
        for tunnel in hub.status() if hub else []:
            agent = tunnel["agent"]
            for connection in tunnel["connections"]:
                per_connection[connection, agent] = per_connection.get((connection, agent), 0) + 1
            totals = per_agent.setdefault(agent, [0, 0, tunnel["since"], 0])
            totals[0] += tunnel["channels_open"]
            totals[1] += tunnel["channels_total"]
            totals[2] = min(totals[2], tunnel["since"])
            totals[3] += tunnel["links_open"]
        for (connection, agent), count in per_connection.items():
            serving.add_metric([connection, agent], count)
        for agent, (open_now, total, first, links_now) in per_agent.items():
            channels.add_metric([agent], open_now)
            links.add_metric([agent], links_now)
            opened.add_metric([agent], total)
            since.add_metric([agent], first)
        yield from (serving, channels, links, opened, since)


_registered = False


def register() -> None:
    """Add the collector to the gateway's registry once per process."""
    global _registered
    if not _registered:
        from kubegate.core.observe import REGISTRY

        REGISTRY.register(TunnelCollector())
        _registered = True
