"""Sweep benchmark: this engine against the ways people integrate many DDLN flows today.

On the canonical workload W1 (least squares n = 100, d = 1000, L = 3, B inits with N(0, α²)
entries, α log-spaced in [0.3, 1], T = 50, float64; see `baselines.w1`), in one process and on
the same inits, it times

- (a) `ddln_jax.simulate(..., lanes=N)`: the lane-refill engine on the reduced flow, Tsit5,
  PID rtol 1e-6, atol 1e-9 (one row per lane count asked for);
- (b) plain `jax.vmap` over `diffrax.diffeqsolve` of the layer flow, same solver/tolerances;
- (c) `scipy.integrate.solve_ivp` per init, DOP853, same tolerances, one core;
- (d) torchdiffeq batched dopri5 (when torch is installed);
- (e) gradient descent on the layers with η = 1e-3;

checks every exact method against a tight-tolerance reference (max relative θ error ≤ 1e-5),
prints a table with ratios, and writes JSON (default `benchmarks/results/sweep_bench_<backend>.json`).

    PYTHONPATH=. python benchmarks/sweep_bench.py --B 64 --lanes 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import baselines as bl  # noqa: E402

import ddln_jax as dj  # noqa: E402

ACCURACY = 1e-5


def engine(work: bl.Workload, lanes: int, *, rtol: float = bl.RTOL, atol: float = bl.ATOL,
           formulation: str = "reduced") -> dict:
    """(a): the refill engine. The first call compiles; a second identical call is timed."""
    kw = dict(t1=work.T, ts=work.ts, rtol=rtol, atol=atol, formulation=formulation, lanes=lanes)
    t0 = time.perf_counter()
    dj.simulate(work.loss, work.u0, **kw)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    tr = dj.simulate(work.loss, work.u0, **kw)
    elapsed = time.perf_counter() - t0
    steps = np.asarray(tr.num_steps)
    return {
        "name": f"engine_lanes{lanes}",
        "method": f"{formulation} flow, Tsit5, PID rtol {rtol:g} atol {atol:g}, lane-refill engine "
        f"with {lanes} lanes ({jax.default_backend()})",
        "theta": np.asarray(tr.theta), "time_s": elapsed, "first_call_s": first,
        "compile_s": max(first - elapsed, 0.0), "lanes": lanes,
        "steps": steps.tolist(), "steps_mean": float(steps.mean()), "steps_min": int(steps.min()),
        "steps_max": int(steps.max()), "rejected_total": int(np.asarray(tr.num_rejected_steps).sum()),
        "lane_efficiency": float(np.ravel(tr.stats["lane_efficiency"])[0]), "all_succeeded": bool(np.all(tr.succeeded)),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bl.workload_args(p)
    p.add_argument("--lanes", type=int, nargs="+", default=[16], help="engine lane counts to time")
    p.add_argument("--scipy-inits", type=int, default=None,
                   help="inits solved by scipy (default all), extrapolated to B")
    p.add_argument("--eta", type=float, default=1e-3)
    p.add_argument("--skip", nargs="*", default=[],
                   choices=["plain_vmap", "scipy", "torchdiffeq", "gradient_descent"])
    p.add_argument("--json", default=None, help="output path (default benchmarks/results/...)")
    a = p.parse_args(argv)

    jax.config.update("jax_enable_x64", True)
    work = bl.w1(a.B, a.seed, a.n, a.d, a.L, T=a.T)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    ref = bl.reference(work)
    log(f"reference: {ref['time_s']:.1f} s")
    rows = []
    for lanes in a.lanes:
        rows.append(engine(work, lanes))
        log(f"engine, {lanes} lanes: {rows[-1]['time_s']:.2f} s")
    runs = [
        ("plain_vmap", lambda: bl.plain_vmap(work)),
        ("scipy", lambda: bl.scipy_per_init(work, a.scipy_inits)),
        ("torchdiffeq", lambda: bl.torchdiffeq_batched(work)),
        ("gradient_descent", lambda: bl.gradient_descent(work, a.eta)),
    ]
    for key, fn in runs:
        if key in a.skip:
            continue
        r = fn()
        if r is None:
            r = {"name": "torchdiffeq_batched", "skipped": bl.torchdiffeq_unavailable()}
        rows.append(r)
        log(f"{r['name']}: {r.get('time_s', float('nan')):.2f} s")
    for r in rows:
        if r.get("theta") is not None:
            m = r["theta"].shape[0]
            r["rel_err"] = bl.accuracy(r["theta"], ref["theta"][:m])
            r["accurate"] = bool(r["rel_err"] <= ACCURACY)

    by = {r["name"]: r for r in rows if not r.get("skipped")}
    # Time for all B inits: scipy's is extrapolated from the inits it solved.
    total = {k: r.get("extrapolated_B_s", r["time_s"]) for k, r in by.items()}
    best = min((k for k in by if k.startswith("engine")), key=lambda k: total[k])
    ratios = {f"{k}_over_engine": total[k] / total[best] for k in total if not k.startswith("engine")}
    print(bl._table([dict(ref, rel_err=None), *rows]))
    print(f"\nbest engine row: {best} ({total[best]:.3f} s); time ratios (baseline / engine):")
    for k, v in ratios.items():
        print(f"  {k:<36} {v:8.2f}")

    result = {
        "workload": work.describe(),
        "machine": {
            "platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(),
            "jax_devices": [str(x) for x in jax.devices()],
            "device_kind": jax.devices()[0].device_kind, "jax_version": jax.__version__,
        },
        "accuracy_required": ACCURACY,
        "best_engine": best,
        "ratios": ratios,
        "results": [{k: v for k, v in r.items() if k not in ("theta", "steps", "time_per_init")}
                    for r in [ref, *rows]],
    }
    out = Path(a.json) if a.json else (
        Path(__file__).parent / "results" / f"sweep_bench_{jax.default_backend()}_B{a.B}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nJSON written to {out}")


if __name__ == "__main__":
    main()
