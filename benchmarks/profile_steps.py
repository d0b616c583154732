"""Where the time of one ASPL outer iteration and of one DreamBooth step goes (issue 17 item 1).

    python benchmarks/profile_steps.py --backend mini            # the mini world, 64 px, CPU
    python benchmarks/profile_steps.py --backend tiny
    python benchmarks/profile_steps.py --backend mini --torch-profile 15   # + torch.profiler's top ops
    python benchmarks/profile_steps.py --backend mini --code /tmp/bb-before  # another checkout's code

``--code DIR`` imports ``benchbase`` and its bundled plugins from the checkout ``DIR`` instead
of the installed one (the same venv otherwise): a before/after comparison of two commits
(``git worktree add --detach /tmp/bb-before <commit>``), run in alternation on an idle machine.

The loops are the bundled ones, unchanged. This script only wraps, in its own process, the
calls every step is made of and times them (CPU: synchronous; CUDA: synchronised):

- ``vae encode`` (``vae.encode`` forward), ``text encoder`` (forward), ``unet`` (forward),
- ``backward`` (``Tensor.backward`` and ``torch.autograd.grad``: the backward of whatever the
  step differentiated: UNet, text encoder, VAE encoder),
- ``optimizer`` (``AdamW.step`` and ``zero_grad``), ``state save/restore`` (``Surrogate.state``
  / ``load_state``),
- ``other``: the rest of the step's wall time (noise draws, scheduler arithmetic, dtype/device
  copies, indexing, clipping, Python).

``bare compute`` = VAE encode + text encoder + UNet + backward + optimizer: what a step cannot
avoid; ``ratio`` = wall / bare. The PGD and surrogate parts of an ASPL iteration are reported
separately (a PGD step's bare compute is VAE-encoder + UNet forward and backward; a surrogate
step's is UNet + text-encoder forward and backward + the optimizer step). ``--torch-profile N``
also prints torch.profiler's N most expensive operators of one iteration/step (self CPU time),
whose ``aten::copy_``/``to``/``clone`` rows are the data movement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

CATEGORIES = ("vae encode", "text encoder", "unet", "backward", "optimizer", "state save/restore")


class Clock:
    """Accumulates wall time per category while ``phase`` is set (None: not counted)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.phase: str | None = None
        self.acc: dict = defaultdict(lambda: defaultdict(float))
        self.depth = 0

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    @contextmanager
    def time(self, category: str):
        if self.phase is None or self.depth:  # nested (a forward inside a timed call): counted once
            yield
            return
        self.depth += 1
        self.sync()
        t = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.acc[self.phase][category] += time.perf_counter() - t
            self.depth -= 1


def instrument(clock: Clock, models) -> None:
    """Time the modules' forwards (instance-level wrappers on this bundle only)."""
    for category, module in (("unet", models.unet), ("text encoder", models.text_encoder)):
        forward = module.forward

        def wrapped(*a, _f=forward, _c=category, **k):
            with clock.time(_c):
                return _f(*a, **k)

        module.forward = wrapped
    encode = models.vae.encode

    def enc(*a, **k):
        with clock.time("vae encode"):
            return encode(*a, **k)

    models.vae.encode = enc


def patch_global(clock: Clock) -> None:
    backward, grad = torch.Tensor.backward, torch.autograd.grad

    def tensor_backward(self, *a, **k):
        with clock.time("backward"):
            return backward(self, *a, **k)

    def autograd_grad(*a, **k):
        with clock.time("backward"):
            return grad(*a, **k)

    torch.Tensor.backward = tensor_backward
    torch.autograd.grad = autograd_grad
    for cls in (torch.optim.AdamW,):
        step, zero = cls.step, cls.zero_grad

        def s(self, *a, _f=step, **k):
            with clock.time("optimizer"):
                return _f(self, *a, **k)

        def z(self, *a, _f=zero, **k):
            with clock.time("optimizer"):
                return _f(self, *a, **k)

        cls.step, cls.zero_grad = s, z
    from benchbase_plugins.attacks import _surrogate

    state, load = _surrogate.Surrogate.state, _surrogate.Surrogate.load_state

    def st(self, *a, **k):
        with clock.time("state save/restore"):
            return state(self, *a, **k)

    def ld(self, *a, **k):
        with clock.time("state save/restore"):
            return load(self, *a, **k)

    _surrogate.Surrogate.state, _surrogate.Surrogate.load_state = st, ld


