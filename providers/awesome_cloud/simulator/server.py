"""Running the AwesomeCloud simulator: embedded on a free port, or standalone.

Flow: simulator.cloud (Cloud) -> simulator.app -> **simulator.server** (a TCP port) -> client.

:class:`SimulatorServer` serves a :class:`Cloud` on ``host:port`` (port 0 = a
free one) while entered and stops it on exit; the embedded endpoint of a
manager connection is one of these on 127.0.0.1.  :func:`serve` builds a
cloud and serves it until stopped; :func:`run_simulator` is the
``refreshd simulator`` command (through ``provider.simulator_main``), which
stops on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from random import Random
from types import TracebackType
from typing import Self

from aiohttp import web

from providers.awesome_cloud.simulator.app import (
    CHURN,
    FAULTS,
    STATS,
    ChurnControl,
    Faults,
    RequestStats,
    create_app,
)
from providers.awesome_cloud.simulator.cloud import Cloud
from providers.awesome_cloud.simulator.delivery import (
    Delivery,
    deliveries_from_args,
    delivery_options,
)

log = logging.getLogger(__name__)


class SimulatorServer:
    """The simulator app listening on ``host:port`` (0 = a free port) while entered."""

    def __init__(
        self,
        cloud: Cloud,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        fault_rng: Random | None = None,
    ) -> None:
        self.cloud = cloud
        self.app = create_app(cloud, token=token, fault_rng=fault_rng)
        self._host, self._port = host, port
        self._runner: web.AppRunner | None = None
        self.url = ""
        """``http://host:port`` once started."""

    @property
    def faults(self) -> Faults:
        return self.app[FAULTS]

    @property
    def stats(self) -> RequestStats:
        return self.app[STATS]

    @property
    def churn(self) -> ChurnControl:
        return self.app[CHURN]

    async def start(self) -> None:
        if self._runner is not None:
            return
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=5.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, self._port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        port = runner.addresses[0][1]
        self.url = f"http://{self._host}:{port}"
        log.info(
            "simulator %s: serving %d vms on %s", self.cloud.name, self.cloud.count("vms"), self.url
        )

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            log.info("simulator %s: stopped", self.cloud.name)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def serve(
    host: str,
    port: int,
    *,
    vms: int,
    seed: int,
    name: str = "awesome",
    token: str | None = None,
    churn_per_second: float = 0.0,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[SimulatorServer], None] | None = None,
    deliveries: Callable[[Cloud], list[Delivery]] | None = None,
) -> None:
    """Build a cloud and serve it until ``stop`` is set (or the task is cancelled).

    With ``churn_per_second > 0`` the cloud applies that many random mutations a
    second (a live demo of the event stream); ``POST /admin/v1/churn`` changes
    the rate while it runs (0 stops it).
    """
    cloud = await asyncio.to_thread(Cloud.generate, vms=vms, seed=seed, name=name)
    stop = stop or asyncio.Event()
    async with SimulatorServer(cloud, host=host, port=port, token=token) as server:
        sending = deliveries(cloud) if deliveries else []
        server.churn.delivered = lambda: [d.stats.cursor for d in sending]
        server.churn.set(churn_per_second)
        tasks = [asyncio.create_task(d.run()) for d in sending]
        tasks.append(asyncio.create_task(churn_controlled(cloud, server.churn, seed=seed)))
        if on_ready is not None:
            on_ready(server)
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)


async def churn_forever(cloud: Cloud, *, per_second: float, seed: int) -> None:
    """Apply ``per_second`` random mutations a second to ``cloud`` until cancelled.

    Mutations are applied in small bursts (at most 20 a second of wake-ups), so
    high rates do not cost one timer each.
    """
    await churn_controlled(cloud, ChurnControl(per_second), seed=seed)


async def churn_controlled(cloud: Cloud, control: ChurnControl, *, seed: int) -> None:
    """Churn ``cloud`` at ``control.per_second`` until cancelled, following rate changes.

    At rate 0 nothing is applied until the rate changes; a change takes effect at
    once (no burst makes up for the time spent at another rate).
    """
    rng = Random(seed + 1)
    loop = asyncio.get_running_loop()
    while True:
        control.changed.clear()
        per_second = control.per_second
        if per_second <= 0:
            await control.changed.wait()
            continue
        tick = max(1.0 / per_second, 0.05)
        started, done = loop.time(), 0
        while not control.changed.is_set():
            due = int((loop.time() - started) * per_second) - done
            if due > 0:
                cloud.churn(rng, due)
                done += due
                control.mutations += due
            await asyncio.sleep(tick)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="refreshd simulator", description="Run the AwesomeCloud simulator (HTTP)."
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8700, help="TCP port (8700; 0 = a free one)")
    p.add_argument("--vms", type=int, default=1000, help="number of vms to seed (1000)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the cloud (1)")
    p.add_argument("--name", default="awesome", help="cloud name, the events' source")
    p.add_argument("--token", default=None, help="bearer token the read API requires (none)")
    p.add_argument(
        "--churn-per-second",
        type=float,
        default=0.0,
        help="random mutations per second, for a live demo (0 = none)",
    )
    delivery_options(p)
    return p


def run_simulator(argv: Sequence[str]) -> int:
    """``refreshd simulator ...``: serve until SIGINT/SIGTERM; returns the exit code."""
    args = _parser().parse_args(list(argv))

    def ready(server: SimulatorServer) -> None:
        print(
            f"AwesomeCloud simulator {args.name!r}: {server.cloud.count('vms')} vms "
            f"on {server.url}",
            flush=True,
        )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(
            args.host,
            args.port,
            vms=args.vms,
            seed=args.seed,
            name=args.name,
            token=args.token,
            churn_per_second=args.churn_per_second,
            stop=stop,
            on_ready=ready,
            deliveries=lambda cloud: deliveries_from_args(cloud, args),
        )

    try:
        asyncio.run(main())
    except OSError as exc:
        print(f"refreshd simulator: {exc}", flush=True)
        return 1
    return 0
