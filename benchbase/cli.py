"""The ``benchbase`` command. Thin: heavy modules (torch, diffusers) are imported inside
the commands that need them, so ``benchbase --help`` and ``benchbase plugins`` stay fast."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from benchbase.errors import BenchbaseError, ConfigError
from benchbase.families import FAMILIES

KINDS = (*FAMILIES, "models", "suites")


class CLI(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BenchbaseError as exc:  # a user-facing problem: one clear line each, no traceback
            for line in str(exc).splitlines() or [type(exc).__name__]:
                click.echo(f"error: {line}", err=True)
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
    benchbase verify RUN_DIR       re-hash the stored files; mark damaged stages for recomputation
    benchbase transfer RUN_DIR...  transfer matrix of runs, one per victim model (--out DIR)
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


def _option_value(text: str):
    """An executor option's value: TOML (3, 0.5, true, [1, 2], "x") or else the plain string."""
    from benchbase.suite import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def executor_for(suite, name: str | None, options: tuple[str, ...], echo=click.echo):
    """The executor a run uses: ``--executor`` (else the suite's ``executor`` table, else
    ``local``) with the suite's settings for it and ``--executor-option KEY=VALUE`` on top.
    An executor only the suite prefers falls back to ``local`` when it cannot run here."""
    from benchbase.plugins import get_plugin_manager

    chosen = suite.executor if suite.executor and name in (None, suite.executor.name) else None
    name = name or (chosen.name if chosen else "local")
    params = dict(chosen.params) if chosen else {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--executor-option {option!r}: expected KEY=VALUE")
        params[key.strip()] = _option_value(value.strip())
    pm = get_plugin_manager()
    reason = pm.get("executors", name).load().unavailable()
    if reason:
        if chosen is not None and not options and name == suite.executor.name:
            # the suite only prefers it (e.g. the mini suite, Ray for two workers on two cores): the
            # same grid runs in-process, slower, with the same results
            echo(f"note: the suite prefers the {name} executor, but {reason}; running in-process", err=True)
            return pm.create("executors", "local", {})
        raise ConfigError(f"executor {name!r} cannot run here: {reason}")
    return pm.create("executors", name, params)


@main.command()
@click.argument("suite", required=False)
@click.option("--run-dir", type=click.Path(path_type=Path), help="Where results go (default: runs/<suite name>).")
@click.option("--store", type=click.Path(path_type=Path), help="Artifact store to share between runs (default: RUN_DIR/store).")
@click.option("--device", help="Override the suite's device (auto, cpu, cuda, cuda:1).")
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: on a terminal).")
@click.option("--executor", "executor_name", default=None,
              help="Where stages run (`benchbase ls executors`; default: the suite's `executor` table, else "
                   "local, in-process).")
@click.option("-x", "--executor-option", "executor_options", multiple=True, metavar="KEY=VALUE",
              help="A parameter of the executor, over the suite's (repeatable; e.g. -x address=auto -x "
                   "max_retries=5 for ray; values are TOML: numbers, true, [lists], or plain strings).")
