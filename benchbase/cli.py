"""The ``benchbase`` command. Thin: heavy modules (torch, diffusers) are imported inside
the commands that need them, so ``benchbase --help`` and ``benchbase plugins`` stay fast."""

from __future__ import annotations

import importlib.util

import json
import sys
from pathlib import Path

import click

from benchbase.errors import BenchbaseError

KINDS = ("attacks", "purifiers", "defenses", "personalizers", "metrics", "backends", "datasets", "executors",
         "models", "suites")


class CLI(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BenchbaseError as exc:  # a user-facing problem: one clear line, no traceback
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=CLI, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="benchbase")
def main():
    """benchbase: benchmark protective perturbations, purifiers and defenses for personalized
    diffusion models on one protocol.

    \b
    benchbase run                  run the built-in mini suite (trained mini world, CPU, < 10 min)
    benchbase run SUITE.toml       run a suite file (or a built-in suite by name)
    benchbase leaderboard RUN_DIR  write markdown + CSV tables
    benchbase report RUN_DIR       write an HTML report (tables, image grids, plots)
    benchbase ls attacks           list component names of a family (`ls models`: models by role)

    Plugins may add commands (e.g. a world's training command): listed below.
    """


@main.command()
@click.option("--all", "show_all", is_flag=True, help="Also list every component of every plugin.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(show_all: bool, as_json: bool):
    """List installed plugins, their versions and any that failed to load."""
    from benchbase.plugins import FAMILIES, get_plugin_manager

    pm = get_plugin_manager()
    components = {f: pm.entries(f) for f in FAMILIES}
    models = [e for entries in pm.models().values() for e in entries.values()]
    if as_json:
        out = {
            "plugins": [vars(p) for p in pm.plugins.values()],
            "failures": [vars(p) for p in pm.failures],
            "components": {f: [{"name": e.name, "version": e.version, "plugin": e.plugin,
                                "description": e.description} for e in entries.values()]
                           for f, entries in components.items()},
            "models": [{"role": e.role, "name": e.name, "plugin": e.plugin, "description": e.description,
                        "default": e.default, "any_name": e.any_name} for e in models],
        }
        click.echo(json.dumps(out, indent=1))
        return
    for info in sorted(pm.plugins.values(), key=lambda p: p.name):
        counts = {f: sum(1 for e in components[f].values() if e.plugin == info.name) for f in FAMILIES}
        counts["models"] = sum(1 for e in models if e.plugin == info.name)
        what = ", ".join(f"{n} {f}" for f, n in counts.items() if n) or "nothing registered"
        dist = f"{info.distribution} {info.version}" if info.distribution else info.source
        click.echo(f"{info.name:<16} {dist:<24} {what}")
        if show_all:
            for f in FAMILIES:
                for e in components[f].values():
                    if e.plugin == info.name:
                        click.echo(f"    {f[:-1]:<12} {e.name:<16} v{e.version:<4} {e.description}")
            for e in models:
                if e.plugin == info.name:
                    click.echo(f"    {'model':<12} {e.name:<16} {'':<5} {e.role}: {e.description}")
    for info in pm.failures:
        click.echo(f"{info.name:<16} FAILED TO LOAD: {info.error}")


@main.command()
@click.argument("kind", type=click.Choice(KINDS))
@click.option("-l", "--long", "long_", is_flag=True, help="Show version, plugin and description.")
def ls(kind: str, long_: bool):
    """List the component names of KIND, one per line (models: ROLE<TAB>NAME, the role's
    default marked with *, a registration that also takes folders/hub ids with +)."""
    if kind == "suites":
        from benchbase.suite import builtin_suites

        for name in sorted(builtin_suites()):
            click.echo(name)
        return
    from benchbase.plugins import get_plugin_manager

    if kind == "models":
        for role, entries in get_plugin_manager().models().items():
            for entry in sorted(entries.values(), key=lambda e: (not e.default, e.name)):
                mark = ("*" if entry.default else "") + ("+" if entry.any_name else "")
                click.echo(f"{role}\t{entry.name}{mark}" + (f"\t{entry.plugin}\t{entry.description}" if long_ else ""))
        return

    for entry in get_plugin_manager().entries(kind).values():
        click.echo(f"{entry.name}\tv{entry.version}\t{entry.plugin}\t{entry.description}" if long_ else entry.name)


def _default_run_dir(name: str) -> Path:
    return Path("runs") / name


@main.command()
@click.argument("suite", required=False)
@click.option("--run-dir", type=click.Path(path_type=Path), help="Where results go (default: runs/<suite name>).")
@click.option("--store", type=click.Path(path_type=Path), help="Artifact store to share between runs (default: RUN_DIR/store).")
@click.option("--device", help="Override the suite's device (auto, cpu, cuda, cuda:1).")
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: on a terminal).")
@click.option("--executor", "executor_name", default=None,
              help="Where stages run: local (in-process, the default) or ray (one Ray task per stage; see "
                   "`benchbase ls executors`). Overrides the suite's `executor` table.")
