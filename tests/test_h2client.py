"""The senders' HTTP/2 client against a scripted peer that writes raw frames.

The emulators (and the ``h2``-engine server in test_senders.py) show the client works
with well-behaved servers; these tests send what real servers may also send and the
emulators never do: CONTINUATION, padding, PING, informational answers, trailers,
settings changed mid-flight, and protocol violations.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from pushfan import http2
from pushfan.emulators.credentials import Credentials, ensure_credentials
from pushfan.errors import SetupError
from tests.h2peer import Peer, PeerServer, Script
from worker.senders.exchange import H2Error
from worker.senders.h2client import H2Pool

StartPeer = Callable[..., Awaitable[H2Pool]]


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    return ensure_credentials(tmp_path_factory.mktemp("tls"), "https://127.0.0.1/token")


@pytest.fixture
async def peer_server(creds: Credentials) -> AsyncIterator[StartPeer]:
    """``await peer_server(script, **pool_options)``: a scripted server and a pool on it;
    ``await peer_server.finished()`` re-raises what failed in a script."""
    servers = PeerServer(creds)

    async def start(script: Script, **pool_options: float) -> H2Pool:
        return await servers.start(script, **pool_options)

    start.finished = servers.finished  # type: ignore[attr-defined]
    yield start
    await servers.close()


async def test_headers_split_over_continuation_padding_and_trailers(peer_server: StartPeer) -> None:
    async def script(peer: Peer) -> None:
        await peer.preface()
        stream_id, headers, body = await peer.request()
        assert headers[b":method"] == b"POST"
        assert body == b"ping"
        block = peer.headers_block([(":status", "200"), ("x-long", "v" * 300)])
        padded = bytes([5]) + block[:40] + b"\0" * 5
        peer.send(
            http2.frame(http2.HEADERS, http2.PADDED, stream_id, padded),
            http2.frame(http2.CONTINUATION, 0, stream_id, block[40:100]),
            http2.frame(http2.CONTINUATION, http2.END_HEADERS, stream_id, block[100:]),
            http2.frame(http2.DATA, http2.PADDED, stream_id, bytes([3]) + b"po" + b"\0" * 3),
            http2.frame(http2.DATA, 0, stream_id, b"ng"),
            peer.headers(stream_id, [("grpc-status", "0")], end=True),
        )

    pool = await peer_server(script)
    response = await pool.request("POST", "/x", [("content-type", "text/plain")], b"ping")

    assert response.status == 200
    assert response.body == b"pong"
    assert response.headers["x-long"] == "v" * 300
    assert response.headers["grpc-status"] == "0"


async def test_ping_answered_and_informational_answers_skipped(peer_server: StartPeer) -> None:
    acked: list[bytes] = []

    async def script(peer: Peer) -> None:
        await peer.preface()
        stream_id, _, _ = await peer.request()
        peer.send(http2.frame(http2.PING, 0, 0, b"12345678"))
        _, flags, _, payload = await peer.next_of(http2.PING)
        assert flags & http2.ACK
        acked.append(payload)
        peer.send(
            peer.headers(stream_id, [(":status", "100")], end=False),
            peer.headers(stream_id, [(":status", "204")], end=True),
        )

    pool = await peer_server(script)
    response = await pool.request("POST", "/x", [], b"b")

    assert response.status == 204
    assert acked == [b"12345678"]


async def test_body_waits_for_window_the_server_opens_later(peer_server: StartPeer) -> None:
    async def script(peer: Peer) -> None:
        await peer.preface({http2.INITIAL_WINDOW_SIZE: 10, http2.MAX_CONCURRENT_STREAMS: 10})
        _, flags, stream_id, _ = await peer.next_of(http2.HEADERS)
        received = b""
        _, flags, _, payload = await peer.next_of(http2.DATA)
        received += payload
        assert len(received) == 10  # no more than the stream window
        peer.send(http2.window_update(stream_id, 5000))  # the rest may come now
        while not flags & http2.END_STREAM:
            _kind, flags, _, payload = await peer.next_of(http2.DATA)
            received += payload
        assert received == b"x" * 3000
        peer.send(peer.headers(stream_id, [(":status", "200")], end=True))

    pool = await peer_server(script)
    response = await pool.request("POST", "/x", [], b"x" * 3000)

    assert response.status == 200


async def test_stream_limit_from_settings_is_honoured(peer_server: StartPeer) -> None:
    most_open = 0

    async def script(peer: Peer) -> None:
        nonlocal most_open
        await peer.preface({http2.MAX_CONCURRENT_STREAMS: 2})
        open_streams: list[int] = []
        answered = 0
        while answered < 6:
            # everything the client sends within 50 ms counts, not only what we asked for
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    while True:
                        kind, _, stream_id, _ = await peer.next_frame()
                        if kind == http2.HEADERS:
                            open_streams.append(stream_id)
            most_open = max(most_open, len(open_streams))
            peer.send(peer.headers(open_streams.pop(0), [(":status", "200")], end=True))
            answered += 1

    pool = await peer_server(script, max_connections=1)
    responses = await asyncio.gather(*(pool.request("POST", "/x", [], b"b") for _ in range(6)))

    assert [r.status for r in responses] == [200] * 6
    assert most_open == 2


async def test_a_request_waiting_for_a_stream_fails_at_its_deadline(
    peer_server: StartPeer,
) -> None:
    async def script(peer: Peer) -> None:
        await peer.preface({http2.MAX_CONCURRENT_STREAMS: 0})  # no stream, ever
        with contextlib.suppress(EOFError):
            while True:
                await peer.next_frame()

    pool = await peer_server(script, max_connections=1, timeout_s=0.3)
    waiting = [asyncio.create_task(pool.request("POST", "/x", [], b"b")) for _ in range(3)]
    # A bound against a hang, far above the deadline: the pool's sweeper must end them.
    done, _ = await asyncio.wait(waiting, timeout=10)

    assert done == set(waiting)
    for task in waiting:
        error = task.exception()
        assert isinstance(error, H2Error)
        assert error.retryable
        assert "waiting for a stream" in str(error)


@pytest.mark.parametrize(
    ("bad_frame", "code"),
    [
        (http2.frame(http2.PUSH_PROMISE, http2.END_HEADERS, 1, b"\0\0\0\2"), http2.PROTOCOL_ERROR),
        (http2.frame(http2.DATA, 0, 1, b"x" * 20000), http2.FRAME_SIZE_ERROR),
        (http2.frame(http2.CONTINUATION, http2.END_HEADERS, 1, b"\x88"), http2.PROTOCOL_ERROR),
        (http2.frame(http2.HEADERS, http2.END_HEADERS, 1, b"\xff\xff\xff"), 0x9),
    ],
    ids=["push-promise", "oversized-frame", "stray-continuation", "bad-hpack"],
)
async def test_a_protocol_violation_gets_goaway_and_fails_retryably(
    peer_server: StartPeer, bad_frame: bytes, code: int
) -> None:
    goaways: list[int] = []

    async def script(peer: Peer) -> None:
        await peer.preface()
        await peer.request()
        peer.send(bad_frame)
        _, _, _, payload = await peer.next_of(http2.GOAWAY)
        goaways.append(http2.u32(payload, 4))

    pool = await peer_server(script)
    with pytest.raises(H2Error) as caught:
        await pool.request("POST", "/x", [], b"b")
    await peer_server.finished()  # type: ignore[attr-defined]

    assert caught.value.retryable
    assert not caught.value.unprocessed
    assert goaways == [code]


async def test_a_server_without_alpn_h2_is_a_setup_error(creds: Credentials) -> None:
    context = creds.server_ssl_context()
    context.set_alpn_protocols(["http/1.1"])

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    pool = H2Pool("127.0.0.1", port, ssl_context=creds.client_ssl_context(), reconnect_backoff_s=5)
    with pytest.raises(SetupError, match="HTTP/2"):
        await pool.request("GET", "/", [])
    await pool.close()
    server.close()