def context(backend_name: str, store: Path, device: str):
    from benchbase.plugins import get_plugin_manager
    from benchbase.testing import make_context, sample_identity

    pm = get_plugin_manager()
    backend = pm.create("backends", backend_name, {})
    if backend_name == "mini":
        dataset = pm.create("datasets", "mini", {"identities": 1})
        identity = dataset.load(dataset.identities()[0], backend.resolution)
    else:
        identity = sample_identity("astronaut", backend.resolution, images_per_set=4)
    ctx = make_context(backend=backend, identity=identity, seed=0, store_dir=store, device=device)
    ctx.plugins = pm
    return ctx


def breakdown(acc: dict, wall: float, n: int) -> dict:
    """Per-category seconds per unit (n units in ``wall``), other and the bare-compute ratio."""
    out = {c: acc.get(c, 0.0) / n for c in CATEGORIES}
    out["other"] = wall / n - sum(out.values())
    out["wall"] = wall / n
    bare = sum(out[c] for c in ("vae encode", "text encoder", "unet", "backward", "optimizer"))
    out["bare compute"] = bare
    out["ratio"] = out["wall"] / bare if bare else float("nan")
    return out


def profile_aspl(args, ctx, clock: Clock, torch_profile: int) -> dict:
    """ASPL at the issue's settings (3+3 surrogate steps, 6 PGD steps, 16 class images), timing
    iterations 2..N (the first one warms up allocators)."""
    from benchbase_plugins.attacks import _surrogate
    from benchbase_plugins.attacks.aspl import ASPL

    last = args.iterations + 1  # iteration 0 warms up; the last one is torch-profiled, not timed
    params = {"max_train_steps": args.iterations + 2, "num_class_images": 16, "class_inference_steps": 25,
              "precision": args.precision}
    if args.backend == "mini":
        params["learning_rate"] = 3e-4
    attack = ASPL(**params)
    from benchbase.toolkit import class_images

    class_images(ctx, ctx.prompts.class_, 16, 25, 7.5)  # the shared stage, outside the timing
    load_models = _surrogate.load_models

    def loading(*a, **k):  # time the very models the attack loads
        models = load_models(*a, **k)
        instrument(clock, models)
        return models

    import benchbase_plugins.attacks.aspl as aspl_mod

    aspl_mod.load_models = loading
    # phases: the surrogate steps (train_steps) and the PGD steps (pgd) of each iteration
    train_steps, pgd = _surrogate.Surrogate.train_steps, aspl_mod.pgd
    walls = defaultdict(float)

    def timed_train(self, *a, **k):
        clock.sync()
        prev, clock.phase = clock.phase, "surrogate" if clock.phase else None
        t = time.perf_counter()
        try:
            return train_steps(self, *a, **k)
        finally:
            clock.sync()
            if prev:
                walls["surrogate"] += time.perf_counter() - t
            clock.phase = prev

    def timed_pgd(*a, **k):
        clock.sync()
        prev, clock.phase = clock.phase, "pgd" if clock.phase else None
        t = time.perf_counter()
        try:
            return pgd(*a, **k)
        finally:
            clock.sync()
            if prev:
                walls["pgd"] += time.perf_counter() - t
            clock.phase = prev

    _surrogate.Surrogate.train_steps = timed_train
    aspl_mod.pgd = timed_pgd
    ticks = []
    prof = None

    def progress(iterable, desc="", **_):
        nonlocal prof
        for i, item in enumerate(iterable):
            if desc == "aspl":
                clock.sync()
                ticks.append(time.perf_counter())
                clock.phase = "iteration" if 1 <= i < last else None
                if torch_profile and i == last:
                    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                    prof.__enter__()
            yield item
        if desc == "aspl":
            if prof is not None:
                prof.__exit__(None, None, None)
            clock.phase = None

    ctx.progress = progress
    attack.protect(ctx.identity.set_B.clone(), ctx)
    n = last - 1
    wall = ticks[last] - ticks[1]
    acc = clock.acc
    total = defaultdict(float)
    for phase in ("iteration", "surrogate", "pgd"):
        for c, v in acc.get(phase, {}).items():
            total[c] += v
    out = {"iteration": breakdown(total, wall, n)}
    f, a = attack.params.max_f_train_steps, attack.params.max_adv_train_steps
    out["surrogate step"] = breakdown(acc["surrogate"], walls["surrogate"], n * 2 * f)
    out["pgd step"] = breakdown(acc["pgd"], walls["pgd"], n * a)
    out["iteration"]["state save/restore"] = acc["iteration"].get("state save/restore", 0.0) / n
    if prof is not None:
        out["_table"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=torch_profile)
    return out


