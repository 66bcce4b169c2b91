"""``kubegate agent``: runs next to a cluster, dials out to the gateway over SSH and serves the gateway's
``type: agent`` connections with its own cluster credential. See docs/agent.md."""
