"""Diagnostics the toolkit's loops collect and a stage records in ``ctx.info``: why an attack
fails in a world is often visible in its objective over the optimisation (a surrogate's PGD loss
that falls instead of rising), and whether a victim learnt the identity in its final training
loss on the instance images.

- :class:`ObjectiveTrace` — an attack's objective per PGD step or per outer iteration;
  ``pgd(..., trace=...)`` appends each step's loss. ``record(ctx.info)`` writes ``objective``
  (what is optimised, and whether it is maximised or minimised), ``objective_trajectory`` (at
  most ``max_points`` values) and ``objective_points`` (what one value is).
- :class:`TrainingTrace` — a DreamBooth/LoRA victim's loss on its instance images (the prior and
  defense terms left out); ``dreambooth_steps(..., trace=...)`` appends each step's.
  ``record(ctx.info)`` writes ``final_instance_loss`` (the mean of the last 10 steps) and
  ``instance_loss_trajectory`` (the mean of every 10 consecutive steps).

Long trajectories are thinned to at most 100 values by averaging k consecutive values
(k = ⌈n / 100⌉), not by keeping every k-th: a single step's loss is drawn at one random timestep
and is too noisy to read alone. None of this touches the optimisation: the values are floats the
loops compute anyway.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

#: the most values a recorded trajectory holds
MAX_POINTS = 100


def thin(values: Sequence[float], max_points: int = MAX_POINTS, min_window: int = 1) -> tuple[list[float], int]:
    """``values`` as at most ``max_points`` means of ``k`` consecutive values (the last mean over
    what remains), ``k = max(min_window, ⌈n / max_points⌉)``; returns (means, k)."""
    n = len(values)
    k = max(1, min_window, math.ceil(n / max_points)) if n else max(1, min_window)
    if k == 1:
        return [float(v) for v in values], 1
    return [sum(values[i:i + k]) / len(values[i:i + k]) for i in range(0, n, k)], k


class ObjectiveTrace:
    """An attack's objective over its optimisation, one value per ``per`` (``"PGD step"``, or an
    outer iteration of a method that alternates PGD with training).

    ``objective`` names the quantity (e.g. ``"surrogate denoising loss L_DM"``) and ``maximize``
    its direction. Fill it with :meth:`add` / :meth:`extend` (``pgd(..., trace=self)`` appends
    each step's loss), or :meth:`extend_mean` for a batch attacked in chunks; then
    :meth:`record` it into ``ctx.info``.
    """

    def __init__(self, objective: str, maximize: bool, per: str = "PGD step", max_points: int = MAX_POINTS):
        self.objective, self.maximize, self.per, self.max_points = objective, maximize, per, max_points
        self.values: list[float] = []

    def __len__(self) -> int:
        return len(self.values)

    def add(self, value: float) -> None:
        self.values.append(float(value))

    def extend(self, values: Iterable[float]) -> None:
        self.values.extend(float(v) for v in values)

    def extend_mean(self, runs: Sequence[Sequence[float]], weights: Sequence[float] | None = None) -> None:
        """Append the (weighted) mean over ``runs`` step by step: one PGD run per chunk of a batch,
        each of the same length (weights: e.g. the chunks' image counts)."""
        runs = [r for r in runs if len(r)]
        if not runs:
            return
        w = list(weights) if weights is not None else [1.0] * len(runs)
        total = sum(w[:len(runs)])
        for step in zip(*runs):
            self.add(sum(v * wi for v, wi in zip(step, w)) / total)

    def record(self, info: dict) -> None:
        """Write ``objective``, ``objective_trajectory`` and ``objective_points`` into ``info``."""
        points, k = thin(self.values, self.max_points)
        info["objective"] = f"{self.objective} ({'maximised' if self.maximize else 'minimised'})"
        info["objective_trajectory"] = points
        info["objective_points"] = (f"one per {self.per}" if k == 1
                                    else f"mean of {k} consecutive values, one per {self.per} ({len(self.values)} in all)")


class TrainingTrace:
    """A victim's loss on its instance images at every training step (``dreambooth_steps(...,
    trace=self)`` fills it): the denoising MSE of the instance half of each batch, without the
    prior-preservation term or a defense's extra loss, so it says how well the victim fits the
    (protected) images themselves."""

    def __init__(self, window: int = 10, max_points: int = MAX_POINTS):
        self.window, self.max_points = window, max_points
        self.instance: list[float] = []

    def __len__(self) -> int:
        return len(self.instance)

    def add(self, instance_loss: float) -> None:
        self.instance.append(float(instance_loss))

    def record(self, info: dict) -> None:
        """Write ``final_instance_loss`` (mean of the last ``window`` steps; None without steps),
        ``instance_loss_trajectory`` (means of ``window`` consecutive steps, widened so that at most
        ``max_points`` remain) and ``instance_loss_every`` (the steps per value)."""
        last = self.instance[-self.window:]
        info["final_instance_loss"] = sum(last) / len(last) if last else None
        points, k = thin(self.instance, self.max_points, min_window=self.window)
        info["instance_loss_trajectory"] = points
        info["instance_loss_every"] = k
