"""asyncssh, imported in one place with its DSA deprecation warnings silenced (kubegate never offers or
accepts DSA keys; the warnings would only be noise on every agent and CLI start)."""

import logging
import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*DSA.*")
    import asyncssh

# asyncssh logs every channel at INFO; kubegate logs what an operator needs (agent connected, refused, gone).
logging.getLogger("asyncssh").setLevel(logging.WARNING)

__all__ = ["asyncssh"]
