"""The senders' HTTP/2 client against a scripted peer that writes raw frames.

The emulators (and the ``h2``-engine server in test_senders.py) show the client works
with well-behaved servers; these tests send what real servers may also send and the
emulators never do: CONTINUATION, padding, PING, informational answers, trailers,
settings changed mid-flight, and protocol violations. Then trouble in the middle of a
send_many of 300 (GOAWAY, resets, a dropped connection, a silent server), counted by
what the peer received; last, malformed and hostile answers (bugs of an earlier client).

The peer is tests/h2peer.py; tests look inside the pool only through its
``pending_streams``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from pushfan import http2
from pushfan.emulators.credentials import Credentials, ensure_credentials
from pushfan.errors import SetupError
from tests.h2peer import (
    Peer,
    PeerServer,
    Request,
    Script,
    assert_complete,
    pending_streams,
    until,
)
from worker.senders.exchange import H2Error, Replies
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


# -- trouble in the middle of a burst: send_many with hundreds of requests ---------------
#
# The peer counts what it received by connection, stream and path, so each test checks
# that no request was lost, none was sent twice unless the server said it never saw it,
# and every index of the batch got exactly its own answer or error.

BURST = 300
PATHS = [f"/p/{i}" for i in range(BURST)]
INDEX = {path: i for i, path in enumerate(PATHS)}
MANY_STREAMS = {http2.MAX_CONCURRENT_STREAMS: 1000}  # the pool's own cap (100) applies


def received(peers: list[Peer]) -> list[Request]:
    return [request for peer in peers for request in peer.received]


async def serve_everything(peer: Peer) -> None:
    """Answer 200 to every request until the client goes."""
    while True:
        request = await peer.next_request()
        assert request.body == b"b"
        peer.answer(request.stream_id)


def assert_all_answered(pool: H2Pool, replies: Replies) -> None:
    assert_complete(replies, BURST)
    assert replies.errors == {}
    assert replies.status == [200] * BURST
    assert pending_streams(pool) == 0
    assert pool.traffic.in_flight == 0
    assert pool.traffic.classes["2xx"] == BURST


@pytest.mark.parametrize("style", ["last-id", "two-step", "last-id-0"])
async def test_goaway_mid_burst_reissues_exactly_the_streams_above_last_stream_id(
    peer_server: StartPeer, style: str
) -> None:
    """GOAWAY on the first connection while 100 streams are open: the streams at or below
    its last_stream_id are answered there, once; those above are sent again, once, on a
    new connection; the rest of the burst goes there too; nothing is lost. "two-step" is
    the graceful shutdown (GOAWAY 2^31-1 first, the real last id later); "last-id-0" says
    nothing open was processed."""
    peers: list[Peer] = []
    kept: set[str] = set()  # answered on the first connection
    above: set[str] = set()  # open on the first connection above last_stream_id
    drained = asyncio.Event()

    async def script(peer: Peer) -> None:
        peers.append(peer)
        await peer.preface(MANY_STREAMS)
        if peer.number > 0:
            await serve_everything(peer)
            return
        first = await peer.requests(100)  # the pool's 100 streams a connection
        for request in first[:40]:
            peer.answer(request.stream_id)
            kept.add(request.path)
        first += await peer.requests(40)  # 40 more take the answered ones' place
        still_open = first[40:]
        last = 0 if style == "last-id-0" else first[69].stream_id
        if style == "two-step":
            peer.send(http2.goaway(http2.MAX_STREAM_ID, http2.NO_ERROR))
            still_open += await peer.requests_until_idle()
        peer.send(http2.goaway(last, http2.NO_ERROR))
        still_open += await peer.requests_until_idle()  # sent before GOAWAY reached it
        for request in still_open:
            if request.stream_id <= last:
                peer.answer(request.stream_id)
                kept.add(request.path)
            else:
                above.add(request.path)
        await peer.drain_until_closed()  # the client closes it once its streams are done
        drained.set()

    pool = await peer_server(script, max_connections=1)
    replies = await pool.send_many("POST", PATHS, [("content-type", "text/plain")], b"b")

    assert_all_answered(pool, replies)
    counts = Counter(request.path for request in received(peers))
    later = Counter(r.path for r in received(peers) if r.connection > 0)
    assert set(counts) == set(PATHS)  # none lost
    assert len(above) == (100 if style == "last-id-0" else 70)
    assert kept.isdisjoint(above)
    for path in PATHS:
        if path in above:
            assert (counts[path], later[path]) == (2, 1), path  # re-sent once
        else:
            assert counts[path] == 1, path  # processed: never sent twice
    assert all(request.body == b"b" for request in received(peers))
    await asyncio.wait_for(drained.wait(), 5)
    assert pool.connects == 2


async def test_refused_streams_are_reissued_and_reset_streams_fail_alone(
    peer_server: StartPeer,
) -> None:
    """RST_STREAM REFUSED_STREAM (the server never saw it) re-issues the request, on the
    same connection; RST_STREAM CANCEL or INTERNAL_ERROR fails that index only,
    retryable; neither disturbs the other streams."""
    peers: list[Peer] = []

    async def script(peer: Peer) -> None:
        peers.append(peer)
        await peer.preface(MANY_STREAMS)
        refused: set[int] = set()
        while True:
            request = await peer.next_request()
            i = INDEX[request.path]
            if i % 4 == 0 and i not in refused:
                refused.add(i)
                peer.send(http2.rst_stream(request.stream_id, http2.REFUSED_STREAM))
            elif i % 4 == 1:
                peer.send(http2.rst_stream(request.stream_id, http2.CANCEL))
            elif i % 4 == 2:
                peer.send(http2.rst_stream(request.stream_id, http2.INTERNAL_ERROR))
            else:
                peer.answer(request.stream_id, 200)

    pool = await peer_server(script, max_connections=1)
    replies = await pool.send_many("POST", PATHS, [], b"b")

    assert_complete(replies, BURST)
    assert set(replies.errors) == {i for i in range(BURST) if i % 4 in (1, 2)}
    for i, error in replies.errors.items():
        assert error.retryable
        assert not error.unprocessed
        assert str(error) == ("RST_STREAM CANCEL" if i % 4 == 1 else "RST_STREAM INTERNAL_ERROR")
    assert [s for i, s in enumerate(replies.status) if i % 4 in (0, 3)] == [200] * (BURST // 2)
    counts = Counter(request.path for request in received(peers))
    assert counts == Counter({p: 2 if INDEX[p] % 4 == 0 else 1 for p in PATHS})
    assert pool.connects == 1
    assert pending_streams(pool) == 0
    assert pool.traffic.in_flight == 0


def split_header_frames(
    stream_id: int, block: bytes, pieces: int, *, end_stream: bool, padded: bool, priority: bool
) -> list[bytes]:
    """HEADERS and CONTINUATION frames carrying ``block`` in ``pieces`` fragments (some
    may be empty), the HEADERS frame padded and with priority fields if asked."""
    cuts = [len(block) * k // pieces for k in range(pieces + 1)]
    fragments = [block[a:b] for a, b in itertools.pairwise(cuts)]
    flags = http2.END_STREAM if end_stream else 0
    first = fragments[0]
    if priority:
        flags |= http2.PRIORITY_FLAG
        first = b"\x00\x00\x00\x00\x10" + first  # depends on stream 0, weight 17
    if padded:
        flags |= http2.PADDED
        first = bytes([7]) + first + b"\0" * 7
    if pieces == 1:
        flags |= http2.END_HEADERS
    frames = [http2.frame(http2.HEADERS, flags, stream_id, first)]
    for k, fragment in enumerate(fragments[1:], start=2):
        last = http2.END_HEADERS if k == pieces else 0
        frames.append(http2.frame(http2.CONTINUATION, last, stream_id, fragment))
    return frames


async def test_response_header_blocks_split_over_continuation_frames(
    peer_server: StartPeer,
) -> None:
    """Every answer's header block comes in one to six fragments (HEADERS, then
    CONTINUATION), some padded or with priority fields, answered out of order, while the
    peer's encoder indexes and evicts entries in its dynamic table: every index gets its
    own status, headers and body."""
    big = "h" * 3000  # indexed: later blocks refer to it until it is evicted

    def fields(i: int) -> list[tuple[str, str]]:
        return [("x-path", PATHS[i]), ("x-big", big), ("x-n", str(i) * (i % 7))]

    async def script(peer: Peer) -> None:
        await peer.preface(MANY_STREAMS)
        shuffle = random.Random(7).shuffle
        while True:
            batch = [await peer.next_request(), *await peer.requests_until_idle(0.005)]
            shuffle(batch)
            for request in batch:
                i = INDEX[request.path]
                status = 200 if i % 3 else 400 + i % 100
                block = peer.headers_block([(":status", str(status)), *fields(i)])
                peer.send(
                    *split_header_frames(
                        request.stream_id,
                        block,
                        1 + i % 6,
                        end_stream=status == 200,
                        padded=i % 2 == 0,
                        priority=i % 5 == 0,
                    )
                )
                if status != 200:
                    peer.send(
                        http2.frame(http2.DATA, http2.END_STREAM, request.stream_id, b"%d" % i)
                    )

    pool = await peer_server(script, max_connections=1)
    replies = await pool.send_many("POST", PATHS, [], b"b")

    assert_complete(replies, BURST)
    assert replies.errors == {}
    assert replies.status == [200 if i % 3 else 400 + i % 100 for i in range(BURST)]
    for i, answer in replies.answers.items():
        assert [(k, answer.headers[k]) for k, _ in fields(i)] == fields(i)
        assert answer.body == b"%d" % i
    assert pool.connects == 1
    assert pending_streams(pool) == 0


async def test_large_bodies_are_flow_controlled_both_ways(peer_server: StartPeer) -> None:
    """Requests: 300 bodies of 2500 bytes against the peer's 1000-byte stream windows, so
    each waits for the peer's WINDOW_UPDATEs. Responses: nine of 3 MiB (27 MiB: past the
    client's 16 MiB connection window and its 1 MiB stream windows) sent round robin,
    never beyond the windows the client gave, so only its WINDOW_UPDATEs let them finish.
    Every byte arrives, each at its own index."""
    size = 3 << 20
    big = {i: random.Random(i).randbytes(size) for i in range(0, BURST, BURST // 8)}
    bodies = [random.Random(-i).randbytes(2500) for i in range(BURST)]
    updates: list[tuple[int, int]] = []
    big_streams: list[int] = []

    async def script(peer: Peer) -> None:
        await peer.preface({**MANY_STREAMS, http2.INITIAL_WINDOW_SIZE: 1000})
        waiting: dict[int, bytes] = {}
        for _ in range(BURST):
            request = await peer.next_request()
            i = INDEX[request.path]
            assert request.body == bodies[i], i
            if i in big:
                peer.send(peer.headers(request.stream_id, [(":status", "503")], end=False))
                waiting[request.stream_id] = big[i]
            else:
                peer.answer(request.stream_id)
        big_streams.extend(waiting)
        await peer.send_bodies(waiting)
        updates.extend(peer.window_updates)
        await peer.drain_until_closed()

    pool = await peer_server(script, max_connections=1)
    replies = await pool.send_many("POST", PATHS, [], bodies)

    assert_complete(replies, BURST)
    assert replies.errors == {}
    assert set(replies.answers) == set(big)
    for i, body in big.items():
        assert replies.status[i] == 503
        assert replies.answers[i].body == body
    assert pending_streams(pool) == 0
    # the client gave window back on the connection and on every big stream
    assert sum(n for sid, n in updates if sid == 0) >= len(big) * size - (1 << 24)
    for sid in big_streams:
        assert sum(n for s, n in updates if s == sid) >= size - (1 << 20)


async def test_a_connection_dropped_mid_flight_fails_only_its_open_streams(
    peer_server: StartPeer,
) -> None:
    """The first connection drops (no GOAWAY) with 100 requests received and unanswered:
    exactly those fail, retryable (they may have been processed) and not re-sent; the
    rest of the burst is answered on a new connection, each once."""
    peers: list[Peer] = []
    dropped: set[str] = set()

    async def script(peer: Peer) -> None:
        peers.append(peer)
        await peer.preface(MANY_STREAMS)
        if peer.number > 0:
            await serve_everything(peer)
            return
        first = await peer.requests(100)
        for request in first[:50]:
            peer.answer(request.stream_id)
        unanswered = first[50:] + await peer.requests(50)
        dropped.update(request.path for request in unanswered)
        peer.drop()

    pool = await peer_server(script, max_connections=1)
    replies = await pool.send_many("POST", PATHS, [], b"b")

    assert_complete(replies, BURST)
    assert {PATHS[i] for i in replies.errors} == dropped
    assert len(dropped) == 100
    for error in replies.errors.values():
        assert error.retryable
        assert not error.unprocessed
        assert str(error) == "connection lost"
    counts = Counter(request.path for request in received(peers))
    assert counts == Counter(PATHS)  # each sent once: the dropped ones are not re-sent
    assert [s for s in replies.status if s] == [200] * (BURST - 100)
    assert pool.connects == 2
    assert pending_streams(pool) == 0
    assert pool.traffic.in_flight == 0


@pytest.mark.parametrize("silence", ["after-settings", "before-settings"])
async def test_a_server_that_never_answers_fails_the_burst_at_its_deadline(
    peer_server: StartPeer, silence: str
) -> None:
    """A server that reads everything and answers nothing: every index fails retryable at
    the deadline, send_many returns then, no stream stays pending, and each stream sent
    is reset (CANCEL) once. Silent from the start (no SETTINGS), no request is sent and
    each fails waiting for a stream."""
    peers: list[Peer] = []
    release = asyncio.Event()

    async def script(peer: Peer) -> None:
        peers.append(peer)
        if silence == "before-settings":
            assert await peer.reader.readexactly(len(http2.PREFACE)) == http2.PREFACE
            await release.wait()
            return
        await peer.preface(MANY_STREAMS)
        await peer.drain_until_closed()

    timeout = 0.5
    pool = await peer_server(script, timeout_s=timeout)
    started = time.monotonic()
    replies = await pool.send_many("POST", PATHS, [], b"b")
    elapsed = time.monotonic() - started

    assert_complete(replies, BURST)
    assert timeout <= elapsed < timeout + 1.0
    assert set(replies.errors) == set(range(BURST))
    reason = "TIMEOUT" if silence == "after-settings" else "TIMEOUT waiting for a stream"
    for error in replies.errors.values():
        assert error.retryable
        assert str(error) == reason
    assert pending_streams(pool) == 0
    assert pool.traffic.in_flight == 0
    assert pool.traffic.classes["error"] == BURST
    if silence == "after-settings":
        streams = sorted((r.connection, r.stream_id) for r in received(peers))
        assert Counter(r.path for r in received(peers)) == Counter(PATHS)  # none sent twice
        await until(lambda: sum(len(p.resets) for p in peers) >= BURST)
        resets = sorted((p.number, sid) for p in peers for sid, _ in p.resets)
        assert resets == streams
        assert {code for p in peers for _, code in p.resets} == {http2.CANCEL}
    release.set()


# -- malformed and hostile answers (each found in an earlier client by these tests) --------


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, object]]]:
    """What reaches the event loop's exception handler during the test (an exception
    escaping a protocol callback, a future's exception never retrieved...)."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    seen: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    yield seen
    loop.set_exception_handler(previous)


