"""The HTTP listener's ResponseWriter on a real uvloop transport over a socket pair: a held
write leaves with the next one in a single segment, flush and close send what is held,
and a writer that holds nothing is a plain transport."""

from __future__ import annotations

import asyncio
import socket

import uvloop

from gateway.listener_limits import ResponseWriter


async def _writer() -> tuple[ResponseWriter, socket.socket, asyncio.Transport]:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
    return ResponseWriter(transport), theirs, transport


def _received(peer: socket.socket) -> bytes:
    try:
        return peer.recv(65536)
    except BlockingIOError:
        return b""


def test_a_held_head_leaves_with_the_body() -> None:
    async def scenario() -> None:
        writer, peer, transport = await _writer()
        writer.hold_next()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n")
        await asyncio.sleep(0.01)
        assert _received(peer) == b""  # held, not sent
        writer.write(b"body")
        await asyncio.sleep(0.01)
        assert _received(peer) == b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nbody"
        writer.write(b"next")  # nothing held: straight through
        await asyncio.sleep(0.01)
        assert _received(peer) == b"next"
        transport.close()
        peer.close()

    uvloop.run(scenario())


def test_flush_and_close_send_what_is_held() -> None:
    async def scenario() -> None:
        writer, peer, _ = await _writer()
        writer.hold_next()
        writer.write(b"head")
        writer.flush()
        await asyncio.sleep(0.01)
        assert _received(peer) == b"head"
        writer.flush()  # nothing held: nothing sent
        writer.hold_next()
        writer.write(b"last")
        assert not writer.is_closing()  # everything else is the transport's
        writer.close()
        await asyncio.sleep(0.01)
        assert _received(peer) == b"last"
        assert writer.is_closing()
        peer.close()

    uvloop.run(scenario())
