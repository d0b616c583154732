"""The in-process executor: the plan's stages one after another, in dependency order."""

from __future__ import annotations

from benchbase.components import Executor


class LocalExecutor(Executor):
    """Computes every planned stage in this process on the suite's device, in the plan's order
    (cell by cell, each stage after the stages it reads)."""

    def execute(self, session) -> None:
        outcomes = {}
        for node in session.plan().nodes.values():
            outcome = session.run_stage(node.address, [outcomes[d] for d in node.deps])
            outcomes[node.key] = outcome
            session.stage_done(outcome)
