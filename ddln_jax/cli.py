"""The `ddln` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _x64():
    import jax

    # The command line is a shipped path: float64 throughout (DESIGN.md).
    jax.config.update("jax_enable_x64", True)


def demo(args) -> int:
    _x64()
    import jax
    import jax.numpy as jnp

    import ddln_jax as dj

    from ._plot import plot_trajectories

    kx, ku = jax.random.split(jax.random.PRNGKey(args.seed))
    n, d, L = 20, 40, args.depth
    X = jax.random.normal(kx, (n, d))
    theta_star = jnp.zeros(d).at[:4].set(jnp.array([1.5, -1.0, 2.0, -0.5]))
    loss = dj.LeastSquares(X, X @ theta_star)
    u0 = dj.gaussian_init(ku, L, d, args.alpha)
    ts = jnp.linspace(0.0, args.t1, 201)
    runs = {
        f: dj.simulate(loss, u0, t1=args.t1, ts=ts, formulation=f, rtol=1e-10, atol=1e-12)
        for f in ("layer", "mirror")
    }
    a, b = runs["layer"].theta, runs["mirror"].theta
    err = float(jnp.max(jnp.linalg.norm(a - b, axis=1) / jnp.linalg.norm(a, axis=1)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_trajectories(
        {f"{k} flow": v for k, v in runs.items()}, out,
        title=f"least squares n={n}, d={d}, L={L}, α={args.alpha}",
    )
    print(f"layer flow ({int(runs['layer'].num_steps)} steps) vs mirror flow "
          f"({int(runs['mirror'].num_steps)} steps): max relative θ difference {err:.2e}")
    print(f"final loss {float(runs['layer'].loss_final):.3e}; figure written to {out}")
    return 0 if err < 1e-7 else 1


def sweep_cmd(args) -> int:
    import time

    if args.distributed:
        import jax

        jax.distributed.initialize()
    _x64()
    from . import _spec
    from ._plot import plot_sweep
    from ._sweep import summary, sweep

    if args.smoke:
        if args.spec is not None:
            raise _spec.SpecError("--smoke runs the reduced default spec: give no SPEC with it")
        spec = _spec.SweepSpec.from_dict(_spec.tomllib.loads(_spec.SMOKE_SPEC), source="<smoke spec>")
        name = "smoke"
    elif args.spec is None:
        spec = _spec.SweepSpec.from_dict(_spec.tomllib.loads(_spec.DEFAULT_SPEC), source="<default spec>")
        name = "default"
    else:
        spec = _spec.SweepSpec.load(args.spec)
        name = Path(args.spec).stem
    overrides = {}
    if args.lanes is not None:
        overrides["lanes"] = args.lanes
    if args.devices is not None:
        overrides["devices"] = args.devices
    if overrides:
        import dataclasses

        spec = dataclasses.replace(spec, engine=dataclasses.replace(spec.engine, **overrides))
    out = Path(args.out) if args.out else Path("ddln_results") / name
    start = time.perf_counter()
    ds = sweep(spec, out, progress=not args.quiet)
    elapsed = time.perf_counter() - start
    figures = plot_sweep(ds, out)
    print(summary(ds))
    print(f"{elapsed:.1f} s; results in {out / 'results.nc'}; figures: "
          + ", ".join(str(p) for p in figures))
    return 0


def plot_cmd(args) -> int:
    from ._plot import plot_sweep
    from ._results import open_results
    from ._sweep import summary

    ds = open_results(args.dir)
    figures = plot_sweep(ds, args.out or args.dir)
    print(summary(ds))
    print("figures: " + ", ".join(str(p) for p in figures))
    return 0


def spec_cmd(args) -> int:
    from ._spec import DEFAULT_SPEC

    print(DEFAULT_SPEC, end="")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ddln", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="simulate the layer and mirror flows of one network",
                       description="Simulate one network with the layer and the mirror flow, "
                       "print how far apart they are, and draw a figure.")
    p.add_argument("--depth", type=int, default=3, help="depth L (default 3)")
    p.add_argument("--alpha", type=float, default=0.5, help="init scale α (default 0.5)")
    p.add_argument("--t1", type=float, default=30.0, help="horizon (default 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="ddln_demo.png", help="figure path (default ddln_demo.png)")
    p.set_defaults(func=demo)

    p = sub.add_parser(
        "sweep", help="run a sweep of inits × depths × problems (the main job)",
        description="Run a sweep described by a TOML spec (or the embedded default spec), "
        "write the dataset chunk by chunk to --out (rerun to resume), draw the figures and "
        "print a summary. `ddln spec` prints the default spec as a starting point.",
    )
    p.add_argument("spec", nargs="?", help="TOML spec (default: the embedded default spec)")
    p.add_argument("--out", help="results directory (default ddln_results/<spec name>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--smoke", action="store_true",
                   help="run the default sweep at a reduced size (a quick check)")
    p.add_argument("--lanes", type=int, help="lanes per device (overrides [engine] lanes)")
    p.add_argument("--devices", type=int, help="number of devices (overrides [engine] devices)")
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (multi-host runs)")
    p.set_defaults(func=sweep_cmd)

    p = sub.add_parser("plot", help="redraw the figures of a results directory",
                       description="Redraw the figures and the summary of a finished sweep.")
    p.add_argument("dir", help="results directory of `ddln sweep`")
    p.add_argument("--out", help="where to write the figures (default: DIR)")
    p.set_defaults(func=plot_cmd)

    p = sub.add_parser("spec", help="print the default sweep spec",
                       description="Print the embedded default spec (TOML) to start your own.")
    p.set_defaults(func=spec_cmd)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:
        from ._spec import SpecError

        if isinstance(e, SpecError) or "output directory" in str(e):
            print(f"ddln: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
