"""kubegate core: the data path, the flow object and the plugin host.

`from kubegate.core import hookimpl` is the plugin authors' marker; it is loaded on first use, so that
importing a light part of the package (the CLI, `kubegate credential`) does not load the plugin host."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # type checkers see the real marker; at run time it is imported on first use (below)
    from .plugins import hookimpl

__all__ = ["hookimpl"]


def __getattr__(name: str) -> Any:
    if name == "hookimpl":
        from .plugins import hookimpl

        return hookimpl
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