def run(suite: str | None, run_dir: Path | None, store: Path | None, device: str | None, progress: bool | None,
        executor_name: str | None, executor_options: tuple[str, ...]):
    """Run SUITE (a TOML file or a built-in suite name; default: the mini suite).

    Every stage is cached: running the same command again resumes an interrupted run and
    recomputes nothing that finished (with any executor).
    """
    from benchbase.suite import load_suite

    spec = load_suite(suite)
    run_dir = run_dir or _default_run_dir(spec.name)
    executor = executor_for(spec, executor_name, executor_options)
    from benchbase import leaderboard
    from benchbase.pipeline import Runner

    click.echo(f"suite {spec.name} ({spec.source}, hash {spec.hash}): {spec.n_cells} cells per identity -> {run_dir}"
               + (f" [executor {executor.name}]" if executor.name != "local" else ""))
    runner = None
    try:
        runner = Runner(spec, run_dir, store_dir=store, progress=progress, device=device, executor=executor,
                        echo=lambda line: click.echo(line, err=True))
        summary = runner.run()
    except KeyboardInterrupt:  # Ctrl-C: one line, and how to resume
        n = len(runner.records) if runner is not None else 0
        click.echo(f"interrupted: {n} records in {run_dir / 'results.jsonl'}; run the same command again to "
                   "resume (finished stages are kept)", err=True)
        sys.exit(130)
    failed, unavailable = summary.failed, summary.unavailable
    click.echo(f"done in {summary.seconds:.1f} s; stages executed {summary.executed or 'none'}, "
               f"cached {summary.cached or 'none'}; {len(summary.records)} records, {len(failed)} failed, "
               f"{len(unavailable)} unavailable")
    for rec in failed[:5]:
        click.echo(f"  failed: {rec['identity']} {rec['attack']}/{rec['purifier']}/{rec['defense']}/"
                   f"{rec['personalizer']} {rec['metric']}: {rec['error']}", err=True)
    for reason, n in _by_reason(unavailable)[:5]:  # absent models are not errors, but say which
        click.echo(f"  unavailable ({n} records): {reason}")
    if summary.records:
        md, _ = leaderboard.write(run_dir)
        click.echo(f"leaderboard: {md}")
    if failed:  # everything is written; a script or CI job tells a half-failed run from a clean one
        stages = ", ".join(f"{stage} {n}" for stage, n in _by_reason(failed, stage_only=True))
        click.echo(f"error: {len(failed)} of {len(summary.records)} records failed ({stages}); see "
                   f"{run_dir / 'results.jsonl'}", err=True)
        sys.exit(EXIT_FAILED)


#: ``benchbase run``'s exit status when the run finished but some records are ``failed`` (every
#: record ok, empty or unavailable: 0; bad input, nothing run: 2; Ctrl-C: 130)
EXIT_FAILED = 1


def _by_reason(records: list[dict], stage_only: bool = False) -> list[tuple[str, int]]:
    """(error, count) most frequent first; ``stage_only``: the stage that failed, the word before
    "failed:" / "unavailable:" in the error ("dataset" for an identity that did not load)."""
    counts: dict[str, int] = {}
    for rec in records:
        text = str(rec.get("error") or "?")
        key = text.split(":", 1)[0].split(" ", 1)[0] if stage_only else text
        counts[key] = counts.get(key, 0) + 1
    return sorted(counts.items(), key=lambda kv: -kv[1])


@main.command()
@click.argument("suite", required=False)
@click.option("--device", "device_name", help="Device table of the cost model (default: the one measured for the "
                                                "suite's backend; `--list-devices` names them).")
@click.option("--costs", type=click.Path(path_type=Path, dir_okay=False),
              help="A cost table merged over the built-in one (your device's benchmarks/step_costs.py output).")
@click.option("--identities", type=click.IntRange(1), help="Plan N stand-in identities instead of reading the "
                                                            "dataset (a dataset you do not have here).")
@click.option("--images", type=click.IntRange(1), help="Images per set with --identities (default 4, the "
                                                        "Anti-DreamBooth sets).")
@click.option("--store", type=click.Path(path_type=Path, file_okay=False),
              help="Leave out stages already in this store (what is left of a run).")
