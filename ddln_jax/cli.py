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
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
