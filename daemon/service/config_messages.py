"""Validation messages of the config: one line per error, naming the file and the key.

Flow: config / preflight -> pydantic ValidationError -> **config messages** -> operator
(``refreshd.toml: managers[0].page_size: Input should be greater than or equal to 1``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any, get_args

from pydantic import BaseModel, ValidationError


def format_validation_error(
    source: str,
    exc: ValidationError,
    prefix: str = "",
    *,
    model: type[BaseModel] | None = None,
    also_known: Iterable[str] = (),
) -> str:
    """One line per error: ``FILE: key.path: message``; an unknown key gets the closest
    known one of ``model`` at that place (plus ``also_known``) as a suggestion."""
    lines = []
    for err in exc.errors():
        loc = prefix
        for part in err["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        message = err["msg"]
        if err["type"] == "extra_forbidden" and model is not None and err["loc"]:
            known = [*_known_keys(model, err["loc"][:-1]), *also_known]
            close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1, cutoff=0.6)
            if close:
                message += f" (did you mean {close[0]!r}?)"
        lines.append(f"{source}: {loc or '(top level)'}: {message}")
    return "\n".join(lines)


def _known_keys(model: type[BaseModel], path: Sequence[int | str]) -> list[str]:
    """The field names of the model found at ``path`` inside ``model``."""
    current: type[BaseModel] | None = model
    for part in path:
        if isinstance(part, int) or current is None:
            continue
        field = current.model_fields.get(part)
        current = _model_in(field.annotation) if field is not None else None
    return list(current.model_fields) if current is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
