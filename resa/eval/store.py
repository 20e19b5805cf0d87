"""Resumable result files: one JSON per run, rewritten atomically after every finished cell.

A run is identified by its task and its settings. Restarting with the same settings reloads the
file and skips finished cells, so a killed run loses at most the cell in progress. A file whose
settings differ is not reused (it is renamed aside), so cells of different runs never mix.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any


def versions() -> dict[str, str]:
    """Versions of the software that produced a result."""
    import numpy
    import torch

    from .. import __version__

    return {"resa": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "cpu_threads": str(torch.get_num_threads())}


class RunStore:
    """`out/<name>.json` = {"task", "settings", "meta", "cells": {key: result}, "timings"}."""

    def __init__(self, out: Path, name: str, task: str, settings: dict[str, Any],
                 meta: dict[str, Any]) -> None:
        self.path = Path(out) / f"{name}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {"task": task, "settings": settings, "meta": meta, "cells": {},
                                     "timings": {"started": time.time(), "cell_seconds": {}}}
        if self.path.exists():
            old = json.loads(self.path.read_text(encoding="utf-8"))
            if old.get("settings") == settings and old.get("task") == task:
                self.data["cells"] = old.get("cells", {})
                self.data["timings"] = old.get("timings", self.data["timings"])
            else:
                self.path.rename(self.path.with_suffix(f".stale-{int(time.time())}.json"))
        self.data["meta"] = meta

    def done(self, key: str) -> bool:
        return key in self.data["cells"]

    def get(self, key: str) -> Any:
        return self.data["cells"][key]

    def cells(self) -> dict[str, Any]:
        return self.data["cells"]

    def put(self, key: str, result: Any, seconds: float) -> None:
        """Record one finished cell and write the file (atomic rename: never half-written)."""
        self.data["cells"][key] = result
        self.data["timings"]["cell_seconds"][key] = round(seconds, 3)
        self.flush()

    def finish(self, summary: Any) -> None:
        self.data["summary"] = summary
        self.data["timings"]["finished"] = time.time()
        self.data["timings"]["total_cell_seconds"] = round(sum(self.data["timings"]["cell_seconds"].values()), 1)
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=False), encoding="utf-8")
        os.replace(tmp, self.path)
