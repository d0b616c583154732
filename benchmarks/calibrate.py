"""How close ``benchbase estimate`` is to what the stages really take: one stage of each kind run
end to end, its recorded time beside the cost model's figure for the same stage.

    python benchmarks/calibrate.py                       # the mini world, one torch thread
    python benchmarks/calibrate.py --json benchmarks/results/calibrate_mini_cpu.json
    python benchmarks/calibrate.py --world tiny          # the random-weight tiny backend
    python benchmarks/calibrate.py --only aspl,dreambooth --repeats 3
    python benchmarks/calibrate.py --from A.json --from B.json --costs my.toml   # re-price, no run
    python benchmarks/calibrate.py --from A.json --markdown                      # README table

A suite on the ``mini`` backend at its real size (the shipped trained world, one identity, the
local executor) holds every bundled component the world can run, each at its default precision
(ASPL, SimAC and MetaCloak in their release precisions: bf16 weights, MetaCloak's PGD in fp16;
ASPL with an fp32 surrogate as the mini suites run it), with the outer loops cut short where the
released settings would take hours (each row says what it ran: the cost model counts operations
per iteration, so a few iterations price every later one). ``--repeats N`` runs it under N
seeds: every stage N times with new keys, the shared class images once (computed by the first
stage that needs them, so each later stage is timed alone), and the minimum of the N is kept.
A second suite runs the personalizers on the clean images into the same store.

Measured = ``seconds`` of the stage's ``_done.json`` (its own wall time, the shared stages it
asked for excluded) and the process CPU time of the same stage (``cpu s``: with one torch
thread the stage's compute, which other jobs on the machine stretch far less than its wall
time); estimated = ``benchbase.estimate`` on the same suites (``Estimate.by_key``). The
1-minute load average is sampled every 2 s and the sample nearest the stage's end is reported
beside it. Nothing here asserts a time: it prints, per component and precision, estimate (s),
measured (s) and measured / estimate (wall, then CPU), and the released settings' per-identity
figures of the surrogate attacks; ``--json PATH`` keeps the rows and every measured stage.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# DreamBooth and the attacks share these: one class-image stage, computed once for all
CLASS = {"num_class_images": 16, "class_inference_steps": 25}
DB = {"train_batch_size": 2, "learning_rate": 3e-4, **CLASS}  # the mini suites' recipe
# a suite needs a personalizer; the attack/purifier suite's metric never reaches it
BASE = {"name": "dreambooth", "label": "hold", "max_train_steps": 0, "num_images_per_prompt": 1,
        "num_inference_steps": 2, **CLASS}

# the backend and dataset of a calibration: the world at its real size, one identity
WORLDS = {"mini": ({"name": "mini"}, {"name": "mini", "identities": 1}),
          "tiny": ({"name": "tiny", "resolution": 64}, {"name": "sample", "identities": ["astronaut"]})}

# (label, spec, what the row ran): attacks at their defaults except the outer loop
ATTACKS = [
    ("aspl-release-bf16", {"name": "aspl", **CLASS, "max_train_steps": 3},
     "released settings (bf16 weights), 3 of 50 outer iterations"),
    ("aspl-fp32", {"name": "aspl", "precision": "fp32", **CLASS, "max_train_steps": 3},
     "fp32 surrogate (the mini suites'), 3 of 50 outer iterations"),
    ("simac-release-bf16", {"name": "simac", **CLASS, "max_train_steps": 2, "select_max_steps": 2},
     "bf16, 2 of 50 outer iterations, 2 of 23 selection rounds"),
    ("metacloak-release", {"name": "metacloak", **CLASS, "pool_train_steps": 4, "pool_interval": 2,
                           "advance_steps": 1, "total_trial_num": 1, "defense_pgd_step_num": 2},
     "bf16 training, fp16 PGD; pool of 4 steps saved every 2 (3 states), 1 trial, 2 PGD steps per round"),
    ("fsmg", {"name": "fsmg", **CLASS, "surrogate_train_steps": 8, "max_adv_train_steps": 10},
     "fp32 surrogate of 8 steps (shared stage), 10 PGD steps"),
    ("caat", {"name": "caat", "max_train_steps": 10}, "10 of 250 iterations"),
    ("advdm", {"name": "advdm", "steps": 10}, "10 PGD steps"),
    ("mist", {"name": "mist", "steps": 10}, "fused, 10 PGD steps"),
    ("sds", {"name": "sds", "steps": 10}, "10 PGD steps"),
    ("photoguard", {"name": "photoguard", "steps": 20}, "encoder, 20 PGD steps"),
]
PURIFIERS = [
    ("realign", {"name": "realign", "restorer": "none", "model": "WORLD"}, "mini-full's chain (no face restorer)"),
    ("diffpure", {"name": "diffpure"}, "defaults"),
    ("sr", {"name": "sr", "model": "WORLD"}, "defaults"),
    ("noisy-upscale", {"name": "noisy-upscale", "model": "WORLD"}, "defaults"),
]
PERSONALIZERS = [
    ("dreambooth", {"name": "dreambooth", **DB, "max_train_steps": 20, "num_images_per_prompt": 4,
                    "num_inference_steps": 25}, "the mini recipe, 20 of 150 steps; 4 images per prompt, 25 steps"),
    ("lora", {"name": "lora", "max_train_steps": 20, **CLASS, "num_images_per_prompt": 4, "num_inference_steps": 25},
     "20 steps; 4 images per prompt, 25 steps"),
]


def calibration_suites(only: set | None, seeds: list[int], world: str = "mini"):
    """Two suites sharing one store: the attacks and purifiers (a metric reading the purified images
    visits protect and purify only), then the personalizers on the clean images (a metric reading
    the generations). ``(suites, {label: what the row ran})``."""
    from benchbase.suite import parse_suite

    pick = lambda rows: [(lab, {**{k: world if v == "WORLD" else v for k, v in spec.items()}, "label": lab}, what)
                         for lab, spec, what in rows if not only or lab in only or spec["name"] in only]
    backend, dataset = WORLDS[world]
    attacks, purifiers, personalizers = pick(ATTACKS), pick(PURIFIERS), pick(PERSONALIZERS)
    common = {"seeds": list(seeds), "device": "cpu", "dtype": "float32", "executor": {"name": "local"},
              "backend": backend, "dataset": dataset, "defenses": ["none"]}
    suites = []
    if attacks or purifiers:
        cells = [{"attack": lab, "purifier": "none"} for lab, _, _ in attacks]
        cells += [{"attack": "none", "purifier": lab} for lab, _, _ in purifiers]
        suites.append(parse_suite({
            **common, "name": "calibrate-protect", "attacks": ["none", *(s for _, s, _ in attacks)],
            "purifiers": ["none", *(s for _, s, _ in purifiers)], "personalizers": [BASE], "cells": cells,
            "metrics": [{"name": "psnr", "of": "purified"}]}))
    if personalizers:
        suites.append(parse_suite({
            **common, "name": "calibrate-personalize", "attacks": ["none"], "purifiers": ["none"],
            "personalizers": [s for _, s, _ in personalizers], "metrics": ["ref-rmse"]}))
    what = {lab: w for lab, _, w in attacks + purifiers + personalizers}
    return suites, what


class LoadSampler(threading.Thread):
    """(time, 1-minute load average) every ``every`` seconds while the run goes."""

    def __init__(self, every: float = 2.0):
        super().__init__(daemon=True)
        self.every, self.samples, self.stop = every, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.samples.append((time.time(), os.getloadavg()[0]))
            self.stop.wait(self.every)

    def at(self, t: float | None) -> float | None:
        if t is None or not self.samples:
            return None
        return min(self.samples, key=lambda s: abs(s[0] - t))[1]


class CpuClock:
    """Own CPU seconds of every stage this process computes (``Store._run`` wrapped; the stages
    computed inside it subtracted, as the store does for ``seconds``). With one torch thread this
    is the stage's compute however many other processes share the cores; wall time is not."""

    def __init__(self):
        from benchbase.store import Store

        self.seconds: dict[str, float] = {}
        self._stack: list[float] = []
        run = Store._run

        def timed(store, stage, key, parts, fn, tmp):
            self._stack.append(0.0)
            start = time.process_time()
            try:
                return run(store, stage, key, parts, fn, tmp)
            finally:
                total = time.process_time() - start
                self.seconds[key] = total - self._stack.pop()
                if self._stack:
                    self._stack[-1] += total

        Store._run = timed


