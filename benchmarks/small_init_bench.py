"""Small-initialization benchmark (issue 8, workload W2): the toolkit's default against the ways
people integrate stiff flows today.

Problems (float64, least squares):

- `small`: the issue's problem, n = 10, d = 30, `np.random.seed(0); X = np.random.randn(10, 30)`,
  θ* = (1, −2, 0.5, 0, …), y = Xθ*;
- `large`: n = 100, d = 1000, X ~ N(0, 1), 5-sparse θ* with magnitudes in [1, 2] and random signs;

depths L ∈ {3, 4}, zero-first (u¹ = 0, u^j = α) and Gaussian (α·N(0, 1)) inits,
α ∈ {1e-2, 3e-3, 1e-3}; each run integrates the reduced flow until f − f* ≤ 1e-10·(f(θ0) − f*)
(a terminal event), rtol 1e-8 and atol 1e-10 relative to the natural scale of the init
(`ddln_jax.natural_scale`, given to every method as a per-coordinate absolute tolerance). Side by
side, in one process:

- `toolkit`: the default stepper `ddln_jax.Auto` (explicit ⇄ Rosenbrock) and the default
  controller `ddln_jax.PredictiveController` on `ddln_jax.FlowField` through
  `diffrax.diffeqsolve` with a stop event;
- `tsit5`, `kvaerno5`: plain diffrax solvers with `diffrax.PIDController` on the same field
  (a step budget caps them);
- `lsoda`, `bdf`, `radau`: `scipy.integrate.solve_ivp` with the exact Jacobian (NumPy; a
  wall-clock budget per run, status `budget` when exceeded);
- a batch of `--batch` α values log-spaced in [1e-3, 1e-2] (zero-first, L = 4) in one call:
  a plain `jax.vmap` of the toolkit's solve, and `ddln_jax.simulate(..., lanes=…)` (the sweep
  engine) on every device with `Auto` and with `Rodas4`, against the same number of LSODA runs
  (extrapolated from `--batch-lsoda` of them). On a CPU, `--host-devices 2` gives JAX one
  device per core (the engine runs each device's lanes on its own).

θ at the stop is compared with a tight-tolerance reference (scipy Radau, rtol 1e-12, for the
small problem; `ddln_jax.Rodas5P`, rtol 1e-12, for the large one). JAX times exclude compilation
(a first call compiles; the second is timed; compile time is reported separately).

    PYTHONPATH=. python benchmarks/small_init_bench.py            # full run (minutes)
    PYTHONPATH=. python benchmarks/small_init_bench.py --small    # quick check
    PYTHONPATH=. python benchmarks/small_init_bench.py --problems small --skip cases \
        --host-devices 2                                          # the batch alone
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

# One thread for XLA and BLAS unless told otherwise: on a small shared CPU the thread pools of
# XLA's CPU runtime cost more than they give at these sizes (measured 4-5× slower steps on the
# 2-core machine under load), and scipy's NumPy gets the same single thread.
if "--threads-default" not in sys.argv:
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
# `--host-devices N`: N CPU devices (one per core) for the batch rows, which then run on all
# of them (the sweep engine gives each device its own lanes); no effect on a GPU.
if "--host-devices" in sys.argv:
    jax.config.update("jax_num_cpu_devices", int(sys.argv[sys.argv.index("--host-devices") + 1]))

import diffrax as dfx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optimistix as optx  # noqa: E402
import scipy.integrate as si  # noqa: E402

import ddln_jax as dj  # noqa: E402
from ddln_jax._flows import as_formulation  # noqa: E402
from ddln_jax._geometry import Geometry  # noqa: E402
from ddln_jax._solvers import Auto, FlowField, Rodas4, Rodas5P, natural_scale  # noqa: E402

RTOL, ATOL = 1e-8, 1e-10
STOP = 1e-10  # f − f* ≤ STOP·(f(θ0) − f*)
ACCURACY = 1e-6  # relative θ error required of the toolkit
T_MAX = 1e12  # the horizon: every run is meant to stop at the event
FORM = as_formulation("reduced")
SCIPY = {"lsoda": "LSODA", "bdf": "BDF", "radau": "Radau"}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Workload.


def problem(kind: str):
    if kind == "small":
        np.random.seed(0)
        X = np.random.randn(10, 30)
        theta_star = np.zeros(30)
        theta_star[:3] = [1, -2, 0.5]
    else:
        rng = np.random.default_rng(0)
        X = rng.standard_normal((100, 1000))
        theta_star = np.zeros(1000)
        support = rng.choice(1000, size=5, replace=False)
        theta_star[support] = rng.uniform(1, 2, 5) * rng.choice([-1.0, 1.0], 5)
    loss = dj.LeastSquares(X, X @ theta_star)
    return loss, float(loss.minimum())


def init(kind: str, alpha: float, L: int, d: int) -> np.ndarray:
    if kind == "zero_first":
        return np.concatenate([np.zeros((1, d)), alpha * np.ones((L - 1, d))])
    return alpha * np.random.default_rng(1000 * L + d).standard_normal((L, d))


def target_of(loss, f_star, u0):
    return f_star + STOP * (float(loss(jnp.prod(jnp.asarray(u0), axis=0))) - f_star)


# ---------------------------------------------------------------------------------------------
# JAX solvers (one compiled program per problem, depth and solver; α and the init are inputs).


def jax_solver(loss, f_star, solver, max_steps, rtol=RTOL, atol=ATOL,
               controller=dj.PredictiveController):
    """`controller`: the toolkit's default; plain diffrax rows pass `diffrax.PIDController`."""

    def solve(u0):
        geom = Geometry(u0)
        scale = natural_scale(FORM, geom, u0)
        target = f_star + STOP * (loss(jnp.prod(u0, axis=0)) - f_star)

        def cond_fn(t, y, args, **kwargs):
            return args[0](FORM.theta(args[1], y * scale)) - target

        sol = dfx.diffeqsolve(
            dfx.ODETerm(FlowField(FORM, scale)), solver, 0.0, T_MAX, None,
            FORM.initial_state(geom, u0) / scale, args=(loss, geom),
            stepsize_controller=controller(rtol=rtol, atol=atol), max_steps=max_steps,
            event=dfx.Event(cond_fn, root_finder=optx.Newton(rtol=1e-12, atol=1e-14)),
            throw=False,
        )
        theta = FORM.theta(geom, sol.ys[-1] * scale)
        return {"t": sol.ts[-1], "theta": theta, "loss": loss(theta),
                "steps": sol.stats["num_steps"], "rejected": sol.stats["num_rejected_steps"],
                "result": sol.result._value}

    return solve


