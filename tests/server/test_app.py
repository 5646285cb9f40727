"""Every failure of the API is a JSON error with a stable ID, the unexpected ones included (never a traceback)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from server.app import errors_as_json


def _answer(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> tuple[int, dict[str, str]]:
    response = asyncio.run(errors_as_json(make_mocked_request("POST", "/v1/heartbeat"), handler))
    assert isinstance(response, web.Response) and response.body is not None
    assert isinstance(response.body, bytes)
    return response.status, json.loads(response.body)["error"]


async def _broken(request: web.Request) -> web.StreamResponse:
    raise KeyError("a bug")


async def _missing(request: web.Request) -> web.StreamResponse:
    raise web.HTTPNotFound()


async def _too_large(request: web.Request) -> web.StreamResponse:
    raise web.HTTPRequestEntityTooLarge(max_size=65536, actual_size=70000)


@pytest.mark.parametrize(
    ("handler", "status", "code"),
    [(_broken, 500, "SERVER-INTERNAL"), (_missing, 404, "NOT-FOUND"), (_too_large, 413, "BODY-TOO-LARGE")],
)
def test_failures_are_json_errors(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]], status: int, code: str
) -> None:
    got_status, error = _answer(handler)
    assert (got_status, error["code"]) == (status, code)
    assert "a bug" not in error["message"]  # the details go to the server's log, not to the client