def compare(suites, measured: list[dict], what: dict, device: str | None, costs: Path | None):
    """One row per (stage, component): the cost model's figure for one such stage beside the
    fastest of its measured runs (wall, and CPU). ``measured``: one dict per stage run."""
    from benchbase.estimate import estimate

    by_key, shared, dev = {}, {}, None
    for suite in suites:  # planned from scratch: the shared class images priced in the first suite that has them
        est = estimate(suite, device=device, costs_file=costs)
        dev = est.device
        by_key.update({k: v for k, v in est.by_key.items() if k not in by_key})
        for (stage, _), (_, sec) in est.by_label.items():
            if stage not in ("protect", "purify", "personalize", "generate", "score", "clean"):
                shared.setdefault(stage, sec)
    rows: dict = {}
    for m in measured:
        stage = m["stage"]
        if m["key"] in by_key:
            _, label, figure = by_key[m["key"]]
        elif stage in shared:
            label, figure = "shared", shared[stage]
        else:
            continue
        if stage in ("clean", "score") or label == "none":
            continue  # PNG copies and psnr / ref-rmse: nothing the cost model prices
        row = rows.setdefault((stage, label), {"stage": stage, "component": label, "ran": what.get(label, ""),
                                               "estimate_s": figure, "runs": []})
        row["runs"].append(m)
    out = []
    for row in rows.values():
        runs = row.pop("runs")
        best = min(runs, key=lambda m: m["seconds"])
        cpus = [m["cpu_s"] for m in runs if m.get("cpu_s") is not None]
        e = row["estimate_s"]
        row.update(estimate_s=round(e, 3), measured_s=round(best["seconds"], 3), load=best.get("load"),
                   ratio=round(best["seconds"] / e, 2) if e else None,
                   cpu_s=round(min(cpus), 3) if cpus else None,
                   cpu_ratio=round(min(cpus) / e, 2) if e and cpus else None,
                   all_s=[round(m["seconds"], 2) for m in runs], all_load=[m.get("load") for m in runs])
        out.append(row)
    order = {s: i for i, s in enumerate(("protect", "fsmg_surrogate", "class_images", "purify", "personalize",
                                         "generate"))}
    return dev, sorted(out, key=lambda r: (order.get(r["stage"], 9), r["component"]))


