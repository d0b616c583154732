"""The component families: one table that the plugin registry, the hooks, suites, cells,
records and ``benchbase ls`` all read (nothing heavy is imported here)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str  # plural: the suite key, the `benchbase ls` kind, the hook register_<name>
    base: str  # its base class in benchbase.components
    cell_key: str | None = None  # its key in a cell (cell selectors, records, leaderboard rows)
    in_grid: bool = False  # the suite lists several: one grid axis (or, for metrics, one record each)


TABLE = (
    Family("attacks", "Attack", "attack", True),
    Family("purifiers", "Purifier", "purifier", True),
    Family("defenses", "Defense", "defense", True),
    Family("personalizers", "Personalizer", "personalizer", True),
    Family("metrics", "Metric", None, True),
    Family("backends", "Backend"),
    Family("datasets", "Dataset"),
    Family("executors", "Executor"),
)

FAMILIES = tuple(f.name for f in TABLE)
GRID_FAMILIES = tuple(f.name for f in TABLE if f.in_grid)  # the suite's lists
CELL_KEYS = {f.cell_key: f.name for f in TABLE if f.cell_key}  # {"attack": "attacks", ...}
