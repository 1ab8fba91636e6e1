"""A TCP proxy in front of a MongoDB wire-protocol server that can lose replies: the server stays healthy
(the driver's monitor still hears from it) while chosen commands never get an answer, as when a reply is
dropped on the way. Messages are forwarded whole, so a lost reply never leaves half a message behind. It
also notes every command it passes on, so a test can count the round trips a request costs.

It runs its own event loop on its own thread, like a device on the network: a client that blocks the test's
loop (Motor closes synchronously) still gets its replies, or loses them, as it would in production."""
from __future__ import annotations

import asyncio
import struct
import threading
from typing import Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import bson
from bson.codec_options import CodecOptions, DatetimeConversion

HEADER = struct.Struct("<iiii")  # messageLength, requestID, responseTo, opCode
_INT32 = struct.Struct("<i")
DECODE = CodecOptions(datetime_conversion=DatetimeConversion.DATETIME_AUTO)  # any date a command may carry
OP_MSG = 2013


async def _read_message(reader: asyncio.StreamReader) -> bytes:
    header = await reader.readexactly(HEADER.size)
    length = HEADER.unpack(header)[0]
    return header + await reader.readexactly(length - HEADER.size)


class WireProxy:
    def __init__(self, upstream_url: str) -> None:
        """upstream_url: a mongodb:// connection string; the proxy stands in for its first host."""
        self.upstream_url = urlsplit(upstream_url)
        if self.upstream_url.scheme != "mongodb":
            raise ValueError("only a mongodb:// connection string names a host and port to stand in for")
        first_host = urlsplit("//" + self.upstream_url.netloc.rpartition("@")[2].split(",")[0])
        self.upstream = (first_host.hostname or "127.0.0.1", first_host.port or 27017)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="wire-proxy", daemon=True)
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.lose: frozenset[bytes] = frozenset()  # command names whose replies are dropped
        self.lose_collection: str | None = None  # only the commands on this collection, when set
        self.lost: list[str] = []  # the commands whose replies were dropped, in order
        self.commands: list[tuple[str, str | None]] = []  # (command, collection) of every command passed on

    def url(self, **options: str) -> str:
        """The upstream connection string (credentials and options kept) pointed at the proxy, plus options."""
        userinfo, at, _ = self.upstream_url.netloc.rpartition("@")
        query = [
            (name, value) for name, value in parse_qsl(self.upstream_url.query, keep_blank_values=True)
            if name.lower() not in ("directconnection", "replicaset")  # one host now, whatever it was
        ]
        query += [("directConnection", "true"), *options.items()]
        netloc = f"{userinfo}{at}127.0.0.1:{self.port}"
        return urlunsplit(("mongodb", netloc, self.upstream_url.path or "/", urlencode(query), ""))

    def lose_replies_to(self, commands: Iterable[str], collection: str | None = None) -> None:
        """Drop the replies to these commands from now on (only those on collection, when named)."""
        self.lose_collection = collection
        self.lose = frozenset(name.encode() for name in commands)

    def start(self) -> "WireProxy":
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self.loop
        ).result(timeout=10)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    async def _shutdown(self) -> None:
        assert self.server is not None
        self.server.close()
        connections = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)

    def _lost_command(self, message: bytes) -> bytes | None:
        """The command this OP_MSG runs (its body's first key) if its reply is to be lost."""
        if HEADER.unpack_from(message)[3] != OP_MSG or message[20] != 0:  # a body section comes first
            return None
        name_start = HEADER.size + 4 + 1 + 4 + 1  # flag bits, section kind, document length, element type
        name = message[name_start:message.index(b"\0", name_start)]
        if name not in self.lose:
            return None
        command = self._command(message)
        return name if self.lose_collection is None or (command is not None and command[1] == self.lose_collection) else None

    @staticmethod
    def _command(message: bytes) -> tuple[str, str | None] | None:
        """The command an OP_MSG runs and the collection it names (a getMore's is its collection field)."""
        if HEADER.unpack_from(message)[3] != OP_MSG or message[20] != 0:
            return None
        start = HEADER.size + 5  # flag bits, section kind
        body = bson.decode(message[start:start + _INT32.unpack_from(message, start)[0]], DECODE)
        name, target = next(iter(body.items()))
        collection = body.get("collection") if name == "getMore" else target
        return name, collection if isinstance(collection, str) else None

    def commands_on(self, collection: str, since: int = 0) -> list[str]:
        """The names of the commands run on collection, from the since-th command the proxy passed on."""
        return [name for name, target in self.commands[since:] if target == collection]

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
        dropped: set[int] = set()  # request ids whose replies are not passed on

        async def requests() -> None:
            while True:
                message = await _read_message(client_reader)
                command = self._command(message)
                if command is not None:
                    self.commands.append(command)
                name = self._lost_command(message)
                if name is not None:
                    dropped.add(HEADER.unpack_from(message)[1])
                    self.lost.append(name.decode())
                upstream_writer.write(message)
                await upstream_writer.drain()

        async def replies() -> None:
            while True:
                message = await _read_message(upstream_reader)
                if HEADER.unpack_from(message)[2] not in dropped:
                    client_writer.write(message)
                    await client_writer.drain()

        pumps = [asyncio.create_task(requests()), asyncio.create_task(replies())]
        try:
            # Either side closing ends both directions (the other pump then fails on a closed stream).
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            client_writer.close()
            upstream_writer.close()
