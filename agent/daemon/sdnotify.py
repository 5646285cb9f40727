"""systemd's notify protocol (sd_notify(3)) without a library: one datagram to $NOTIFY_SOCKET."""

from __future__ import annotations

import contextlib
import socket


class Notifier:
    """Sends READY=1, WATCHDOG=1, STATUS=... when started by systemd; does nothing otherwise."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        if address and address.startswith("@"):
            self.address = "\0" + address[1:]  # abstract namespace

    def notify(self, **fields: str) -> None:
        if not self.address:
            return
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items()).encode()
        with (
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as s,
            # Never block the daemon: a receiver that does not read (or is gone at shutdown) loses the message.
            contextlib.suppress(OSError),
        ):
            s.sendto(message, self.address)
