"""A catcher's settings from its ``[[catchers]]`` block, with errors that name the key.

Flow: ``[[catchers]]`` options -> **settings_from** -> the transport's settings model
(ValueError in the daemon's words: ``format_validation_error``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from daemon.api import format_validation_error

M = TypeVar("M", bound=BaseModel)


def settings_from(
    model: type[M], options: Mapping[str, Any], what: str, *, skip: Collection[str] = ()
) -> M:
    """``model`` validated from ``options`` without the keys in ``skip`` (the routing
    options); ValueError ``"<what>: key: message"`` per error when they are not valid."""
    try:
        return model.model_validate({k: v for k, v in options.items() if k not in skip})
    except ValidationError as exc:
        raise ValueError(format_validation_error(what, exc, model=model)) from None
