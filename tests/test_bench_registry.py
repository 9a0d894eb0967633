"""The registry benchmark's HTTP/1.1 client (response framing, the request loop) and its
instruction counts' reading."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.registry_client import Result, drive, http_request, parse_response
from bench.registry_instructions import latest_total

CREATED = (
    b"HTTP/1.1 201 Created\r\ndate: Mon, 23 Nov 2026 00:00:00 GMT\r\nserver: uvicorn\r\n"
    b"content-type: application/json\r\ncontent-length: 17\r\n\r\n"
    b'{"change": "new"}'
)


def test_a_whole_response_gives_its_status_and_length() -> None:
    assert parse_response(CREATED) == (201, len(CREATED))
    assert parse_response(bytearray(CREATED)) == (201, len(CREATED))


@given(st.integers(min_value=0, max_value=len(CREATED) - 1))
def test_any_prefix_is_incomplete(cut: int) -> None:
    assert parse_response(CREATED[:cut]) is None


def test_what_follows_the_response_is_not_counted_in_it() -> None:
    assert parse_response(CREATED + CREATED[:10]) == (201, len(CREATED))


def test_no_content_needs_no_length() -> None:
    response = b"HTTP/1.1 204 No Content\r\nserver: uvicorn\r\n\r\n"
    assert parse_response(response) == (204, len(response))


def test_header_names_are_case_insensitive() -> None:
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert parse_response(response) == (200, len(response))


@pytest.mark.parametrize(
    "response",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/1.1 2x0 Odd\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\nno length",
        b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    ],
)
def test_what_it_cannot_frame_is_an_error(response: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        parse_response(response)


def test_requests_carry_their_length_and_headers() -> None:
    request = http_request("POST", "/v1/devices", "h:1", {"authorization": "Bearer x"}, b"{}")
    assert request == (
        b"POST /v1/devices HTTP/1.1\r\nhost: h:1\r\nauthorization: Bearer x\r\n"
        b"content-length: 2\r\n\r\n{}"
    )
    assert http_request("GET", "/healthz", "h:1", {}, b"") == (
        b"GET /healthz HTTP/1.1\r\nhost: h:1\r\n\r\n"
    )


class _StubServer:
    """Answers each request with the status in its path, in two writes."""

    def __init__(self) -> None:
        self.handlers: set[asyncio.Task[None]] = set()
        self.served: Counter[asyncio.Task[None]] = Counter()  # requests by connection

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *_: object) -> None:
        self.server.close()
        await asyncio.gather(*self.handlers)  # each ends at its connection's EOF
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            while not reader.at_eof():
                head = await reader.readuntil(b"\r\n\r\n")
                self.served[task] += 1
                status = head.split(b" ")[1].strip(b"/")
                writer.write(b"HTTP/1.1 " + status + b" X\r\ncontent-len")
                await writer.drain()
                writer.write(b"gth: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.mark.parametrize("rate", [0, 5_000])
async def test_drive_answers_every_request_once(rate: float) -> None:
    statuses = [200, 201, 404] * 40
    requests = [http_request("GET", f"/{s}", "h", {}, b"") for s in statuses]
    async with _StubServer() as url:
        result = await drive(url, requests, connections=7, rate=rate)
    assert result.statuses == Counter(statuses)
    assert len(result.latencies) == len(statuses)
    assert all(latency > 0 for latency in result.latencies)


async def test_an_open_loop_run_tells_how_late_it_sent() -> None:
    requests = [http_request("GET", "/200", "h", {}, b"")] * 50
    async with _StubServer() as url:
        paced = await drive(url, requests, connections=7, rate=5_000)
        closed = await drive(url, requests, connections=7)
    assert len(paced.lags) == 50
    assert all(lag >= 0 for lag in paced.lags)
    assert paced.lag(0.99) >= paced.lag(0.5)
    assert (closed.lags, closed.lag(0.99)) == ([], 0.0)


async def test_every_connection_takes_its_turn() -> None:
    # an idle connection the server closes (uvicorn: after 5 s) would end the run
    requests = [http_request("GET", "/200", "h", {}, b"")] * 7
    stub = _StubServer()
    async with stub as url:
        await drive(url, requests, connections=7, rate=1_000)
    assert sorted(stub.served.values()) == [1] * 7


def test_the_backlog_of_an_open_loop_run() -> None:
    # at 100/s, requests fall due 10 ms apart; the last is due at 0.99 s
    steady = Result(1.0, [0.005] * 100, Counter())
    growing = Result(1.5, [i / 200 for i in range(100)], Counter())  # each 5 ms later
    assert steady.backlog(100) == 1  # the last itself
    assert growing.backlog(100) == 33  # those due after 0.66 s: i / 100 + i / 200 > 0.99


def test_the_latest_callgrind_dump_is_read(tmp_path: Path) -> None:
    out = tmp_path / "callgrind.out"
    for part, total in ((1, 10), (2, 20), (10, 100)):  # .10 sorts before .2 as text
        (tmp_path / f"callgrind.out.{part}").write_text(f"events: Ir\nsummary: {total}\n")
    assert latest_total(out) == 100
