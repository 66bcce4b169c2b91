"""The agent tunnel: connections served by ``kubegate agent`` processes that run next to their clusters and
dial out to the gateway over SSH (docs/agent.md).

- :mod:`.plugin`: the built-in plugin ``agents`` (the ``agent`` connection type, the listener's start/stop);
- :mod:`.upstream`: ``type: agent`` connections — the last hop is an SSH channel to an agent;
- :mod:`.hub`: the SSH listener, enrolment and tunnels; :mod:`.channels`: an SSH channel as a transport;
- :mod:`.store`: agents, join tokens and tunnels in the database; :mod:`.cli`: ``kubegate agents``.

Kept import-free: ``kubegate agents`` and the CLI parser load this package without the server side.
"""
