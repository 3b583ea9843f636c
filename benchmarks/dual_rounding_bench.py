"""How much accuracy the dual formulation's state can carry (issue 8: `success` must mean the
requested accuracy at any α, for every formulation).

On W2 (least squares n = 10, d = 30, θ* = (1, −2, 0.5, 0, …), zero-first init; Gaussian at
L = 5), each (L, α, rtol) is run to f − f* ≤ 1e-10 (f(θ0) − f*) with the dual formulation and
compared with a tight reduced-formulation reference (rtol 1e-12). Recorded per run: the status
`simulate` reports, the conditioning κ = max_i |η_i|·g_i / ‖θ‖∞ of θ = ∇Q*(η) at the end, the
accepted steps N, the relative θ error (and the reduced formulation's at the same rtol), and the
estimate κ·(1e-3·rtol + N·eps) that, above 10·rtol, turns `success`/`event` into `inaccurate`
(`ddln_jax._solution.carries_accuracy`).

    PYTHONPATH=. python benchmarks/dual_rounding_bench.py
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import jax
import numpy as np


def main():
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import ddln_jax as dj

    rng = np.random.RandomState(0)
    X = rng.randn(10, 30)
    theta_star = np.zeros(30)
    theta_star[:3] = [1, -2, 0.5]
    loss = dj.LeastSquares(X, X @ theta_star)
    eps = float(jnp.finfo(jnp.float64).eps)
    rows = []
    for L in (3, 4, 5):
        for alpha in (3e-2, 1e-2, 3e-3, 1e-3):
            u0 = (dj.zero_first_init(L, 30, alpha) if L < 5
                  else dj.gaussian_init(jax.random.PRNGKey(0), L, 30, alpha))
            # L = 5 at small α needs far more than simulate's default step budget at rtol 1e-12.
            ref = dj.simulate(loss, u0, t1=1e14, stop_ratio=1e-10, formulation="reduced",
                              rtol=1e-12, atol=1e-14, max_steps=2_000_000)
            referenced = ref.status_name in ("event", "success")
            geom = dj.Geometry(u0)
            th = ref.theta_final
            kappa = float(jnp.max(jnp.abs(geom.grad_Q(th)) * geom.metric(th)) / jnp.max(jnp.abs(th)))
            rel = lambda a: float(jnp.max(jnp.abs(a - th)) / jnp.max(jnp.abs(th)))  # noqa: E731
            for rtol in (1e-8, 1e-10):
                run = dj.simulate(loss, u0, t1=1e14, stop_ratio=1e-10, formulation="dual",
                                  rtol=rtol, atol=1e-2 * rtol)
                red = dj.simulate(loss, u0, t1=1e14, stop_ratio=1e-10, formulation="reduced",
                                  rtol=rtol, atol=1e-2 * rtol)
                # Without a finished reference there is no error to report.
                err = rel(run.theta_final) if referenced else float("nan")
                steps = int(run.num_accepted_steps)
                row = {"L": L, "alpha": alpha, "rtol": rtol, "status": run.status_name,
                       "reference_status": ref.status_name, "kappa": kappa, "steps": steps,
                       "theta_rel_err": err, "err_over_rtol": err / rtol,
                       "reduced_status": red.status_name,
                       "reduced_err_over_rtol": (rel(red.theta_final) if referenced else float("nan")) / rtol,
                       "estimate": kappa * (1e-3 * rtol + steps * eps)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    checked = [r for r in rows if r["reference_status"] in ("event", "success")]
    ok = [r for r in checked if r["status"] in ("success", "event")]
    red_max = max(r["reduced_err_over_rtol"] for r in checked)
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "jax_backend": jax.default_backend(),
                    "load_average_at_end": os.getloadavg()},
        "runs": rows,
        "summary": {
            "runs": len(rows),
            "runs_without_reference": len(rows) - len(checked),
            "statuses": {k: sum(r["status"] == k for r in rows) for k in sorted({r["status"] for r in rows})},
            "reported_success_or_event": len(ok),
            "max_err_over_rtol_when_success": max((r["err_over_rtol"] for r in ok), default=None),
            "reduced_max_err_over_rtol": red_max,
            "max_err_over_rtol_when_inaccurate": max(
                (r["err_over_rtol"] for r in checked if r["status"] == "inaccurate"), default=None),
            "min_err_over_rtol_when_inaccurate": min(
                (r["err_over_rtol"] for r in checked if r["status"] == "inaccurate"), default=None),
        },
    }
    out = Path(__file__).parent / "results" / f"dual_rounding_{jax.default_backend()}.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