@pytest.mark.parametrize(
    "fields",
    [
        [(":status", "abc")],
        [("x-no-status", "1")],
        [(":status", "0")],
        [(":status", "100")],
        [(":status", "-1")],
        [(":status", "2000")],
    ],
    ids=["non-numeric", "missing", "zero", "informational-with-end-stream", "negative", "4-digit"],
)
async def test_a_malformed_status_fails_its_own_request_only(
    peer_server: StartPeer, loop_errors: list[dict[str, object]], fields: list[tuple[str, str]]
) -> None:
    """A response whose :status is missing or not a 3-digit final status is malformed
    (RFC 9113 8.1.1, 8.3.2; RFC 9110 15): that request fails, the other one on the
    connection is answered, and nothing escapes to the event loop."""

    async def script(peer: Peer) -> None:
        await peer.preface()
        first, second = await peer.requests(2)
        peer.send(peer.headers(first.stream_id, fields, end=True))
        peer.answer(second.stream_id)
        await peer.drain_until_closed()

    pool = await peer_server(script)
    replies = await pool.send_many("POST", ["/0", "/1"], [], b"b")

    assert loop_errors == []
    assert_complete(replies, 2)
    assert set(replies.errors) == {0}
    assert replies.status[1] == 200


@pytest.mark.parametrize("level", ["connection", "stream"])
async def test_a_window_update_past_2_31_minus_1_is_a_flow_control_error(
    peer_server: StartPeer, level: str
) -> None:
    """A send window pushed past 2^31-1 must end the stream or the connection with
    FLOW_CONTROL_ERROR (RFC 9113 6.9.1), and the request fails."""
    codes: list[int] = []
    coded = asyncio.Event()
    MAX = http2.MAX_WINDOW

    async def script(peer: Peer) -> None:
        await peer.preface()
        request = await peer.next_request()
        # the window is 65535 less the 1 body byte: this takes it to 2^31 + 65533
        peer.send(http2.window_update(0 if level == "connection" else request.stream_id, MAX))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1):
                while not codes:
                    kind, _, _, payload = await peer.next_frame()
                    if kind == http2.RST_STREAM:
                        codes.append(http2.u32(payload))
                    elif kind == http2.GOAWAY:
                        codes.append(http2.u32(payload, 4))
        coded.set()
        peer.answer(request.stream_id)  # too late if the client did its part
        await peer.drain_until_closed()

    pool = await peer_server(script)
    replies = await pool.send_many("POST", ["/0"], [], b"b")
    async with asyncio.timeout(2):  # the peer reads the client's answer after send_many
        await coded.wait()

    assert codes == [http2.FLOW_CONTROL_ERROR]
    assert set(replies.errors) == {0}


