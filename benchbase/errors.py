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


class BudgetError(BenchbaseError):
    """A stage's images are not finite, or a protection breaks its budget after quantisation
    (a plugin bug the core refuses to record as ok)."""


class Unavailable(BenchbaseError):
    """A stage cannot run here because something it needs is absent: a model, its weights, an
    optional package. Any component raises it, message first "unavailable: <what> — how to provide
    it"; the run records every cell that needs the stage as ``unavailable`` with that reason (not
    ``failed``: nothing went wrong), the exit status stays 0, and nothing is cached, so the next run
    computes the stage once it is provided. Something present but broken (a truncated weight file, a
    config that does not match) is a failure, not this."""


class WeightsUnavailableError(Unavailable):
    """Model weights are not available locally (and the hub is offline or unreachable)."""


class DiskError(BenchbaseError):
    """The store or the run folder cannot be written (no space left, read-only, quota)."""


class RunInProgressError(BenchbaseError):
    """Another live process is running the same run folder."""


def validation_problems(errors, known=None) -> list[str]:
    """One line per problem of a pydantic ``ValidationError`` (or its ``errors()`` list):
    ``where: message (got value)``.

    The suite schema and every component's ``Params`` report through this, so a bad value
    reads the same wherever it is (``eps: Input should be a finite number (got nan)``).
    ``known``: the valid keys (a list, or a function of the parent location), to suggest the
    closest to an unknown one."""
    import difflib

    def place(loc) -> str:
        where = ""
        for part in loc:
            where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
        return where

    lines = []
    for err in (errors.errors() if hasattr(errors, "errors") else errors):
        loc, kind, msg = tuple(err["loc"]), err["type"], err["msg"]
        if kind == "value_error" and msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if kind in ("extra_forbidden", "missing"):
            parent, name = place(loc[:-1]), str(loc[-1]) if loc else "?"
            if kind == "missing":
                lines.append(f"{parent}: needs `{name}`" if parent else f"{name}: required (no default)")
                continue
            keys = known(loc[:-1]) if callable(known) else known
            close = difflib.get_close_matches(name, list(keys or []), n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(close)}?)" if close else (f"; known: {', '.join(keys)}" if keys else "")
            lines.append(f"{parent}: unknown key {name!r}{hint}" if parent else f"{name}: unknown parameter{hint}")
            continue
        if not loc:  # a check across fields: its message says what is wrong
            lines.append(msg)
            continue
        shown = f" (got {err['input']!r})" if "input" in err else ""
        lines.append(f"{place(loc)}: {msg}{shown}")
    return lines
