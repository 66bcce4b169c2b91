"""kubegate core: the data path, the flow object and the plugin host."""

from .plugins import hookimpl

__all__ = ["hookimpl"]
