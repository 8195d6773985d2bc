"""The opening handshake is a fault boundary: whatever a client sends before it is a
WebSocket gets an HTTP answer or a closed socket, and the hub goes on serving others."""

from __future__ import annotations

import base64
import logging
from typing import Any
from urllib.parse import quote_plus

import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agentmesh import Hub, HubConfig, open_hub

from .conftest import WAIT

TOKEN = "s3cret-token"
KEY = base64.b64encode(b"0123456789abcdef")
UPGRADE = [
    (b"Host", b"127.0.0.1"),
    (b"Upgrade", b"websocket"),
    (b"Connection", b"Upgrade"),
    (b"Sec-WebSocket-Key", KEY),
    (b"Sec-WebSocket-Version", b"13"),
]


@pytest.fixture
def hub_config() -> HubConfig:
    return HubConfig(tokens=frozenset({TOKEN}))


def request(
    target: bytes = b"/",
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    method: bytes = b"GET",
    version: bytes = b"HTTP/1.1",
) -> bytes:
    """An HTTP request: by default a WebSocket upgrade with no token."""
    lines = [method + b" " + target + b" " + version]
    lines += [name + b": " + value for name, value in (UPGRADE if headers is None else headers)]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def bearer(token: str = TOKEN) -> list[tuple[bytes, bytes]]:
    return [*UPGRADE, (b"Authorization", b"Bearer " + token.encode())]


async def exchange(hub: Hub, data: bytes, *, half_close: bool = False) -> bytes:
    """Send `data` on a fresh TCP connection; return what the hub answers until it closes
    the connection (or, once a 101 is in, until the end of the HTTP head). `half_close`
    ends the request there, as a client that hangs up mid-request does."""
    assert hub.port is not None
    answer = b""
    with trio.fail_after(WAIT):
        stream = await trio.open_tcp_stream("127.0.0.1", hub.port)
        async with stream:
            try:
                await stream.send_all(data)
                if half_close:
                    await stream.send_eof()
                while not (answer.startswith(b"HTTP/1.1 101 ") and b"\r\n\r\n" in answer):
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    answer += chunk
            except trio.BrokenResourceError:
                pass  # reset by the hub before or while it answered: closed is an answer
    return answer


def status_of(answer: bytes) -> int | None:
    """The HTTP status of an answer; None if the hub closed without one."""
    if not answer:
        return None
    assert answer.startswith(b"HTTP/1.1 "), answer[:80]
    return int(answer.split(b" ", 2)[1])


async def assert_serves(hub: Hub) -> None:
    """The hub is up: a client with the token upgrades and gets a 101."""
    assert status_of(await exchange(hub, request(headers=bearer()))) == 101


# ---------------------------------------------------------------------------------------
# Known cases


async def test_a_bad_ipv6_target_is_no_token_and_the_hub_goes_on(hub: Hub, connect: Any) -> None:
    async with connect(extra_headers=bearer()[-1:]) as client:
        # urlsplit("//[") raises ValueError: it used to end the hub.
        assert status_of(await exchange(hub, request(b"//["))) == 401
        assert status_of(await exchange(hub, request(b"//[?token=" + TOKEN.encode()))) == 401
        await assert_serves(hub)
        assert (await client.request("heartbeat"))["type"] == "heartbeat_ack"


@pytest.mark.parametrize(
    "header",
    [b"Sec-WebSocket-Protocol", b"Sec-WebSocket-Extensions", b"Connection"],
)
async def test_a_header_value_that_is_not_ascii_is_a_bad_request(hub: Hub, header: bytes) -> None:
    # wsproto decodes these as ASCII and raised UnicodeDecodeError out of the handshake.
    headers = [(n, v) for n, v in bearer() if n != header] + [(header, b"Upgrade, \xff")]
    assert status_of(await exchange(hub, request(headers=headers))) == 400
    await assert_serves(hub)


@pytest.mark.parametrize(
    ("target", "headers", "status"),
    [
        (b"/", UPGRADE, 401),
        (b"/?token=wrong", UPGRADE, 401),
        (b"/?token=%ff%fe", UPGRADE, 401),
        (b"/?token=" + TOKEN.encode(), UPGRADE, 101),
        (b"/path?a=1&token=" + TOKEN.encode() + b"#frag", UPGRADE, 101),
        (b"http://[::1/?token=" + TOKEN.encode(), UPGRADE, 401),  # not a URL: no token
        (b"/", bearer(), 101),
        (b"/", bearer("wrong"), 401),
        (b"/", [*UPGRADE, (b"Authorization", b"Bearer \xff\xfe")], 401),
        (b"/", [*UPGRADE, (b"Authorization", b"bearer   " + TOKEN.encode() + b"  ")], 101),
        (b"/", [*UPGRADE, (b"Authorization", b"Basic " + TOKEN.encode())], 401),
        (b"/", [*UPGRADE, (b"Authorization", b"Bearer")], 401),
        (b"/", [*UPGRADE, (b"Authorization", b"")], 401),
    ],
)
async def test_token_forms(
    hub: Hub, target: bytes, headers: list[tuple[bytes, bytes]], status: int
) -> None:
    assert status_of(await exchange(hub, request(target, headers))) == status


