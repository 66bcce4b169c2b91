"""Built-in kubegate plugins: one feature per module, registered like third-party plugins."""