@click.option("--top", default=12, show_default=True, type=click.IntRange(0), help="Largest parts listed.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--list-devices", is_flag=True, help="List the cost table's devices and stop.")
def estimate(suite: str | None, device_name: str | None, costs: Path | None, identities: int | None,
             images: int | None, store: Path | None, top: int, as_json: bool, list_devices: bool):
    """Estimate what running SUITE costs: unique stages of each kind after sharing, and the time
    per stage kind and in total on a device, from measured per-step costs (benchbase/costs.toml)."""
    from benchbase import estimate as cost_model

    if list_devices:
        for name, table in cost_model.load_costs(costs).get("devices", {}).items():
            click.echo(f"{name}\t{', '.join(table.get('backends', []))}\t{table.get('description', '')}")
        return
    from benchbase.suite import load_suite

    spec = load_suite(suite)
    est = cost_model.estimate(spec, device=device_name, costs_file=costs, identities=identities, store=store,
                              images=images)
    click.echo(json.dumps(est.to_json(), indent=1) if as_json else cost_model.render(est, top=top))


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
def status(run_dir: Path):
    """Show the progress of a run (also while it is running)."""
    from benchbase.records import RESULTS, read_records_and_rows, read_run_info, resolve_store
    from benchbase.store import stage_counts

    info = read_run_info(run_dir, required=True)
    click.echo(f"suite {info.suite} (hash {info.suite_hash}), status {info.status}, device {info.device}")
    click.echo(f"model: {info.backend.description}" + (" (RANDOM weights)" if info.backend.random_weights else ""))
    # the rows alone (no Record objects): a run of 100,000 records is counted in seconds
    rows = read_records_and_rows(run_dir, records=False)[1] if (run_dir / RESULTS).is_file() else []
    by_status: dict[str, int] = {}
    for r in rows:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    click.echo("records: " + (", ".join(f"{n} {s}" for s, n in sorted(by_status.items())) or "none yet"))
    done = stage_counts(resolve_store(run_dir, None, info))
    if done:
        click.echo("stages in store: " + ", ".join(f"{k} {v}" for k, v in done.items()))
    if info.executor.stages:
        click.echo(f"executor {info.executor.name}: " + ", ".join(f"{k} {v}" for k, v in info.executor.stages.items()))
    if info.seconds is not None:
        click.echo(f"last run: {info.seconds} s, executed {info.executed}, cached {info.cached}")


@main.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--dry-run", is_flag=True, help="Report only: mark nothing for recomputation.")
def verify_cmd(path: Path, dry_run: bool):
    """Re-hash the stored files of a run folder's store (or of a STORE) against the SHA-256 each
    stage recorded; mark every damaged stage, and everything computed from it, so the next
    `benchbase run` recomputes them. Exit 1 when a stage is damaged (missing or changed files)."""
    from benchbase import verify

    result = verify.verify(path, apply=not dry_run)
    for line in verify.render(result):
        click.echo(line, err=line.startswith("damaged:"))
    if not result.ok:
        sys.exit(EXIT_FAILED)


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


@main.command("transfer")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder of the matrix.")
@click.option("--quiet", is_flag=True, help="Do not print the markdown.")
def transfer_cmd(run_dirs: tuple[Path, ...], out: Path, quiet: bool):
    """Transfer matrix of several runs, one per victim backend (protected on A, fine-tuned on B)."""
    from benchbase import variants

    md, text = variants.write_transfer(list(run_dirs), out)
    if not quiet:
        click.echo(text)
    click.echo(f"written: {md}")


@main.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--out", type=click.Path(path_type=Path), help="Output folder (default: RUN_DIR/report).")
@click.option("--store", type=click.Path(path_type=Path), help="The artifact store the run used (default: RUN_DIR/store).")
@click.option("--thumb-size", default=128, show_default=True, type=click.IntRange(16, 1024), help="Thumbnail side in px.")
@click.option("--max-samples", default=8, show_default=True, type=click.IntRange(1), help="Generated images shown per prompt.")
@click.option("--max-cells", default=200, show_default=True, type=click.IntRange(1),
              help="Cells with image grids (a larger grid gets a note: tens of thousands of thumbnails take minutes).")
@click.option("--serve", "serve_", is_flag=True, help="Then serve it on http://127.0.0.1:PORT until Ctrl-C.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port for --serve (0: any free one).")
def report_cmd(run_dir: Path, out: Path | None, store: Path | None, thumb_size: int, max_samples: int,
               max_cells: int, serve_: bool, port: int):
    """Write a static HTML report of a run (tables, image grids, plots) that opens from disk."""
    from benchbase import report

    index = report.write(run_dir, out, store=store, thumb_size=thumb_size, max_samples=max_samples,
                         max_cells=max_cells)
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
