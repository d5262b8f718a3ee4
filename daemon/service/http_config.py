"""The ``[http]`` table: where the daemon's HTTP endpoint listens and who may post to it.

Flow: config (``[http]``) -> **http config** -> lifecycle -> http endpoint (``start_site``,
bearer token).
"""

from __future__ import annotations

import ipaddress

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from daemon.service.secrets import Secret


class HttpConfig(BaseModel):
    """The ``[http]`` table: where the endpoint listens and who may post to it.

    Secure by default: a ``listen`` address that is not loopback needs a ``token``
    (``POST /refresh`` and the webhooks would accept anyone), unless
    ``allow_unauthenticated = true`` says that is meant.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    listen: str = "127.0.0.1:8080"
    token: Secret | None = None
    allow_unauthenticated: bool = False

    @model_validator(mode="after")
    def _secure_by_default(self) -> HttpConfig:
        host, _ = self.host_port
        if self.token is None and not self.allow_unauthenticated and not _loopback(host):
            raise ValueError(
                f"listen = {self.listen!r} is reachable from other hosts and no token is set:"
                " anyone could POST /refresh and send webhook events. Set [http] token"
                ' (e.g. token = { env = "REFRESHD_HTTP_TOKEN" }), listen on 127.0.0.1, or'
                " set [http] allow_unauthenticated = true if that is really meant"
            )
        return self

    @field_validator("listen")
    @classmethod
    def _host_and_port(cls, value: str) -> str:
        _, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"expected HOST:PORT with a port 1-65535, e.g. 127.0.0.1:8080; got {value!r}"
            )
        return value

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return (host or "127.0.0.1", int(port))


def _loopback(host: str) -> bool:
    """``host`` is a loopback address or ``localhost`` (another name may resolve elsewhere)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
