"""Analysis of sweep datasets: `time_to_eps_table` on datasets with the schema of
`ddln_jax.sweep`, built from the theory tests' exact runs (tests/helpers.py)."""

import math

import numpy as np
import pytest
import xarray as xr
from helpers import ALPHAS, NT, B, D, long_runs, problem, run

import ddln_jax as dj
from ddln_jax import c0, pl_constant, time_to_eps_table, weighted_l1_interpolator


def _sweep_dataset(runs, alphas, stop_ratio=math.nan):
    """A dataset with the schema of `ddln_jax.sweep` from {L: [(X, y, u0 (B, L, d), Trajectory)
    per problem]} (one shape, one seed; the B inits are the α axis)."""
    depths = list(runs)
    n_problems = len(runs[depths[0]])
    ts = np.asarray(runs[depths[0]][0][3].ts[0])
    shape5 = (len(depths), n_problems, 1, B, 1)

    def per_run(fn):
        return np.array([[[fn(L, p, k) for k in range(B)] for p in range(n_problems)]
                         for L in depths]).reshape(*shape5, *np.shape(fn(depths[0], 0, 0)))

    tr = lambda L, p: runs[L][p][3]
    dims5 = ("depth", "problem", "shape", "alpha", "seed")
    Xs = [runs[depths[0]][p][0] for p in range(n_problems)]
    ys = [runs[depths[0]][p][1] for p in range(n_problems)]
    data = {
        "time_to_eps": (dims5, np.full(shape5, np.nan)),
        "f0": (dims5, per_run(lambda L, p, k: float(tr(L, p).loss[k, 0]))),
        "c0": (dims5, per_run(lambda L, p, k: float(c0(runs[L][p][2][k])))),
        "loss": ((*dims5, "time"), per_run(lambda L, p, k: np.asarray(tr(L, p).loss[k]))),
        "theta_final": ((*dims5, "coord"), per_run(lambda L, p, k: np.asarray(tr(L, p).theta_final[k]))),
        "X": (("problem", "row", "coord"), np.stack(Xs)),
        "y": (("problem", "row"), np.stack(ys)),
        "f_star": (("problem",), np.array([dj.LeastSquares(X, y).minimum() for X, y in zip(Xs, ys)])),
        "pl_mu": (("problem",), np.array([pl_constant(dj.LeastSquares(X, y)) for X, y in zip(Xs, ys)])),
    }
    coords = {"depth": depths, "problem": list(range(n_problems)), "shape": [1.0],
              "alpha": list(alphas), "seed": [0], "time": ts}
    ds = xr.Dataset(data, coords=coords, attrs={"spec": "{}"})
    if np.isfinite(stop_ratio):
        ds.attrs["stop_ratio"] = stop_ratio
    return ds


def _long_dataset():
    return _sweep_dataset({L: [(X, y, u0, tr) for X, y, _, u0, tr, _ in long_runs(L)]
                           for L in [1, 2, 3, 4, 5]}, ALPHAS)


