"""The resolved configuration saved next to every result (``config.json``)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from ser_ray.common import storage


def to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def save_config(
    out_dir: str | os.PathLike, config: dict[str, Any], name: str = "config.json"
) -> str:
    """Write the resolved configuration of a run next to its results, in the run location
    (a local folder or a URI: :mod:`ser_ray.common.storage`); returns the file's location."""
    text = json.dumps(to_jsonable(config), indent=2, sort_keys=True)
    return storage.write_text(storage.join(out_dir, name), text)