def result_name(code: int) -> str:
    # A Newton root find that stalls at f's rounding level still found the crossing.
    if code in (int(dfx.RESULTS.event_occurred._value),
                int(dfx.RESULTS.nonlinear_max_steps_reached._value)):
        return "event"
    if code == int(dfx.RESULTS.max_steps_reached._value):
        return "max_steps"
    if code == int(dfx.RESULTS.successful._value):
        return "success"
    return "failed"


def run_jax(fn, u0, *, compiled, repeats=1):
    """Time `fn(u0)` (the best of `repeats` calls); the first call per program compiles
    (timed apart)."""
    compile_s = None
    if not compiled:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(u0))
        compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(u0))
        times.append(time.perf_counter() - t0)
    elapsed = min(times)
    out = jax.tree_util.tree_map(np.asarray, out)
    row = {"time_s": elapsed, "t_stop": float(out["t"]), "theta": out["theta"],
           "steps": int(out["steps"]), "rejected": int(out["rejected"]),
           "status": result_name(int(out["result"]))}
    if compile_s is not None:
        row["compile_s"] = max(compile_s - elapsed, 0.0)
    if repeats > 1:
        row["times_s"] = times
    return row


# ---------------------------------------------------------------------------------------------
# scipy with the exact Jacobian.


class Budget(Exception):
    """A scipy run that exceeded its wall-clock budget."""