@pytest.mark.parametrize("end", ["connect-timeout", "pool-closed"])
async def test_a_connection_whose_settings_never_come_is_closed(
    peer_server: StartPeer, end: str
) -> None:
    """A server that completes TLS and then says nothing: once the connect gives up (its
    timeout, or the pool closing), the client closes that connection."""
    closed = asyncio.Event()

    async def script(peer: Peer) -> None:
        assert await peer.reader.readexactly(len(http2.PREFACE)) == http2.PREFACE
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(1.5):
                while await peer.reader.read(65536):
                    pass
                closed.set()

    pool = await peer_server(script, timeout_s=0.5, connect_timeout_s=0.3)
    if end == "connect-timeout":
        with pytest.raises(H2Error, match="connect failed"):
            await pool.request("POST", "/", [], b"b")
    else:
        waiting = asyncio.create_task(pool.request("POST", "/", [], b"b"))
        await asyncio.sleep(0.1)
        await pool.close()
        with pytest.raises(H2Error):
            await waiting
    await asyncio.wait_for(closed.wait(), 1)


@pytest.mark.parametrize(
    "after",
    [
        [http2.settings_frame({}), http2.goaway(1, http2.NO_ERROR)],
        [http2.goaway(1, http2.NO_ERROR), http2.frame(http2.PING, 0, 0, b"12345678")],
    ],
    ids=["settings-then-goaway", "goaway-then-ping"],
)
async def test_frames_after_a_closing_goaway_are_harmless(
    peer_server: StartPeer, loop_errors: list[dict[str, object]], after: list[bytes]
) -> None:
    """An answer, then GOAWAY with nothing left open (the client closes), then more
    frames in the same read (another GOAWAY, SETTINGS, PING): the answer stands, the
    connection closes, and nothing escapes to the event loop. Found by test_h2_fuzz.py."""
    closed = asyncio.Event()

    async def script(peer: Peer) -> None:
        await peer.preface()
        request = await peer.next_request()
        goaway = http2.goaway(request.stream_id, http2.NO_ERROR)
        peer.send(*peer.response_frames(request.stream_id), goaway, *after)
        await peer.drain_until_closed()
        closed.set()

    pool = await peer_server(script)
    response = await pool.request("POST", "/", [], b"b")
    await asyncio.wait_for(closed.wait(), 5)
    await asyncio.sleep(0.05)

    assert response.status == 200
    assert loop_errors == []
