"""The dashboard's snapshot job in-process (server/ui/site.py): before the fleet could be read a page answers 503
DB-UNAVAILABLE with the reason, not a hang or a traceback; once read, every page says how old its figures are."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from server.api import pki
from server.api.app import Server
from server.api.enrolment import Enrolment
from server.database.connection import parse_database
from server.database.storage import Storage
from server.datadir import DataDir
from server.errors import DatabaseUnavailable
from server.releases.repository import Repository
from server.ui import site
from server.ui.site import Ui, UiOptions


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    yield from make_server(tmp_path)


def make_server(tmp_path: Path) -> Iterator[Server]:
    """A Server in this process over a new SQLite database (not serving: its parts are driven by the test)."""
    data = DataDir(tmp_path / "data")
    data.root.mkdir()
    ca = pki.create_ca("test", dt.datetime.now(dt.UTC))
    data.ca_cert.parent.mkdir()
    data.ca_cert.write_bytes(pki.cert_pem(ca.cert))
    Repository.create(data)
    storage = Storage.open(parse_database(f"sqlite:///{tmp_path / 'mobility.db'}"), create=True)
    s = Server(data, storage, Enrolment(storage, ca, lambda: "p", lambda: b"{}"), Repository(data, storage=storage))
    yield s
    s.close()
    storage.close()


def test_pages_say_when_the_fleet_cannot_be_read_and_how_old_their_figures_are(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(site, "FIRST_SNAPSHOT_WAIT", 0.5)
    real_fleet = server.storage.fleet
    down = True

    def fleet() -> object:
        if down:
            raise DatabaseUnavailable("database is locked")
        return real_fleet()

    monkeypatch.setattr(server.storage, "fleet", fleet)

    async def scenario() -> tuple[int, str, int, float]:
        nonlocal down
        ui = Ui(server, UiOptions("127.0.0.1", 0, refresh=1.0))
        try:
            async with TestClient(TestServer(ui.app())) as client:
                with pytest.raises(DatabaseUnavailable):
                    await ui.refresh()
                resp = await client.get("/api/overview")
                error = (await resp.json())["error"]
                down = False
                await ui.refresh()
                ok = await client.get("/api/machines")
                doc = await ok.json()
                return resp.status, f"{error['code']}: {error['message']}", ok.status, doc["age_seconds"]
        finally:
            await ui.close()

    status, error, ok, age = asyncio.run(scenario())
    assert status == 503 and error == "DB-UNAVAILABLE: the dashboard could not read the fleet yet: database is locked"
    assert ok == 200 and 0 <= age < 5