def scipy_problem(loss, u0):
    """The reduced flow ẇ = −a(w) ⊙ ∇f(ψ(w)) and its exact Jacobian in plain NumPy (no JAX
    dispatch per call: the fastest way to feed scipy), a = ∏_j √(w² + δ_j), ψ(w) = w·a:
    J = −diag(a′ ⊙ ∇f) − diag(a) XᵀX/n diag(ψ′), a′ = a Σ_j w/(w² + δ_j), ψ′ = a + w a′."""
    X, y = np.asarray(loss.X), np.asarray(loss.y)
    n = X.shape[0]
    G = X.T @ X / n
    geom = Geometry(jnp.asarray(u0))
    delta = np.asarray(geom.delta)
    w0 = np.asarray(geom.reduce(jnp.asarray(u0)))
    scale = np.asarray(natural_scale(FORM, geom, jnp.asarray(u0)))

    def parts(w):
        a = np.prod(np.sqrt(w[None] ** 2 + delta), axis=0)
        return a, w * a

    def f(t, w):
        a, theta = parts(w)
        return -a * (X.T @ (X @ theta - y) / n)

    def jac(t, w):
        a, theta = parts(w)
        grad = X.T @ (X @ theta - y) / n
        da = a * np.sum(w[None] / (w[None] ** 2 + delta), axis=0) if delta.size else 0 * w
        dtheta = a + w * da
        return -np.diag(da * grad) - (a[:, None] * G) * dtheta[None, :]

    def lossf(w):
        _, theta = parts(w)
        return 0.5 * np.mean((X @ theta - y) ** 2)

    return f, jac, lossf, w0, scale, lambda w: parts(w)[1]


def run_scipy(loss, u0, target, method, *, rtol=RTOL, atol=ATOL, budget_s=None, repeats=1):
    """Solve with scipy (the best time of `repeats` solves)."""
    rows = [_run_scipy(loss, u0, target, method, rtol=rtol, atol=atol, budget_s=budget_s)
            for _ in range(repeats)]
    best = min(rows, key=lambda r: r["time_s"])
    if repeats > 1:
        best["times_s"] = [r["time_s"] for r in rows]
    return best


