"""Errors that the CLI turns into one clear message instead of a traceback."""


class BenchbaseError(Exception):
    """Base class: a user-facing problem (bad input, missing weights, unknown name)."""


class PluginError(BenchbaseError):
    """A plugin could not be loaded, or two plugins register the same name."""


class UnknownComponentError(BenchbaseError):
    """A suite names a component that no plugin registers."""


class ConfigError(BenchbaseError):
    """A suite file or component parameters are invalid."""


class DataError(BenchbaseError):
    """An image or dataset folder is missing, corrupt or unusable."""


class WeightsUnavailableError(BenchbaseError):
    """Model weights are not available locally (and the hub is offline or unreachable)."""


class DiskError(BenchbaseError):
    """The store or the run folder cannot be written (no space left, read-only, quota)."""


class RunInProgressError(BenchbaseError):
    """Another live process is running the same run folder."""
