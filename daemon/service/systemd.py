"""systemd integration: the sd_notify protocol (READY, STATUS, WATCHDOG, STOPPING).

Flow: lifecycle -> **notifier** -> systemd (Type=notify unit, deploy/refreshd.service).

When ``NOTIFY_SOCKET`` is unset (not under systemd) every call is a no-op.
The watchdog interval is half of ``WATCHDOG_USEC`` as systemd recommends; the
lifecycle only pings while the pipeline makes progress, so a wedged daemon
is restarted by systemd.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages; constructing it does no I/O."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address: str | None = None
        if address:
            # abstract namespace sockets are written with a leading '@'
            self._address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        enabled = usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.watchdog_interval: float | None = int(usec) / 2e6 if enabled else None
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *fields: str) -> None:
        if self._address is None:
            return
        message = "\n".join(fields).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            self._sock.sendto(message, self._address)
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self._address, exc)

    def ready(self, status: str = "") -> None:
        self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
