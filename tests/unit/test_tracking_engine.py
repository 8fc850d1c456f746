"""create_tracking_engine: the engine every part of mtrkmta opens the tracking store with."""

from __future__ import annotations

from mtrkmta.tracking.store import create_tracking_engine


def test_a_bare_postgresql_url_uses_the_psycopg_driver_mtrkmta_installs():
    # SQLAlchemy 2.0 reads postgresql:// as psycopg2, which mtrkmta does not depend on.
    engine = create_tracking_engine("postgresql://mtrkmta@127.0.0.1:1/mtrkmta")
    try:
        assert engine.dialect.driver == "psycopg"
    finally:
        engine.dispose()
