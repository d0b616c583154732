"""Projected gradient descent in the benchmark's image convention: sign step, L∞ projection,
[0, 1] clamp, optional random start, expectation over transformations (EOT).

Everything is in [0, 1] pixel space with budgets in 8-bit levels (``eps_levels = 8`` is
8/255). Methods written in [-1, 1] (Anti-DreamBooth: eps 0.05, step 0.005) map exactly: a
sign step scales both the step and the ball by 1/2, so the iterates are the same images
(eps 0.05 in [-1, 1] is 6.375 levels, step 0.005 is 0.6375 levels).

Every bundled attack that runs PGD uses these functions; a third-party attack writes its loss
and calls :func:`pgd` (see docs/toolkit.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from benchbase.toolkit.trace import ObjectiveTrace

Transform = Callable[[torch.Tensor], torch.Tensor]


def project(x: torch.Tensor, x0: torch.Tensor, eps: float) -> torch.Tensor:
    """Π(x) = clamp(x0 + clamp(x - x0, -eps, eps), 0, 1), eps in [0, 1] units."""
    return (x0 + (x - x0).clamp(-eps, eps)).clamp(0, 1)


def random_start(x0: torch.Tensor, eps: float, generator: torch.Generator) -> torch.Tensor:
    """x0 + U(-eps, eps), drawn on the CPU from ``generator`` (AdvDM / Mist / PhotoGuard start);
    eps in [0, 1] units."""
    noise = (torch.rand(x0.shape, generator=generator) * 2 - 1) * eps
    return (x0 + noise.to(x0.device, x0.dtype)).clamp(0, 1)


def sign_step(x: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor, alpha: float, eps: float,
              maximize: bool = True) -> torch.Tensor:
    """One PGD update ``x ± alpha·sign(grad)`` (ascent when ``maximize``) followed by the
    projection; alpha and eps in [0, 1] units."""
    step = alpha * grad.sign()
    return project(x.detach() + (step if maximize else -step), x0, eps)


def eot_grad(x: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor],
             transform: Transform | None = None, samples: int = 1) -> tuple[torch.Tensor, float]:
    """Gradient of E_T[loss(T(x))] w.r.t. x, averaged over ``samples`` draws of ``transform``
    (each draw may be random: blur/flip for MetaCloak, a purifier chain for adaptive attacks).
    Returns (gradient, mean loss)."""
    x = x.detach().requires_grad_(True)
    total = 0.0
    grad = torch.zeros_like(x)
    for _ in range(max(1, samples)):
        loss = loss_fn(transform(x) if transform is not None else x)
        grad = grad + torch.autograd.grad(loss, x)[0]
        total += float(loss.detach())
    n = max(1, samples)
    return grad / n, total / n


def pgd(
    x0: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    eps_levels: float,
    alpha_levels: float | Callable[[int], float],
    steps: int,
    generator: torch.Generator | None = None,
    start: torch.Tensor | None = None,
    use_random_start: bool = False,
    maximize: bool = True,
    transform: Transform | None = None,
    eot_samples: int = 1,
    progress: Callable | None = None,
    trace: ObjectiveTrace | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Projected sign-gradient ascent (or descent) of ``loss_fn`` inside the L∞ ball of radius
    ``eps_levels``/255 around ``x0``.

    ``loss_fn`` maps a batch in [0, 1] to a scalar. ``alpha_levels`` may be a function of the
    step index (PhotoGuard's decaying step). ``start`` continues from an existing perturbed batch
    (ASPL's outer loop); ``use_random_start`` starts from x0 + U(-eps, eps) drawn from
    ``generator``. ``transform`` and ``eot_samples``: the gradient of E_T[loss(T(x))]
    (see :func:`eot_grad`). ``progress`` wraps the step range (``ctx.progress``). ``trace``: an
    :class:`~benchbase.toolkit.trace.ObjectiveTrace` that gets each step's loss (then
    ``trace.record(ctx.info)``). Returns the perturbed batch (float, not yet quantised: the core
    quantises it to 8 bits within the budget) and the loss at each step (before that step's update).
    """
    eps = eps_levels / 255.0
    x = start.detach().clone() if start is not None else x0.detach().clone()
    if use_random_start:
        if generator is None:
            raise ValueError("random start needs a generator")
        x = random_start(x0, eps, generator)
    losses = []
    it = range(steps)
    for i in (progress(it, desc="pgd", leave=False) if progress else it):
        grad, loss = eot_grad(x, loss_fn, transform, eot_samples)
        alpha = (alpha_levels(i) if callable(alpha_levels) else alpha_levels) / 255.0
        x = sign_step(x, x0, grad, alpha, eps, maximize)
        losses.append(loss)
        if trace is not None:
            trace.add(loss)
    return x.detach(), losses
