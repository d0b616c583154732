"""What an adaptive attack optimises through: the cell's purifier chain and training prompts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple

from benchbase.components import Context, Prompts

if TYPE_CHECKING:
    import torch


class ThreatView(NamedTuple):
    """The threat of a cell as an attack sees it.

    ``purify``: the differentiable view of the cell's purifier chain (real gradients where a
    purifier is differentiable, straight-through/BPDA otherwise), or None when the attack is not
    adaptive or the chain is empty. ``prompts``: the prompts the victim will train with (a
    defense may change them, e.g. CDL's noise token), else the cell's prompts. Unpacks as
    ``purify, prompts = threat_view(ctx)``.
    """

    purify: Callable[["torch.Tensor"], "torch.Tensor"] | None
    prompts: Prompts

    @property
    def adaptive(self) -> bool:
        """True when there is a purifier chain to optimise through."""
        return self.purify is not None

    def __call__(self, x: "torch.Tensor") -> "torch.Tensor":
        """``purify(x)``, or ``x`` itself when there is nothing to purify."""
        return x if self.purify is None else self.purify(x)


def threat_view(ctx: Context) -> ThreatView:
    """The :class:`ThreatView` of ``ctx.threat`` (no purifier and the cell's prompts when the
    suite does not mark the attack ``adaptive``)."""
    threat = ctx.threat
    if threat is None:
        return ThreatView(None, ctx.prompts)
    purify = (lambda x: threat.purify_differentiable(x, ctx)) if threat.purifiers else None
    return ThreatView(purify, threat.training_prompts or ctx.prompts)