def test_time_to_eps_table():
    """From a sweep-shaped dataset: time-to-ε read off the loss (bracketed by the saves around
    it), never above the PL prediction ln(1/ε)/(2μc0); `time_to_eps` passed through when ε is
    the sweep's stop ratio, and a coarser ε read from runs cut at their event; distances to the
    ℓ2/ℓ1 interpolators as computed by hand (pseudo-inverse, LP; 1e-10); a missing ε is an
    error."""
    ds = _long_dataset()
    with pytest.raises(ValueError, match="`eps` is required"):
        time_to_eps_table(ds)
    eps = 1e-6
    tab = time_to_eps_table(ds, eps=eps)
    meas = tab["time_to_eps"]
    assert bool(np.isfinite(meas).all())
    assert bool((meas <= tab["pl_time"]).all()) and float(tab["max_ratio"].max()) <= 1
    ts = ds["time"].values
    for L, p, k in [(1, 0, 0), (3, 2, 1), (5, 2, 3)]:
        sel = dict(depth=L, problem=p, shape=1.0, alpha=ALPHAS[k], seed=0)
        t = float(meas.sel(sel))
        exc = ds["loss"].sel(sel).values - float(ds["f_star"].sel(problem=p))
        target = eps * (float(ds["f0"].sel(sel)) - float(ds["f_star"].sel(problem=p)))
        i = np.searchsorted(ts, t)
        assert exc[i - 1] > target >= exc[i] and ts[i - 1] <= t <= ts[i]
        X, y = ds["X"].sel(problem=p).values, ds["y"].sel(problem=p).values
        th = ds["theta_final"].sel(sel).values
        l2 = np.linalg.pinv(X) @ y
        np.testing.assert_allclose(tab["dist_l2"].sel(sel), np.linalg.norm(th - l2) / np.linalg.norm(l2), rtol=1e-10)
        l1 = weighted_l1_interpolator(X, y)
        np.testing.assert_allclose(tab["dist_l1"].sel(sel), np.abs(th - l1).sum() / np.abs(l1).sum(), rtol=1e-10)
    assert set(tab["median_time_to_eps"].dims) == {"depth", "shape", "alpha"}
    assert float(tab["reached_fraction"].min()) == 1.0
    # A finer ε takes longer; with ε = the sweep's stop ratio its `time_to_eps` is used as is.
    assert bool((time_to_eps_table(ds, eps=1e-8)["time_to_eps"] > meas).all())
    ds2 = ds.assign(time_to_eps=meas.transpose(*ds["time_to_eps"].dims))
    ds2.attrs["stop_ratio"] = eps
    np.testing.assert_array_equal(time_to_eps_table(ds2)["time_to_eps"], meas)
    # As the sweep stores a stopped run: NaN saves after its event. A coarser ε is read off the
    # saves plus the event point: the same as from the full record where saves bracket it,
    # never later than the event.
    ds2["loss"] = ds2["loss"].where(ds2["time"] <= meas)
    coarse = time_to_eps_table(ds2, eps=1e-4)["time_to_eps"]
    full = time_to_eps_table(ds, eps=1e-4)["time_to_eps"]
    assert bool(np.isfinite(coarse).all()) and bool((coarse <= meas).all())
    np.testing.assert_allclose(coarse, full, rtol=0.05)
    assert float((abs(coarse - full) <= 1e-12 * full).mean()) >= 0.5


def test_pl_time_is_attained_on_the_slowest_mode():
    """L = 1 from θ0 = 0 with y along the smallest singular direction of X: f − f* decays
    exactly like e^{−2μt}, so the time-to-ε read off the simulated loss equals the PL time
    ln(1/ε)/(2μc0) (ratio 1 to 1e-7, c0 = 1). With c0 = 0 (no Assumption A) the PL time is
    +inf and the ratio 0; without a PL constant both are NaN, and the other runs keep theirs."""
    X, _, _ = problem(3)
    U, _, _ = np.linalg.svd(X, full_matrices=False)
    y = U[:, -1] * 3.0
    loss = dj.LeastSquares(X, y)
    u0 = np.zeros((B, 1, D))
    tr = run(loss, u0, np.linspace(0.0, 10.0 / pl_constant(loss), NT))
    ds = _sweep_dataset({1: [(X, y, u0, tr)]}, [1.0, 2.0, 3.0, 4.0])
    tab = time_to_eps_table(ds, eps=1e-6)
    np.testing.assert_allclose(tab["ratio"], 1.0, rtol=1e-7)
    np.testing.assert_allclose(tab["time_to_eps"], math.log(1e6) / (2 * np.linalg.eigvalsh(X @ X.T / 6)[0]), rtol=1e-7)

    ds["c0"][0, 0, 0, 1, 0] = 0.0
    ds2 = ds.assign(pl_mu=ds["pl_mu"] * np.nan)
    tab = time_to_eps_table(ds, eps=1e-6)
    ratio, pl_time = tab["ratio"].values.ravel(), tab["pl_time"].values.ravel()
    assert np.isinf(pl_time[1]) and ratio[1] == 0.0
    np.testing.assert_allclose(np.delete(ratio, 1), 1.0, rtol=1e-7)
    tab2 = time_to_eps_table(ds2, eps=1e-6)
    assert np.all(np.isnan(tab2["pl_time"])) and np.all(np.isnan(tab2["ratio"]))
    assert bool(np.isfinite(tab2["time_to_eps"]).all())


def test_bad_input_is_refused():
    with pytest.raises(TypeError, match=r"`ds` must be an xarray.Dataset"):
        time_to_eps_table({"a": 1})
    ds = xr.Dataset({"c0": ("x", [1.0])})
    with pytest.raises(ValueError, match=r"`ds` lacks the sweep variables \['f0', 'f_star', 'pl_mu'\]"):
        time_to_eps_table(ds, eps=1e-3)