def released(device: str | None, costs: Path | None, world: str = "mini") -> dict:
    """The surrogate attacks at their released settings on the mini world (the rows above cut
    their outer loops; the cost model prices the full loops from the same per-op figures):
    seconds of one identity's protect stage, class images excluded."""
    from benchbase.estimate import estimate
    from benchbase.suite import parse_suite

    specs = [("aspl-release-bf16", {"name": "aspl"}), ("aspl-fp32", {"name": "aspl", "precision": "fp32"}),
             ("simac-release-bf16", {"name": "simac"}), ("metacloak-release", {"name": "metacloak"})]
    suite = parse_suite({
        "name": "released", "device": "cpu", "dtype": "float32", "backend": WORLDS[world][0],
        "dataset": WORLDS[world][1], "attacks": [{**s, **CLASS, "label": lab} for lab, s in specs],
        "purifiers": ["none"], "defenses": ["none"], "personalizers": [BASE], "metrics": [{"name": "psnr"}]})
    est = estimate(suite, device=device, costs_file=costs)
    return {label: round(sec / n, 1) for (stage, label), (n, sec) in est.by_label.items() if stage == "protect"}


def measure(suites, work: Path) -> tuple[list[dict], list[str], float]:
    """Run the suites into one store; every computed stage's own wall and CPU seconds, and the load."""
    from benchbase.pipeline import Runner
    from benchbase.store import read_stage_metas

    clock, sampler = CpuClock(), LoadSampler()
    sampler.start()
    start, failed = time.time(), []
    for suite in suites:
        summary = Runner(suite, work / suite.name, store_dir=work / "store", progress=False).run()
        failed += [str(f) for f in summary.failed or ()]
    wall = time.time() - start
    sampler.stop.set()
    measured = [{"stage": stage, "key": key, "seconds": meta.seconds, "cpu_s": clock.seconds.get(key),
                 "load": sampler.at(meta.finished), "finished": meta.finished}
                for stage, metas in read_stage_metas(work / "store").items() for key, meta in metas.items()
                if meta.seconds is not None]
    return measured, failed, wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", choices=sorted(WORLDS), default="mini", help="backend at its real size (mini: trained)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the cost tables' setting)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of every stage (seeds); the fastest is kept")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="seeds first-seed.. (another run's stages get new keys: merge runs with --from A --from B)")
    ap.add_argument("--only", default="", help="comma list of component labels or names (default: all)")
    ap.add_argument("--costs", type=Path, help="a cost table merged over benchbase/costs.toml")
    ap.add_argument("--device", default=None, help="device table to compare with (default: the backend's)")
    ap.add_argument("--work", type=Path, help="run folder (default: a temporary one, removed)")
    ap.add_argument("--json", type=Path, help="write the rows, the measured stages and the conditions here")
    ap.add_argument("--markdown", action="store_true", help="print the rows as a benchmarks/README.md table")
    ap.add_argument("--from", dest="source", type=Path, action="append",
                    help="price the stages measured in this --json file again (another table: --costs) without "
                         "running; repeat to merge runs (the fastest of all is kept)")
    args = ap.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    only = {s.strip() for s in args.only.split(",") if s.strip()} or None
    if args.source:
        olds = [json.loads(path.read_text()) for path in args.source]
        measured = [m for old in olds for m in old["measured"]]
        metas = [old["meta"] for old in olds]
        seeds = sorted({s for m in metas for s in m.get("seeds", range(m["repeats"]))})
        meta = {**metas[0], "date": ", ".join(m["date"] for m in metas), "repeats": len(seeds),
                "wall_s": sum(m["wall_s"] for m in metas), "failed": [f for m in metas for f in m["failed"]]}
        suites, what = calibration_suites(only, seeds, metas[0].get("world", "mini"))
    else:
        seeds = list(range(args.first_seed, args.first_seed + args.repeats))
        suites, what = calibration_suites(only, seeds, args.world)
        with tempfile.TemporaryDirectory() as tmp:
            measured, failed, wall = measure(suites, args.work or Path(tmp))
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), "") if Path("/proc/cpuinfo").exists() else platform.processor()
        meta = {"cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(), "repeats": args.repeats, "seeds": seeds, "world": args.world,
                "only": sorted(only) if only else None, "wall_s": round(wall, 1), "failed": failed,
                "command": "python benchmarks/calibrate.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    device, rows = compare(suites, measured, what, args.device, args.costs)
    print(f"# measured {meta['date']}: {meta['cpu']}, torch {meta['torch']} ({meta['cpu_capability']}), "
          f"{meta['threads']} thread(s), {meta['repeats']} run(s) per stage (fastest kept), {meta['wall_s']:.0f} s; "
          f"priced with table {device}" + (f" + {args.costs}" if args.costs else ""))
    if meta["failed"]:
        print(f"# failed cells: {meta['failed']}")
    print(f"{'stage':<15}{'component':<20}{'estimate s':>11}{'measured s':>11}{'ratio':>7}{'load':>6}"
          f"{'cpu s':>9}{'ratio':>7}  ran")
    num = lambda v, w, f=".2f": f"{'-':>{w}}" if v is None else f"{v:>{w}{f}}"
    for r in rows:
        print(f"{r['stage']:<15}{r['component']:<20}{num(r['estimate_s'], 11)}{num(r['measured_s'], 11)}"
              f"{num(r['ratio'], 7)}{num(r['load'], 6, '.1f')}{num(r['cpu_s'], 9)}{num(r['cpu_ratio'], 7)}  {r['ran']}")
    if args.markdown:
        print("\n| stage | component | ran | estimate (s) | measured wall (s) | load | measured CPU (s) | CPU / estimate |")
        print("|---|---|---|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['stage']} | {r['component']} | {r['ran']} | {r['estimate_s']:.2f} | {r['measured_s']:.2f} | "
                  f"{r['load']:.1f} | {num(r['cpu_s'], 0)} | {num(r['cpu_ratio'], 0)} |")
    full = released(args.device, args.costs, meta.get("world", "mini"))
    print("released settings, one identity's protect stage (estimate): "
          + ", ".join(f"{lab} {sec:.0f} s ({sec / 60:.1f} min)" for lab, sec in full.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": {**meta, "device": device, "costs": str(args.costs or "")},
                                         "rows": rows, "released": full, "measured": measured}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
