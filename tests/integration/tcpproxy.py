"""A small TCP round-robin load balancer for the tests: TLS passes through untouched (as HAProxy `mode tcp` does),
each new connection goes to the next backend, and a backend that refuses the connection is skipped for the next one
(HAProxy's `option redispatch`). Run as ``python -m tests.integration.tcpproxy LISTEN_HOST:PORT BACKEND...``; it
prints ``listening on HOST:PORT`` once bound and runs until SIGTERM. ``--for SECONDS`` bounds its life."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import signal
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def serve(listen: str, backends: list[tuple[str, int]], lifetime: float) -> None:
    turn = itertools.cycle(range(len(backends)))

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        first = next(turn)
        for i in range(len(backends)):
            host, port = backends[(first + i) % len(backends)]
            try:
                server_r, server_w = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
            except (OSError, TimeoutError):
                continue
            await asyncio.gather(_pipe(client_r, server_w), _pipe(server_r, client_w))
            return
        client_w.close()

    host, _, port = listen.rpartition(":")
    server = await asyncio.start_server(handle, host, int(port), backlog=1024)
    bound = server.sockets[0].getsockname()
    print(f"listening on {bound[0]}:{bound[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), lifetime)
    server.close()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("listen")
    p.add_argument("backends", nargs="+")
    p.add_argument("--for", dest="lifetime", type=float, default=1800.0)
    args = p.parse_args(argv)
    backends = [(b.rpartition(":")[0], int(b.rpartition(":")[2])) for b in args.backends]
    asyncio.run(serve(args.listen, backends, args.lifetime))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
