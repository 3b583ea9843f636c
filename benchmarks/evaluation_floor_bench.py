"""Where the toolkit's time goes on a W2 run that is not stiff: field evaluations against LSODA.

The W2 per-run target of issue 8 (the toolkit ≤ 1/5 of scipy LSODA's time) is missed in one
case, the shortest one: large problem, L = 3, α = 1e-2, zero-first. There LSODA never leaves
its Adams mode (no Jacobian is formed) and a field evaluation is two passes over X (100 × 1000,
float64), which no method makes cheaper. This benchmark measures, for given W2 cases:

- the cost of one evaluation of the reduced field inside a compiled loop (and of the bare
  product Xᵀ(Xθ) it is made of: the memory-traffic floor of one evaluation);
- explicit Runge–Kutta methods of orders 5 and 8 (`Tsit5`, `Dopri5`, `Dopri8`, each with the
  toolkit's `PredictiveController`) and the default `Auto`: time, steps and evaluations
  (attempted steps × new stages per step + 1);
- LSODA (best of `--repeats`): time, steps, evaluations, and the cost of one of its NumPy
  evaluations;
- the evaluation floor of each method: its evaluations × the cost of one evaluation, as a fraction
  of LSODA's time. No implementation of a method can go below its floor; a floor above 0.2
  means the method cannot meet the target in that case, however little else it does per step.

Settings are those of `small_init_bench.py` (rtol 1e-8, atol 1e-10 × natural scale, stop at
f − f* ≤ 1e-10 (f(θ0) − f*)); θ errors are against its tight-tolerance reference.

    PYTHONPATH=. python benchmarks/evaluation_floor_bench.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import diffrax as dfx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import small_init_bench as B  # noqa: E402  (one-thread XLA/BLAS before any backend starts)

from ddln_jax._geometry import Geometry  # noqa: E402
from ddln_jax._solvers import Auto, FlowField, Rodas5P, natural_scale  # noqa: E402

LOOP = 2000  # evaluations per timed loop
# Every JAX method runs with the toolkit's controller (`small_init_bench.jax_solver`'s default).
SOLVERS = (("tsit5", dfx.Tsit5()), ("dopri5", dfx.Dopri5()), ("dopri8", dfx.Dopri8()),
           ("auto", Auto()))


def _best(fn, repeats):
    jax.block_until_ready(fn())
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def evaluation_costs(loss, u0, repeats):
    """Seconds per evaluation of the reduced field, of Xᵀ(Xθ) alone (both in a compiled loop, so
    no dispatch is counted), and of the NumPy field scipy is given."""
    geom = Geometry(u0)
    scale = natural_scale(B.FORM, geom, u0)
    field = FlowField(B.FORM, scale)
    z0 = B.FORM.initial_state(geom, u0) / scale
    args = (loss, geom)
    # The tiny feedback keeps XLA from hoisting the evaluation out of the loop.
    field_loop = jax.jit(lambda z: jax.lax.fori_loop(
        0, LOOP, lambda i, z: z + 1e-30 * field(0.0, z, args), z))
    X = jnp.asarray(loss.X)
    gemv_loop = jax.jit(lambda th: jax.lax.fori_loop(
        0, LOOP, lambda i, th: th + 1e-30 * (X.T @ (X @ th)), th))
    t_field = _best(lambda: field_loop(z0), repeats) / LOOP
    t_gemv = _best(lambda: gemv_loop(jnp.ones(X.shape[1])), repeats) / LOOP
    f, _, _, w0, _, _ = B.scipy_problem(loss, np.asarray(u0))
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(LOOP // 10):
            f(0.0, w0)
        best = min(best, (time.perf_counter() - t0) / (LOOP // 10))
    return {"toolkit_field_s": t_field, "gemv_pair_s": t_gemv, "scipy_field_s": best}


def new_stages(solver) -> int:
    tab = solver.tableau
    return len(tab.c) + 1 - int(tab.fsal)


def run_case(loss, f_star, L, init_kind, alpha, repeats, programs, compiled):
    d = loss.X.shape[1]
    u0 = B.init(init_kind, alpha, L, d)
    target = B.target_of(loss, f_star, u0)
    ref = B.run_jax(programs[L]["reference"], jnp.asarray(u0), compiled=True)  # not timed
    costs = evaluation_costs(loss, jnp.asarray(u0), repeats)

    def err(theta):
        return float(np.linalg.norm(theta - ref["theta"]) / np.linalg.norm(ref["theta"]))

    lsoda = B.run_scipy(loss, u0, target, "LSODA", repeats=repeats)
    lsoda["theta_rel_err"] = err(lsoda.pop("theta"))
    t_lsoda = lsoda["time_s"]
    lsoda["evaluation_floor_over_lsoda"] = lsoda["nfev"] * costs["toolkit_field_s"] / t_lsoda
    methods = {"lsoda": lsoda}
    for name, solver in SOLVERS:
        r = B.run_jax(programs[L][name], jnp.asarray(u0), compiled=(L, name) in compiled,
                      repeats=repeats)
        compiled.add((L, name))
        r["theta_rel_err"] = err(r.pop("theta"))
        r["time_over_lsoda"] = r["time_s"] / t_lsoda
        if name != "auto":
            r["evaluations"] = 1 + new_stages(solver) * r["steps"]
            r["evaluation_floor_over_lsoda"] = (r["evaluations"] * costs["toolkit_field_s"]
                                                / t_lsoda)
            r["other_work_per_step_s"] = (
                r["time_s"] - r["evaluations"] * costs["toolkit_field_s"]) / r["steps"]
        methods[name] = r
        B.log(f"L={L} {init_kind} α={alpha:g} {name:7s} {r['status']:6s} steps={r['steps']:5d} "
              f"time={r['time_s'] * 1e3:.1f} ms ({r['time_over_lsoda']:.3f} of LSODA) "
              f"err={r['theta_rel_err']:.1e}")
    # Auto's explicit mode is Tsit5 under the same controller: the same steps, rejections and
    # stop time (to the event's root-find tolerance) mean that every step was explicit, and the
    # evaluations are Tsit5's.
    auto, tsit5 = methods["auto"], methods["tsit5"]
    auto["all_steps_explicit"] = bool(
        (auto["steps"], auto["rejected"]) == (tsit5["steps"], tsit5["rejected"])
        and abs(auto["t_stop"] - tsit5["t_stop"]) <= 1e-9 * tsit5["t_stop"])
    if auto["all_steps_explicit"]:
        auto["evaluations"] = tsit5["evaluations"]
        auto["evaluation_floor_over_lsoda"] = tsit5["evaluation_floor_over_lsoda"]
    return {"problem": "large", "L": L, "init": init_kind, "alpha": alpha,
            "evaluation_cost": costs, "methods": methods}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=["3,zero_first,1e-2", "3,zero_first,3e-3"],
                   help="L,init,alpha of large-problem W2 cases (default: the one that misses "
                   "the target and its neighbour at α = 3e-3)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (best taken)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    cases = []
    for spec in a.cases:
        try:
            L, init_kind, alpha = spec.split(",")
            cases.append((int(L), init_kind, float(alpha)))
        except ValueError:
            p.error(f"--cases: expected L,init,alpha (e.g. 3,zero_first,1e-2), got {spec!r}")
        if init_kind not in ("zero_first", "gaussian"):
            p.error(f"--cases: init must be zero_first or gaussian, got {init_kind!r}")
    loss, f_star = B.problem("large")
    programs = {}
    for L in sorted({c[0] for c in cases}):
        programs[L] = {
            name: jax.jit(B.jax_solver(loss, f_star, solver, 200_000)) for name, solver in SOLVERS}
        programs[L]["reference"] = jax.jit(B.jax_solver(loss, f_star, Rodas5P(), 400_000,
                                                        rtol=1e-12, atol=1e-14))
    compiled = set()
    rows = [run_case(loss, f_star, *c, a.repeats, programs, compiled) for c in cases]
    result = {
        "machine": {
            "description": os.environ.get("BENCH_MACHINE", f"{os.cpu_count()}-core CPU (shared)"),
            "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(),
            "jax_version": jax.__version__, "load_average_at_end": os.getloadavg(),
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
            "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", ""),
        },
        "settings": {"rtol": B.RTOL, "atol": f"{B.ATOL} × natural scale", "stop": B.STOP,
                     "controller": "ddln_jax.PredictiveController (every JAX method)",
                     "timing": f"best of {a.repeats}, compile time excluded",
                     "reference": "ddln_jax.Rodas5P rtol 1e-12, atol 1e-14 × scale"},
        "runs": rows,
    }
    out = Path(a.json) if a.json else (
        Path(__file__).parent / "results" / f"evaluation_floor_{jax.default_backend()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    B.log(f"JSON written to {out}")


if __name__ == "__main__":
    main()
