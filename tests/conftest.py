import pytest

from tests import tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Directories of a tiny random Llama ("causal"), T5 ("seq2seq") and Gemma 3 (a sliding-window
    layer, then a global one) with their tokenizers."""
    root = tmp_path_factory.mktemp("tiny")
    return {kind: tiny.save(kind, root / kind) for kind in ("causal", "seq2seq", "gemma")}


@pytest.fixture(params=["causal", "seq2seq", "gemma"])
def tiny_backbone(request, tiny_dir):
    from core.backbones import load

    return load(str(tiny_dir[request.param]), attn="eager")


PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@pytest.fixture
def pg_url():
    """A fresh, empty Postgres database on the local server, dropped afterwards."""
    import secrets

    from sqlalchemy import create_engine, text

    name = f"primer_test_{secrets.token_hex(4)}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    """A migrated store on SQLite (the embedded default) and on Postgres (production)."""
    from core.store import Store

    url = f"sqlite:///{tmp_path / 'primer.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    s = Store(url)
    s.upgrade()
    yield s
    s.engine.dispose()


_STARTED = __import__("time").monotonic()


def pytest_sessionfinish(session, exitstatus):
    """After a full green run, write the hardening tests' figures to docs/reliability.md."""
    import time
    from pathlib import Path

    from tests import reliability

    if exitstatus == 0 and reliability.complete():
        out = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"
        out.write_text(reliability.render(time.monotonic() - _STARTED))
