"""Executors: where a suite's stage graph runs."""

from benchbase.hookspecs import hookimpl


@hookimpl
def register_executors(register):
    register("local", "benchbase_plugins.executors.local:LocalExecutor", version="1",
             description="in-process, one stage after another (the default)")
    register("ray", "benchbase_plugins.executors.ray_executor:RayExecutor", version="1",
             description="one Ray task per stage on a local Ray instance or a cluster "
                         "(pip install 'benchbase[ray]'; the store must be on a shared filesystem)")