async def test_an_unexpected_error_is_logged_once_answered_400_and_contained(
    hub: Hub, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(_: object) -> str:
        raise RuntimeError("a bug in the token check")

    monkeypatch.setattr("agentmesh.hub._presented_token", broken)
    with caplog.at_level(logging.ERROR, logger="agentmesh.hub"):
        assert status_of(await exchange(hub, request(headers=bearer()))) == 400
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert "a bug in the token check" in str(errors[0].exc_info[1])
    monkeypatch.undo()
    await assert_serves(hub)


async def test_a_peer_that_hangs_up_mid_request_is_closed(hub: Hub) -> None:
    assert status_of(await exchange(hub, request(headers=bearer())[:30], half_close=True)) is None
    await assert_serves(hub)


# ---------------------------------------------------------------------------------------
# Fuzzing

TOKENS = st.sampled_from([TOKEN, "", "wrong", TOKEN + "x", TOKEN.upper(), "\xff", " "])
TEXT = st.binary(max_size=40) | st.sampled_from([b"", b"\xff", b"%", b"\r", b"\x00", b"\t"])
ODD_QUERY_VALUES = [b"%ZZ", b"%ff", b"%", b"x&token=x", b"\xff", b"a b", b"%00"]


def mostly(draw: st.DrawFn, usual: Any, other: st.SearchStrategy[Any]) -> Any:
    """`usual` seven times in eight, else a value of `other`: requests stay close enough
    to a real one to get past the first check."""
    return usual if draw(st.integers(0, 7)) else draw(other)


@st.composite
def targets(draw: st.DrawFn) -> bytes:
    path = mostly(draw, b"/", st.sampled_from([b"//[", b"//", b"http://[::1", b"*", b""]) | TEXT)
    query = b""
    if draw(st.booleans()):
        name = mostly(draw, b"?token=", st.sampled_from([b"&token=", b"?TOKEN=", b"?token", b"?"]))
        value = draw(TOKENS.map(quote_plus).map(str.encode) | st.sampled_from(ODD_QUERY_VALUES))
        query = name + value
    fragment = b"#" + draw(TEXT) if draw(st.integers(0, 5)) == 0 else b""
    return path + query + fragment


@st.composite
def header_lists(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    headers = list(UPGRADE)
    if draw(st.integers(0, 4)) == 0:  # some missing, in another order (Host stays: h11 needs it)
        others = draw(st.permutations(headers[1:]))
        headers = [headers[0], *others[: draw(st.integers(0, len(others)))]]
    for _ in range(draw(st.integers(0, 2))):
        scheme = mostly(draw, b"Bearer ", st.sampled_from([b"bearer  ", b"Basic ", b"", b"Bearer"]))
        headers.append((b"Authorization", scheme + draw(TOKENS).encode()))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        names = [b"Sec-WebSocket-Protocol", b"Sec-WebSocket-Extensions", b"Connection", b"X-A"]
        name = mostly(draw, draw(st.sampled_from(names)), st.binary(max_size=10))
        headers.append((name, mostly(draw, b"chat, Upgrade", TEXT)))
    if draw(st.integers(0, 9)) == 0:  # over h11's limit on a request's head, or not
        headers.append((b"X-Big", b"a" * draw(st.sampled_from([10_000, 70_000]))))
    return headers


@st.composite
def handshakes(draw: st.DrawFn) -> tuple[bytes, bool]:
    """The bytes of a request, and whether the client ends its stream after them."""
    data = request(
        draw(targets()),
        draw(header_lists()),
        method=mostly(draw, b"GET", st.sampled_from([b"POST", b"get", b"", b"GET GET"]) | TEXT),
        version=mostly(draw, b"HTTP/1.1", st.sampled_from([b"HTTP/1.0", b"HTTP/2", b"", b"x"])),
    )
    if draw(st.integers(0, 5)) == 0:
        data = data[: draw(st.integers(0, len(data)))]  # truncated
    if draw(st.integers(0, 9)) == 0:
        data = b"\r\n".join(draw(st.permutations(data.split(b"\r\n"))))  # lines shuffled
    return data, draw(st.booleans())


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=handshakes())
@example(case=(request(b"//["), False))
@example(case=(request(headers=[*bearer(), (b"Sec-WebSocket-Protocol", b"\xff")]), False))
@example(case=(request(b"/?token=" + TOKEN.encode()), False))
async def test_fuzzed_handshakes_get_an_answer_and_the_hub_goes_on(
    case: tuple[bytes, bool],
) -> None:
    # A hub per example: pytest-trio runs each example in its own trio.run, and its
    # fixtures (`hub`) are not set up again for the next one.
    data, half_close = case
    # A request cut short without the client's end of stream waits for the handshake
    # timeout: a short one keeps those examples quick.
    config = HubConfig(tokens=frozenset({TOKEN}), handshake_timeout=0.2)
    async with open_hub("127.0.0.1", 0, config=config) as hub:
        answer = await exchange(hub, data, half_close=half_close)
        assert status_of(answer) in {None, 101, 400, 401, 404, 405, 413, 426, 431, 505}
        await assert_serves(hub)
