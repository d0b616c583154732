"""The in-process executor: the runner's own loop, cells in suite order."""

from __future__ import annotations

from benchbase.components import Executor


class LocalExecutor(Executor):
    """Evaluates each cell's scores in this process, computing upstream stages on demand
    (``Runner.run``). Stages run one after another on the suite's device."""

    def run(self, runner):
        return runner.run()