def profile_dreambooth(args, ctx, clock: Clock, torch_profile: int) -> dict:
    """DreamBooth, the mini suite's recipe (2 instance + 2 class images per step) or the default
    1 + 1 on tiny; steps 3..N timed."""
    from benchbase.components import Defense
    from benchbase_plugins.personalizers.dreambooth import DreamBooth

    steps = args.steps + 3  # steps 0-1 warm up; the last one is torch-profiled, not timed
    last = steps - 1
    params = {"max_train_steps": steps, "num_class_images": 16, "class_inference_steps": 25,
              "train_batch_size": 2 if args.backend == "mini" else 1, "learning_rate": 3e-4}
    db = DreamBooth(**params)
    models_fn = ctx.backend.load

    def loading(*a, **k):
        models = models_fn(*a, **k)
        instrument(clock, models)
        return models

    ctx.backend.load = loading
    ticks = []
    prof = None

    def progress(iterable, desc="", **_):
        nonlocal prof
        for i, item in enumerate(iterable):
            if desc == "dreambooth":
                clock.sync()
                ticks.append(time.perf_counter())
                clock.phase = "step" if 2 <= i < last else None
                if torch_profile and i == last:
                    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                    prof.__enter__()
            yield item
        if desc == "dreambooth":
            if prof is not None:
                prof.__exit__(None, None, None)
            clock.phase = None

    ctx.progress = progress
    with tempfile.TemporaryDirectory() as out:
        db.train(ctx.identity.set_B.clone(), ctx, Defense(), Path(out))
    n = last - 2
    out = {"step": breakdown(clock.acc["step"], ticks[last] - ticks[2], n)}
    if prof is not None:
        out["_table"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=torch_profile)
    return out


def reference(ctx, precision: str, n_images: int, latents: int, repeats: int = 5) -> dict:
    """Bare compute measured in isolation, on the same models, batch and precision (the issue's
    limits): a PGD step = VAE-encoder + UNet forward and backward of the batch to the pixels; a
    training step = UNet + text-encoder forward and backward on ``latents`` latents + one AdamW
    step (the optimizer kept: its state allocated once)."""
    from benchbase_plugins.attacks._surrogate import load_models

    models = load_models(ctx, precision)
    x = ctx.identity.set_B[:n_images].to(ctx.device)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z = models.encode_images(ctx.identity.set_B[:1].expand(latents, -1, -1, -1), generator=g)
        cond = models.encode_prompt([ctx.prompts.instance] * n_images)
    ids = models.tokenize([ctx.prompts.instance] * latents)

    def pgd_step():
        xx = x.clone().requires_grad_(True)
        torch.autograd.grad(models.diffusion_loss(models.encode_images(xx, generator=g), cond, generator=g), xx)

    params = list(models.unet.parameters()) + list(models.text_encoder.parameters())
    from benchbase.toolkit import fused_kwargs

    opt = torch.optim.AdamW(params, lr=1e-9, **fused_kwargs(params))

    def train_step():
        models.unet.requires_grad_(True)
        models.text_encoder.requires_grad_(True)
        loss = models.diffusion_loss(z, models.text_encoder(ids)[0], generator=g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = {}
    for name, fn in (("pgd step", pgd_step), ("train step", train_step)):
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times)
        models.unet.requires_grad_(False)
        models.text_encoder.requires_grad_(False)
    return out


def use_checkout(root: Path) -> None:
    """Import ``benchbase`` and ``benchbase_plugins`` from the checkout ``root`` (before any import
    of them): a meta-path finder ahead of the editable install's."""
    import importlib.util

    folders = {"benchbase": root / "benchbase", "benchbase_plugins": root / "plugins"}
    if any(name in sys.modules for name in folders):
        raise RuntimeError("--code must take effect before benchbase is imported")

    class Checkout:
        @staticmethod
        def find_spec(name, path=None, target=None):
            folder = folders.get(name)
            if folder is None:
                return None
            return importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                          submodule_search_locations=[str(folder)])

    sys.meta_path.insert(0, Checkout)


