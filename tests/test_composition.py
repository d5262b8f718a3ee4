"""The composition root: what ``run``, ``refresh``, tests and benches build from a config."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from daemon.model.acks import Ack
from daemon.model.targets import Target, TargetCollection
from daemon.persistence.persister import Persister
from daemon.persistence.settings import PersisterSettings
from daemon.service.composition import NotStarted, assemble, batching_of
from daemon.service.config import ConfigError, parse_config
from tests.cloud_state import database_state

EMBEDDED = {"provider": "awesome_cloud", "endpoint": "embedded", "embedded_vms": 5}


def config(tmp_path: Path, **extra: object) -> dict[str, object]:
    return {
        "database_url": f"sqlite:///{tmp_path / 'r.db'}",
        "managers": [{"name": "a", **EMBEDDED}, {"name": "b", **EMBEDDED}],
        **extra,
    }


async def test_assembled_parts_refresh_and_a_started_pipeline_commits(tmp_path: Path) -> None:
    loaded = parse_config(config(tmp_path, persister={"max_delete_ratio": 0.9}))
    async with assemble(loaded) as parts:
        assert set(parts.managers) == {"a", "b"} and set(parts.manager_ids) == {"a", "b"}
        assert parts.revision is not None
        result = await parts.refresher.refresh(TargetCollection("a", [Target.full("a")]))
        assert result.rows_written > 0
        pipeline = await parts.pipeline()
        async with pipeline.running() as batcher:
            ack = Ack(received_at=0.0)
            batcher.submit([Target.full("b")], ack)
            await asyncio.wait_for(ack.wait(), 30)
        assert len((await database_state(parts.engine, "b"))["vms"]) == 5
    assert parts.engine.pool.checkedout() == 0


async def test_only_the_managers_asked_for_are_connected_and_a_given_engine_is_kept(
    tmp_path: Path,
) -> None:
    loaded = parse_config(config(tmp_path))
    built: list[Persister] = []

    def persister(engine: AsyncEngine) -> Persister:
        built.append(Persister(engine, settings=PersisterSettings(max_delete_ratio=1.0)))
        return built[-1]

    async with assemble(loaded, managers={"b"}, persister=persister) as parts:
        assert set(parts.managers) == {"b"} and parts.persister is built[0]
        engine = parts.engine
    async with assemble(loaded, engine=engine) as again:  # not disposed: still usable
        assert again.engine is engine
        await again.refresher.refresh(TargetCollection("a", [Target.full("a")]))
    await engine.dispose()


async def test_not_ready_builds_nothing(tmp_path: Path) -> None:
    async def never(_engine: AsyncEngine) -> bool:
        return False

    with pytest.raises(NotStarted):
        async with assemble(parse_config(config(tmp_path)), ready=never):
            pass
    assert not (tmp_path / "r.db").exists() or (tmp_path / "r.db").stat().st_size == 0


async def test_an_unusable_config_is_refused_before_anything_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REFRESHD_DATABASE_URL", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    loaded = parse_config(config(tmp_path) | {"database_url": {"credential": "database-url"}})
    with pytest.raises(ConfigError, match="database_url"):
        async with assemble(loaded):
            pass


def test_batching_layers_and_a_manager_without_targeted_refresh(tmp_path: Path) -> None:
    cfg = config(tmp_path, batching={"workers": 7, "debounce": 0.2})
    cfg["managers"] = [
        {"name": "a", **EMBEDDED, "batching": {"debounce": 0.5}},
        {"name": "b", **EMBEDDED, "allow_targeted_refresh": False},
    ]
    base, overrides = batching_of(parse_config(cfg).config)
    assert base.workers == 7 and base.debounce == 0.2
    assert overrides["a"].debounce == 0.5 and overrides["a"].targeted_refresh
    assert overrides["b"].debounce == 0.2 and not overrides["b"].targeted_refresh
