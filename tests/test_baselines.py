"""The benchmark baselines (benchmarks/baselines.py) agree with the tight reference to the
accuracy each should reach: the adaptive ODE baselines (rtol 1e-6) to 1e-4, gradient descent to
O(η) with first-order convergence as η halves. A tiny workload keeps this fast."""

import dataclasses
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from scipy.integrate import solve_ivp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import baselines as bl  # noqa: E402


@pytest.fixture(scope="module")
def work():
    return bl.w1(3, seed=1, n=5, d=12, L=3, T=2.0, k=2)


@pytest.fixture(scope="module")
def ref(work):
    t0 = time.perf_counter()
    out = bl.reference(work)
    out["wall_s"] = time.perf_counter() - t0  # what the call took, seen from outside
    return out


def _layer_flow_scipy(u0, ts, X, y):
    """θ at `ts` from the layer ODE u̇^j = −(∏_{k≠j} u^k) ⊙ ∇f(θ) in NumPy (DOP853, rtol 1e-12):
    independent of ddln_jax."""
    L, d = u0.shape
    n = X.shape[0]

    def rhs(t, flat):
        u = flat.reshape(L, d)
        grad = X.T @ (X @ np.prod(u, axis=0) - y) / n
        others = np.stack([np.prod(np.delete(u, j, axis=0), axis=0) for j in range(L)])
        return (-others * grad).ravel()

    sol = solve_ivp(rhs, (ts[0], ts[-1]), u0.ravel(), method="DOP853", t_eval=ts, rtol=1e-12,
                    atol=1e-14)
    assert sol.success
    return np.prod(sol.y.T.reshape(len(ts), L, d), axis=1)


def test_workload_matches_its_definition():
    w = bl.w1(4, seed=3, n=7, d=20, L=2, T=3.0)
    assert w.X.shape == (7, 20) and w.y.shape == (7,) and w.u0.shape == (4, 2, 20)
    assert w.u0.dtype == np.float64 and (w.B, w.L, w.d, w.n) == (4, 2, 20, 7)
    support = np.flatnonzero(w.theta_star)
    assert len(support) == 5
    assert np.all((np.abs(w.theta_star[support]) >= 1) & (np.abs(w.theta_star[support]) <= 2))
    np.testing.assert_allclose(w.y, w.X @ w.theta_star)
    np.testing.assert_allclose(w.alphas, [0.3, 0.3 * (10 / 3) ** (1 / 3), 0.3 * (10 / 3) ** (2 / 3), 1.0])
    np.testing.assert_allclose(w.ts, np.linspace(0, 3.0, 11))
    # Same seed, same workload.
    np.testing.assert_array_equal(bl.w1(4, seed=3, n=7, d=20, L=2, T=3.0).u0, w.u0)


def test_accuracy_is_max_relative_error():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 3, 4))
    theta = ref.copy()
    theta[1, 2] *= 1 + 2e-3
    theta[0, 1] *= 1 - 1e-3
    assert bl.accuracy(theta, ref) == pytest.approx(2e-3, rel=1e-9)
    ref[:, 0] = 0.0  # a zero reference row counts the absolute error
    theta[:, 0] = 0.0
    theta[1, 0, 0] = 5e-3
    assert bl.accuracy(theta, ref) == pytest.approx(5e-3, rel=1e-9)
    theta[0, 2, 1] = np.nan
    assert np.isnan(bl.accuracy(theta, ref))
    with pytest.raises(ValueError, match="shapes differ"):
        bl.accuracy(theta[:1], ref)


def test_reference_is_accurate(work, ref):
    """The reference θ(t) against an independent SciPy integration of the layer ODE (1e-9
    relative), for the smallest and the largest init scale; its timing is a part of the
    call's wall time."""
    assert ref["theta"].shape == (3, 11, 12)
    np.testing.assert_allclose(ref["theta"][:, 0], np.prod(work.u0, axis=1), rtol=1e-14)
    for k in (0, 2):
        indep = _layer_flow_scipy(work.u0[k], work.ts, work.X, work.y)
        assert bl.accuracy(ref["theta"][k], indep) <= 1e-9
    assert 0 < ref["time_s"] <= ref["wall_s"] and 0 < ref["steps_min"] <= ref["steps_max"]