def summary(paths: list[Path]) -> int:
    """Median wall (ms) and ratios per code checkout over earlier ``--json`` runs, in the order
    the checkouts first appear, each against the first (the "before")."""
    runs: dict[str, list[dict]] = {}
    for path in paths:
        r = json.loads(path.read_text())
        runs.setdefault(r.get("code", str(path)), []).append(r)
    units = (("aspl", "iteration"), ("aspl", "surrogate step"), ("aspl", "pgd step"), ("dreambooth", "step"))
    base = None
    print(f"{'code':<28}{'unit':<26}{'runs':>5}{'wall ms':>10}{'/ timed':>9}{'/ isolated':>11}{'vs first':>10}")
    for code, rs in runs.items():
        for what, unit in units:
            rows = [r[what][unit] for r in rs if unit in r.get(what, {})]
            if not rows:
                continue
            wall = statistics.median(row["wall"] for row in rows)
            timed = statistics.median(row["ratio"] for row in rows)
            iso = [row["ratio_isolated"] for row in rows if "ratio_isolated" in row]
            base = base or {}
            first = base.setdefault((what, unit), wall)
            print(f"{code[-27:]:<28}{what + ' ' + unit:<26}{len(rows):>5}{1000 * wall:>10.1f}{timed:>9.2f}"
                  f"{statistics.median(iso) if iso else float('nan'):>11.2f}{wall / first:>10.3f}")
    loads = [r["load"] for rs in runs.values() for r in rs]
    print(f"load (1-min average at each run's start): {min(loads):.1f} to {max(loads):.1f}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["mini", "tiny"], default="mini")
    ap.add_argument("--what", choices=["aspl", "dreambooth", "both"], default="both")
    ap.add_argument("--iterations", type=int, default=4, help="ASPL outer iterations timed")
    ap.add_argument("--steps", type=int, default=20, help="DreamBooth steps timed")
    ap.add_argument("--precision", default="fp32", help="ASPL surrogate precision (fp32 as the issue's table; "
                                                         "release = pure bf16)")
    ap.add_argument("--torch-profile", type=int, default=0, metavar="N")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--code", type=Path, default=None, metavar="DIR",
                    help="import benchbase and its plugins from this checkout (before/after comparisons)")
    ap.add_argument("--summary", type=Path, nargs="+", default=None, metavar="JSON",
                    help="only print a before/after table of earlier --json files (median per --code)")
    args = ap.parse_args(argv)
    if args.summary:
        return summary(args.summary)
    if args.code is not None:
        use_checkout(args.code.resolve())
    clock = Clock(args.device.startswith("cuda"))
    patch_global(clock)
    results = {"code": str(args.code or "installed"), "backend": args.backend, "threads": torch.get_num_threads(), "load": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as store:
        ctx = context(args.backend, Path(store), args.device)
        if args.what in ("aspl", "both"):
            results["aspl"] = profile_aspl(args, ctx, clock, args.torch_profile)
            clock.acc.clear()
        if args.what in ("dreambooth", "both"):
            ctx = context(args.backend, Path(store), args.device)
            results["dreambooth"] = profile_dreambooth(args, ctx, clock, args.torch_profile)
        # the same models, batches and precision in isolation: the physical limit of each step
        precision = {"release": "bf16"}.get(args.precision, args.precision)
        ref = reference(context(args.backend, Path(store), args.device), precision, 4, 2)
        ref_db = reference(context(args.backend, Path(store), args.device), "fp32", 4,
                           4 if args.backend == "mini" else 2)
        results["isolated"] = {"pgd step": ref["pgd step"], "surrogate step": ref["train step"],
                               "dreambooth step": ref_db["train step"]}
    results["load_after"] = os.getloadavg()[0]
    cols = ("wall", *CATEGORIES, "other", "bare compute", "ratio")
    print(f"code {results['code']}, backend {args.backend}, {results['threads']} torch thread(s), "
          f"load {results['load']:.1f} -> {results['load_after']:.1f}; milliseconds per unit")
    print(f"{'':<22}" + "".join(f"{c[:12]:>13}" for c in cols))
    for what in ("aspl", "dreambooth"):
        for unit, row in results.get(what, {}).items():
            if unit.startswith("_"):
                continue
            print(f"{what + ' ' + unit:<22}" + "".join(
                f"{row[c]:>13.2f}" if c == "ratio" else f"{1000 * row[c]:>13.1f}" for c in cols))
    iso = results.get("isolated", {})
    rows = [("aspl", "surrogate step"), ("aspl", "pgd step"), ("dreambooth", "step")]
    print("\nwall / isolated bare compute (the same ops, batch and precision run alone in this process):")
    for what, unit in rows:
        key = "dreambooth step" if what == "dreambooth" else unit
        if unit in results.get(what, {}) and key in iso:
            wall = results[what][unit]["wall"]
            results[what][unit]["isolated"] = iso[key]
            results[what][unit]["ratio_isolated"] = wall / iso[key]
            print(f"  {what + ' ' + unit:<22} {1000 * wall:8.1f} ms / {1000 * iso[key]:8.1f} ms = {wall / iso[key]:.2f}")
    for what in ("aspl", "dreambooth"):
        table = results.get(what, {}).pop("_table", None)
        if table:
            print(f"\n{what}: torch.profiler, one {'iteration' if what == 'aspl' else 'step'}, top operators\n{table}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