@click.option("--address", help="Ray cluster to join (auto, or ray://HOST:10001); default: start a local Ray instance.")
def run(suite: str | None, run_dir: Path | None, store: Path | None, device: str | None, progress: bool | None,
        executor_name: str | None, address: str | None):
    """Run SUITE (a TOML file or a built-in suite name; default: the mini suite).

    Every stage is cached: running the same command again resumes an interrupted run and
    recomputes nothing that finished (with any executor).
    """
    from benchbase.errors import ConfigError
    from benchbase.plugins import get_plugin_manager
    from benchbase.suite import load_suite

    spec = load_suite(suite)
    run_dir = run_dir or _default_run_dir(spec.name)
    pm = get_plugin_manager()
    # the suite may name an executor with settings (retries, GPUs per task...); --executor overrides it
    chosen = spec.executor if spec.executor and executor_name in (None, spec.executor.name) else None
    executor_name = executor_name or (chosen.name if chosen else "local")
    params = dict(chosen.params) if chosen else {}
    if chosen and executor_name == "ray" and importlib.util.find_spec("ray") is None:
        # the suite only prefers Ray (e.g. the mini suite, for two workers on two cores): without it
        # the same grid runs in-process, slower, with the same results
        click.echo("note: the suite prefers the ray executor, but Ray is not installed "
                   "(pip install 'benchbase[ray]'); running in-process", err=True)
        executor_name, params = "local", {}
    if address is not None:
        if executor_name != "ray":
            raise ConfigError("--address is an option of --executor ray")
        params["address"] = address
    executor = pm.create("executors", executor_name, params)
    from benchbase import leaderboard
    from benchbase.pipeline import Runner

    click.echo(f"suite {spec.name} ({spec.source}, hash {spec.hash}): {spec.n_cells} cells per identity -> {run_dir}"
               + (f" [executor {executor_name}]" if executor_name != "local" else ""))
    # a distributed executor's driver only plans and assembles: the suite's device need not exist here
    runner = Runner(spec, run_dir, store_dir=store, progress=progress, device=device,
                    driver=executor_name != "local")
    summary = executor.run(runner)
    failed = summary.failed
    click.echo(f"done in {summary.seconds:.1f} s; stages executed {summary.executed or 'none'}, "
               f"cached {summary.cached or 'none'}; {len(summary.records)} records, {len(failed)} failed")
    for rec in failed[:5]:
        click.echo(f"  failed: {rec['identity']} {rec['attack']}/{rec['purifier']}/{rec['defense']}/"
                   f"{rec['personalizer']} {rec['metric']}: {rec['error']}", err=True)
    if summary.records:
        md, _ = leaderboard.write(run_dir)
        click.echo(f"leaderboard: {md}")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
def status(run_dir: Path):
    """Show the progress of a run (also while it is running)."""
    from benchbase.store import RESULTS, RUN_JSON, DONE

    info_path = run_dir / RUN_JSON
    if not info_path.is_file():
        raise BenchbaseError(f"{run_dir} is not a benchbase run folder (no {RUN_JSON})")
    info = json.loads(info_path.read_text())
    click.echo(f"suite {info['suite']} (hash {info['suite_hash']}), status {info['status']}, device {info['device']}")
    click.echo(f"model: {info['backend']['description']}")
    records = []
    if (run_dir / RESULTS).is_file():
        records = [json.loads(line) for line in (run_dir / RESULTS).read_text().splitlines() if line.strip()]
    by_status: dict[str, int] = {}
    for r in records:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    click.echo("records: " + (", ".join(f"{n} {s}" for s, n in sorted(by_status.items())) or "none yet"))
    store = run_dir / "store"
    if store.is_dir():
        done = {d.name: sum(1 for _ in d.glob(f"*/*/{DONE}")) for d in sorted(store.iterdir()) if d.is_dir()}
        click.echo("stages in store: " + ", ".join(f"{k} {v}" for k, v in done.items() if v))
    if "seconds" in info:
        click.echo(f"last run: {info['seconds']} s, executed {info.get('executed')}, cached {info.get('cached')}")


@main.command("leaderboard")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Output folder (default: RUN_DIR/leaderboard).")
@click.option("--quiet", is_flag=True, help="Do not print the markdown.")
def leaderboard_cmd(run_dir: Path, out: Path | None, quiet: bool):
    """Write leaderboard tables (markdown + CSV) of a run."""
    from benchbase import leaderboard

    md, text = leaderboard.write(run_dir, out)
    if not quiet:
        click.echo(text)
    click.echo(f"written: {md}")


@main.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--out", type=click.Path(path_type=Path), help="Output folder (default: RUN_DIR/report).")
@click.option("--store", type=click.Path(path_type=Path), help="The artifact store the run used (default: RUN_DIR/store).")
@click.option("--thumb-size", default=128, show_default=True, type=click.IntRange(16, 1024), help="Thumbnail side in px.")
@click.option("--max-samples", default=8, show_default=True, type=click.IntRange(1), help="Generated images shown per prompt.")
@click.option("--serve", "serve_", is_flag=True, help="Then serve it on http://127.0.0.1:PORT until Ctrl-C.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port for --serve (0: any free one).")
def report_cmd(run_dir: Path, out: Path | None, store: Path | None, thumb_size: int, max_samples: int,
               serve_: bool, port: int):
    """Write a static HTML report of a run (tables, image grids, plots) that opens from disk."""
    from benchbase import report

    index = report.write(run_dir, out, store=store, thumb_size=thumb_size, max_samples=max_samples)
    click.echo(f"report: {index}")
    if serve_:
        report.serve(index, run_dir, port=port, store=store, echo=click.echo)


def _add_plugin_commands() -> None:
    """Commands that plugins add through ``register_commands(cli)`` (e.g. a world's training
    command); a broken plugin leaves the core commands working (``benchbase plugins`` says why)."""
    from benchbase.plugins import get_plugin_manager

    try:
        get_plugin_manager().register_commands(main)
    except BenchbaseError as exc:  # e.g. two plugins registering one name: the core commands still work
        click.echo(f"warning: plugin commands not loaded: {exc}", err=True)


_add_plugin_commands()

if __name__ == "__main__":
    main()
