"""Alembic's environment for kubegate's schema: the tables of the built-in plugins (SQLModel metadata).

Run through `kubegate db upgrade` (core/db.py), which passes the connection in; maintainers make a new
revision with `alembic -c core/migrations/alembic.ini revision --autogenerate -m "what changed"`.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlmodel import SQLModel

from kubegate.core.db import import_models

import_models()
target_metadata = SQLModel.metadata


def run() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:  # the alembic command line: a URL from alembic.ini or -x url=…
        from sqlalchemy import create_engine

        url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option(
            "sqlalchemy.url"
        )
        engine = create_engine(url or "sqlite://")
        with engine.begin() as connection:
            _migrate(connection)
        return
    _migrate(connection)


def _migrate(connection: Any) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True,
                      compare_type=True)  # fmt: skip
    with context.begin_transaction():
        context.run_migrations()


run()