def test_plain_vmap(work, ref):
    """Accurate to 1e-4; each lane keeps its own step count, so reversing the inits reverses
    the per-lane steps and leaves the lane efficiency unchanged; the two timed calls fit in the
    wall time of the whole call."""
    t0 = time.perf_counter()
    r = bl.plain_vmap(work)
    wall = time.perf_counter() - t0
    assert r["all_succeeded"] and r["theta"].shape == ref["theta"].shape
    err = bl.accuracy(r["theta"], ref["theta"])
    assert 0 < err < 1e-4, err
    flipped = bl.plain_vmap(dataclasses.replace(work, u0=work.u0[::-1].copy(), alphas=work.alphas[::-1].copy()))
    assert flipped["steps"] == r["steps"][::-1]
    assert flipped["lane_efficiency"] == pytest.approx(r["lane_efficiency"], rel=1e-15)
    assert len(set(r["steps"])) > 1 and 0 < r["lane_efficiency"] < 1
    assert 0 < r["time_s"] and 0 < r["first_call_s"] and r["time_s"] + r["first_call_s"] <= wall


def test_scipy_per_init_on_one_core(work, ref):
    r = bl.scipy_per_init(work, n_inits=2)
    assert r["all_succeeded"] and r["theta"].shape == (2, 11, 12) and r["n_inits"] == 2
    err = bl.accuracy(r["theta"], ref["theta"][:2])
    assert 0 < err < 1e-4, err
    assert r["extrapolated_B_s"] == pytest.approx(3 * r["time_per_init_s"])
    # DOP853: 12 evaluations per attempted step, 2 to start, 3 more per dense-output step.
    attempts = np.array(r["accepted"]) + np.array(r["rejected"])
    assert np.all(np.array(r["nfev"]) >= 2 + 12 * attempts)
    assert np.all(np.array(r["nfev"]) <= 2 + 15 * attempts)
    one = r["one_core"]
    assert all(v == "1" for v in one["env"].values())
    if hasattr(os, "sched_setaffinity"):
        assert len(one["affinity"]) == 1


def test_gradient_descent_is_first_order(work, ref):
    errs = []
    for eta in (1e-2, 5e-3):
        r = bl.gradient_descent(work, eta=eta)
        assert r["theta"].shape == ref["theta"].shape and r["n_steps"] == round(2.0 / eta)
        np.testing.assert_allclose(r["theta"][:, 0], ref["theta"][:, 0], rtol=1e-14)
        errs.append(bl.accuracy(r["theta"], ref["theta"]))
    assert 0 < errs[1] < errs[0] < 0.05, errs
    assert 1.7 < errs[0] / errs[1] < 2.3, errs


def test_gradient_descent_needs_whole_steps(work):
    with pytest.raises(ValueError, match="whole numbers of steps"):
        bl.gradient_descent(work, eta=0.3)


def test_sweep_bench_script_writes_its_json(tmp_path):
    """benchmarks/sweep_bench.py end to end at a tiny size: the engine row is accurate and the
    JSON carries the machine, the ratios and every method's accuracy."""
    import json

    import sweep_bench as sb

    out = tmp_path / "bench.json"
    sb.main(["--B", "4", "--n", "5", "--d", "12", "--T", "2", "--lanes", "2",
             "--skip", "scipy", "torchdiffeq", "gradient_descent", "--json", str(out)])
    res = json.loads(out.read_text())
    rows = {r["name"]: r for r in res["results"]}
    # The README's requirement, 1e-5; every row's `accurate` flag says whether it met it.
    assert rows["engine_lanes2"]["rel_err"] <= 1e-5
    for r in rows.values():
        if "rel_err" in r:
            assert r["accurate"] == (r["rel_err"] <= res["accuracy_required"]), r["name"]
    assert 0 < rows["engine_lanes2"]["lane_efficiency"] <= 1
    assert "plain_vmap_over_engine" in res["ratios"]
    assert res["machine"]["jax_backend"] == jax.default_backend()