def _run_scipy(loss, u0, target, method, *, rtol, atol, budget_s):
    f, jac, lossf, w0, scale, theta_of = scipy_problem(loss, u0)
    start = time.perf_counter()

    def fun(t, w):
        if budget_s is not None and time.perf_counter() - start > budget_s:
            raise Budget
        return f(t, w)

    def event(t, w):
        return lossf(w) - target

    event.terminal = True
    event.direction = -1
    t0 = time.perf_counter()
    try:
        sol = si.solve_ivp(fun, (0, T_MAX), w0, method=method, rtol=rtol, atol=atol * scale,
                           events=event, jac=jac)
    except Budget:
        return {"time_s": time.perf_counter() - t0, "status": "budget", "t_stop": float("nan"),
                "theta": np.full_like(w0, np.nan), "steps": -1, "budget_s": budget_s}
    elapsed = time.perf_counter() - t0
    if sol.status == 1 and len(sol.t_events[0]):
        w, t, status = sol.y_events[0][0], float(sol.t_events[0][0]), "event"
    else:
        w, t, status = sol.y[:, -1], float(sol.t[-1]), "success" if sol.status == 0 else "failed"
    return {"time_s": elapsed, "t_stop": t, "theta": theta_of(w), "steps": int(len(sol.t) - 1),
            "nfev": int(sol.nfev), "njev": int(sol.njev), "status": status}


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="quick run: small problem, L = 4, "
                   "zero-first, α ∈ {1e-2, 3e-3}, batch of 16")
    p.add_argument("--problems", nargs="+", default=None, choices=["small", "large"])
    p.add_argument("--depths", nargs="+", type=int, default=None)
    p.add_argument("--alphas", nargs="+", type=float, default=None)
    p.add_argument("--inits", nargs="+", default=None, choices=["zero_first", "gaussian"])
    p.add_argument("--batch", type=int, default=None, help="α values in the vmapped batch")
    p.add_argument("--batch-lsoda", type=int, default=8, help="LSODA runs timed for the batch")
    p.add_argument("--tsit5-steps", type=int, default=None, help="step budget of Tsit5")
    p.add_argument("--kvaerno5-steps", type=int, default=None, help="step budget of Kvaerno5")
    p.add_argument("--skip", nargs="*", default=[],
                   choices=["cases", "tsit5", "kvaerno5", "lsoda", "bdf", "radau", "batch"],
                   help="parts to leave out (cases: every single run, leaving the batch)")
    p.add_argument("--scipy-budget", type=float, default=60.0,
                   help="wall-clock seconds after which a BDF/Radau run is abandoned (status "
                   "budget); LSODA gets 5 times as much")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed repeats (best taken) of the toolkit and LSODA on the small problem "
                   "(--large-repeats on the large one)")
    p.add_argument("--large-repeats", type=int, default=1,
                   help="timed repeats (best taken) of the toolkit and LSODA on the large problem")
    p.add_argument("--large-budget-factor", type=float, default=0.5,
                   help="scipy budgets on the large problem, relative to --scipy-budget")
    p.add_argument("--threads-default", action="store_true",
                   help="keep XLA's and BLAS's default thread pools (default: one thread)")
    p.add_argument("--host-devices", type=int, default=1,
                   help="CPU devices for the batch rows (one per core)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    problems = a.problems or (["small"] if a.small else ["small", "large"])
    depths = a.depths or ([4] if a.small else [3, 4])
    alphas = a.alphas or ([1e-2, 3e-3] if a.small else [1e-2, 3e-3, 1e-3])
    inits = a.inits or (["zero_first"] if a.small else ["zero_first", "gaussian"])
    batch = a.batch or (16 if a.small else 64)
    budgets = {
        "tsit5": a.tsit5_steps or (50_000 if a.small else 200_000),
        "kvaerno5": a.kvaerno5_steps or (20_000 if a.small else 40_000),
    }

    rows, setups, programs_of, cases, refs = [], {}, {}, {}, {}
    # The toolkit and LSODA are timed first, for every case: in one process, a Kvaerno5 run
    # slowed later runs of the toolkit by up to 40% (measured: the small problem, L = 4 after
    # L = 3). The comparison methods run afterwards, in a second pass.
    for names in (["toolkit", "lsoda"], ["tsit5", "kvaerno5", "bdf", "radau"]):
        for kind in (problems if "cases" not in a.skip else []):
            if kind not in setups:
                setups[kind] = problem(kind)
            loss, f_star = setups[kind]
            n, d = loss.X.shape
            reps = a.repeats if kind == "small" else a.large_repeats
            for L in depths:
                if (kind, L) not in programs_of:
                    # Smaller step budgets on the large problem: a Kvaerno5 step there
                    # factorizes a 1000 × 1000 Jacobian (they show the trend, not the finish).
                    cap = budgets if kind == "small" else {
                        "tsit5": budgets["tsit5"] // 40,
                        "kvaerno5": max(budgets["kvaerno5"] // 400, 20)}
                    programs_of[kind, L] = ({
                        "toolkit": jax.jit(jax_solver(loss, f_star, Auto(), 200_000)),
                        "tsit5": jax.jit(jax_solver(loss, f_star, dfx.Tsit5(), cap["tsit5"],
                                                    controller=dfx.PIDController)),
                        "kvaerno5": jax.jit(jax_solver(loss, f_star, dfx.Kvaerno5(),
                                                       cap["kvaerno5"],
                                                       controller=dfx.PIDController)),
                        # Rodas5P: at rtol 1e-12 it needs about half the steps of Rodas4.
                        "reference": jax.jit(jax_solver(loss, f_star, Rodas5P(), 400_000,
                                                        rtol=1e-12, atol=1e-14)),
                    }, set())
                programs, compiled = programs_of[kind, L]
                reference = programs["reference"]
                for init_kind in inits:
                    for alpha in alphas:
                        key = (kind, L, init_kind, alpha)
                        u0 = init(init_kind, alpha, L, d)
                        target = target_of(loss, f_star, u0)
                        if key not in cases:
                            if kind == "small":
                                ref = run_scipy(loss, u0, target, "Radau", rtol=1e-12, atol=1e-14)
                                ref["method"] = "scipy Radau rtol 1e-12, atol 1e-14 × scale"
                            else:
                                ref = run_jax(reference, jnp.asarray(u0), compiled="ref" in compiled)
                                compiled.add("ref")
                                ref["method"] = "ddln_jax.Rodas5P rtol 1e-12, atol 1e-14 × scale"
                            refs[key] = ref
                            cases[key] = {
                                "problem": kind, "n": n, "d": d, "L": L, "init": init_kind,
                                "alpha": alpha,
                                "reference": {k: ref[k] for k in ("method", "t_stop", "status", "steps")},
                                "methods": {}}
                            rows.append(cases[key])
                        ref, case = refs[key], cases[key]
                        out = case["methods"]
                        for name in names:
                            if name in a.skip:
                                continue
                            if name in programs:
                                r = run_jax(programs[name], jnp.asarray(u0), compiled=name in compiled,
                                            repeats=reps if name == "toolkit" else 1)
                                compiled.add(name)
                            else:
                                # LSODA is the yardstick: it gets 5 times the budget of BDF/Radau,
                                # and the same number of timed repeats as the toolkit.
                                budget = a.scipy_budget * (5 if name == "lsoda" else 1)
                                if kind == "large":
                                    budget *= a.large_budget_factor
                                r = run_scipy(loss, u0, target, SCIPY[name], budget_s=budget,
                                              repeats=reps if name == "lsoda" else 1)
                            r["theta_rel_err"] = float(np.linalg.norm(r.pop("theta") - ref["theta"])
                                                       / np.linalg.norm(ref["theta"]))
                            if ref["status"] not in ("event", "success"):
                                # The reference did not finish (its step budget): no error to report.
                                r["theta_rel_err"] = float("nan")
                            out[name] = r
                            log(f"{kind} L={L} {init_kind} α={alpha:g} {name:9s} {r['status']:9s} "
                                f"steps={r['steps']:7d} t={r['t_stop']:.4g} time={r['time_s']:.3f}s "
                                f"err={r['theta_rel_err']:.1e}")
                        if "toolkit" in names:
                            tk = out["toolkit"]
                            case["toolkit_ok"] = (
                                None if ref["status"] not in ("event", "success")
                                else bool(tk["status"] in ("event", "success")
                                          and tk["theta_rel_err"] <= ACCURACY))
                            if "lsoda" in out:
                                case["toolkit_over_lsoda"] = tk["time_s"] / out["lsoda"]["time_s"]
                                # LSODA stopped at its budget: the ratio is an upper bound.
                                case["toolkit_over_lsoda_is_upper_bound"] = (
                                    out["lsoda"]["status"] == "budget")
                        write(a, rows, None, budgets)

    batch_row = None
    if "batch" not in a.skip:
        batch_row = [run_batch(batch, a.batch_lsoda, kind, a.repeats) for kind in problems]
    write(a, rows, batch_row, budgets, final=True)


def write(a, rows, batch_row, budgets, final=False):
    """Write the JSON (after every case, so that an interrupted run keeps what it measured)."""
    result = {
        "complete": final,
        "machine": {
            "description": os.environ.get("BENCH_MACHINE", f"{os.cpu_count()}-core CPU (shared)"),
            "platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(),
            "jax_devices": [str(x) for x in jax.devices()], "jax_version": jax.__version__,
            "load_average_at_end": os.getloadavg(),
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
            "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", ""),
        },
        "settings": {"rtol": RTOL, "atol": f"{ATOL} × natural scale", "stop": STOP,
                     "accuracy_required": ACCURACY, "step_budgets_small": budgets,
                     "step_budgets_large": {"tsit5": budgets["tsit5"] // 40,
                                            "kvaerno5": max(budgets["kvaerno5"] // 400, 20)},
                     "scipy_budget_s": {"bdf_radau": a.scipy_budget, "lsoda": 5 * a.scipy_budget,
                                        "factor_on_large": a.large_budget_factor},
                     "timing": f"best of {a.repeats} for the toolkit and LSODA on the small "
                               f"problem, of {a.large_repeats} on the large one (other methods: one "
                               "run); compile time excluded",
                     "formulation": "reduced"},
        "runs": rows,
        "batch": batch_row,
        "summary": summary(rows, batch_row),
    }
    if final:
        print(json.dumps(result["summary"], indent=1))
    out = Path(a.json) if a.json else (
        Path(__file__).parent / "results" / f"small_init_bench_{jax.default_backend()}"
        f"{'_small' if a.small else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    if final:
        log(f"JSON written to {out}")


def _timed(fn, repeats):
    """(first call's time, best of `repeats` later calls, the last output)."""
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return first, best, out


def run_batch(B, n_lsoda, kind, repeats):
    """B α values (zero-first, L = 4) in one toolkit call, against LSODA runs: a plain
    `jax.vmap` of the solve (one device), and `simulate(..., lanes=…)` (the sweep engine)
    on all of `jax.devices()` with the default `Auto`, with `Rodas4` and with `Rodas5P`."""
    loss, f_star = problem(kind)
    n, d = loss.X.shape
    L = 4
    alphas = np.geomspace(1e-3, 1e-2, B)
    U = np.stack([init("zero_first", al, L, d) for al in alphas])
    devices = jax.devices()
    lanes = -(-B // len(devices))
    fn = jax.jit(jax.vmap(jax_solver(loss, f_star, Auto(), 200_000)))

    def vmapped():
        out = jax.block_until_ready(fn(jnp.asarray(U)))
        return (np.asarray(out["theta"]), [result_name(int(c)) for c in np.asarray(out["result"])],
                np.asarray(out["steps"]))

    def engine(solver):
        def run():
            tr = dj.simulate(loss, U, t1=T_MAX, ts=[0.0, T_MAX], stop_ratio=STOP, f_star=f_star,
                             rtol=RTOL, atol=ATOL, max_steps=200_000, solver=solver, lanes=lanes,
                             devices=devices)
            return (np.asarray(tr.theta_final), list(np.atleast_1d(tr.status_name)),
                    np.asarray(tr.num_steps))
        return run

    methods = {
        "vmap_auto": ("jax.vmap of the toolkit's solve (Auto), one device", vmapped),
        "engine_auto": (f"simulate(lanes={lanes}) on {len(devices)} device(s), Auto", engine(Auto())),
        "engine_rodas4": (f"simulate(lanes={lanes}) on {len(devices)} device(s), Rodas4",
                          engine(Rodas4())),
        "engine_rodas5p": (f"simulate(lanes={lanes}) on {len(devices)} device(s), Rodas5P",
                           engine(Rodas5P())),
    }
    results = {}
    for name, (method, fn_) in methods.items():
        first, best, (theta, statuses, steps) = _timed(fn_, repeats)
        results[name] = {"method": method, "time_s": best, "compile_s": max(first - best, 0.0),
                         "steps_max": int(np.max(steps)), "steps_mean": float(np.mean(steps)),
                         "all_stopped": all(s in ("event", "success") for s in statuses),
                         "theta": theta}
        log(f"batch {kind} B={B} {name}: {best:.3f} s (compile {first - best:.1f} s)")
    pick = np.unique(np.linspace(0, B - 1, n_lsoda).round().astype(int))
    lsoda, thetas = [], []
    for i in pick:
        r = run_scipy(loss, U[i], target_of(loss, f_star, U[i]), "LSODA", repeats=repeats)
        lsoda.append(r["time_s"])
        thetas.append(r["theta"])
    lsoda_total = float(np.mean(lsoda) * B)
    for r in results.values():
        theta = r.pop("theta")
        r["batch_over_lsoda_B"] = r["time_s"] / lsoda_total
        r["max_rel_diff_to_lsoda"] = float(max(
            np.linalg.norm(theta[i] - t) / np.linalg.norm(t) for i, t in zip(pick, thetas)))
    row = {"problem": kind, "n": n, "d": d, "L": L, "B": B,
           "alphas": [float(alphas[0]), float(alphas[-1])], "devices": [str(x) for x in devices],
           "lsoda_runs_timed": len(pick), "lsoda_mean_s": float(np.mean(lsoda)),
           "lsoda_extrapolated_B_s": lsoda_total, "methods": results,
           "batch_over_lsoda_B": min(r["batch_over_lsoda_B"] for r in results.values()),
           "best": min(results, key=lambda k: results[k]["time_s"])}
    log(f"batch {kind} B={B}: {B} LSODA runs ≈ {lsoda_total:.2f} s; ratios "
        + ", ".join(f"{k} {r['batch_over_lsoda_B']:.3f}" for k, r in results.items()))
    return row


def summary(rows, batch_rows):
    s = {}
    if batch_rows:
        s["batch_over_lsoda_B"] = {
            f"{b['problem']} B={b['B']} {name}": round(r["batch_over_lsoda_B"], 4)
            for b in batch_rows for name, r in b["methods"].items()}
    if not rows:
        return s
    checked = [r for r in rows if r["toolkit_ok"] is not None]
    s |= {"toolkit_all_ok": all(r["toolkit_ok"] for r in checked),
         "toolkit_max_theta_rel_err": max((r["methods"]["toolkit"]["theta_rel_err"] for r in checked),
                                          default=float("nan")),
         "runs_without_reference": len(rows) - len(checked),
         "toolkit_time_over_lsoda": {}}
    for r in rows:
        if "toolkit_over_lsoda" in r:
            key = f"{r['problem']} L={r['L']} {r['init']} a={r['alpha']:g}"
            s["toolkit_time_over_lsoda"][key] = round(r["toolkit_over_lsoda"], 4)
    ratios = list(s["toolkit_time_over_lsoda"].values())
    if ratios:
        s["toolkit_over_lsoda_max"] = max(ratios)
        s["toolkit_over_lsoda_geomean"] = float(np.exp(np.mean(np.log(ratios))))
    return s


if __name__ == "__main__":
    main()
