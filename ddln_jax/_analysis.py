"""Analysis of sweep datasets: time-to-ε next to the PL prediction, and where each run's limit
lands between the ℓ2 (kernel) and ℓ1 (rich) interpolators (docs/math.md, "Results").

Host-side: it reads an `xarray.Dataset` written by `ddln_jax.sweep`.
"""

from __future__ import annotations

import math

import numpy as np

from ._implicit_bias import _row_space, weighted_l1_interpolator
from ._validate import positive_scalar


def time_to_eps_table(ds, *, eps=None):
    """Time-to-ε of a sweep next to the PL prediction, and where each limit lands.

    Host-side (xarray and NumPy on a stored sweep).

    **Arguments:**

    - `ds`: the `xarray.Dataset` of `ddln_jax.sweep` (dims depth, problem, shape, alpha, seed,
      time, coord, row; variables `time_to_eps`, `status`, `f0`, `c0`, `loss`, `theta_final`,
      `X`, `y`, `f_star`, `pl_mu`; attribute `stop_ratio`).
    - `eps`: the ratio ε of (f − f*)/(f(θ0) − f*) (default: the sweep's `stop_ratio`). When it
      differs from `stop_ratio`, or the sweep had no stop criterion, time-to-ε is read off the
      saved `loss` (first crossing, interpolated in log(f − f*) between saves, the event time
      of a stopped run counting as one more save); ε below `stop_ratio` cannot be read (NaN).

    **Returns:** an `xarray.Dataset` with, per run (depth, problem, shape, alpha, seed):
    `time_to_eps` (NaN when not reached), `pl_time` = ln(1/ε)/(2μc0) (the PL bound on it: +inf
    when c0 = 0, NaN when the problem has no PL constant), `ratio` = time_to_eps/pl_time (≤ 1
    when the bound holds), `dist_l2` = ‖θ_final − X⁺y‖/‖X⁺y‖ (small in the kernel regime) and
    `dist_l1` = ‖θ_final − θ_ℓ1‖₁/‖θ_ℓ1‖₁ (θ_ℓ1 the minimum-ℓ1 interpolator; small in the rich
    regime); and per (depth, shape, alpha), over problems and seeds: `median_time_to_eps`,
    `median_pl_time`, `reached_fraction`, `max_ratio`. Attribute `eps`.
    """
    import xarray as xr

    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"`ds` must be an xarray.Dataset (a sweep), got {type(ds).__name__}")
    need = {"c0", "f0", "pl_mu", "f_star"}
    missing = sorted(need - set(ds.variables))
    if missing:
        raise ValueError(f"`ds` lacks the sweep variables {missing}")
    stop = float(ds.attrs.get("stop_ratio", math.nan))
    if eps is None:
        if not np.isfinite(stop):
            raise ValueError(
                "`eps` is required: the sweep had no stop criterion (attribute stop_ratio is "
                f"{ds.attrs.get('stop_ratio', 'absent')})"
            )
        eps = stop
    eps = positive_scalar("eps", eps)
    if eps >= 1:
        raise ValueError(f"`eps` must be in (0, 1), got {eps}")

    f_star = ds["f_star"].fillna(0.0)
    if np.isfinite(stop) and math.isclose(eps, stop, rel_tol=1e-12) and "time_to_eps" in ds:
        measured = ds["time_to_eps"]
    else:
        if "loss" not in ds or "time" not in ds.coords:
            raise ValueError("`ds` has no saved `loss` over `time` to read time-to-ε from")
        target = f_star + eps * (ds["f0"] - f_star)
        # A run stopped by the sweep's event also knows one more point: f − f* = stop·(f0 − f*)
        # at t = time_to_eps, after its last save.
        if np.isfinite(stop) and "time_to_eps" in ds:
            t_event = ds["time_to_eps"]
            e_event = (stop * (ds["f0"] - f_star)).where(np.isfinite(t_event))
        else:
            t_event = e_event = xr.full_like(ds["f0"], np.nan)
        measured = xr.apply_ufunc(
            _first_crossing, ds["loss"] - f_star, target - f_star, t_event, e_event,
            kwargs={"ts": np.asarray(ds["time"], np.float64)},
            input_core_dims=[["time"], [], [], []], vectorize=True,
        )
    rate = 2 * ds["pl_mu"] * ds["c0"]
    pl_time = xr.where(rate > 0, math.log(1 / eps) / rate.where(rate > 0, 1.0), np.inf)
    pl_time = pl_time.where(np.isfinite(ds["pl_mu"]))
    ratio = measured / pl_time

    out = xr.Dataset({"time_to_eps": measured, "pl_time": pl_time, "ratio": ratio})
    if "theta_final" in ds and "X" in ds and "y" in ds:
        l2, l1 = [], []
        for p in ds["problem"].values:
            X = np.asarray(ds["X"].sel(problem=p), np.float64)
            y = np.asarray(ds["y"].sel(problem=p), np.float64)
            U, s, Vt, b = _row_space(X, y, require_interpolation=False)
            l2.append(Vt.T @ b)
            try:
                l1.append(weighted_l1_interpolator(X, y))
            except ValueError:  # not interpolating: no ℓ1 interpolator
                l1.append(np.full(X.shape[1], np.nan))
        dims = ("problem", "coord")
        ref2 = xr.DataArray(np.stack(l2), dims=dims, coords={"problem": ds["problem"]})
        ref1 = xr.DataArray(np.stack(l1), dims=dims, coords={"problem": ds["problem"]})
        th = ds["theta_final"]
        out["dist_l2"] = np.sqrt(((th - ref2) ** 2).sum("coord")) / np.sqrt((ref2**2).sum("coord"))
        out["dist_l1"] = abs(th - ref1).sum("coord") / abs(ref1).sum("coord")
    over = [dim for dim in ("problem", "seed") if dim in measured.dims]
    out["median_time_to_eps"] = measured.median(over, skipna=True)
    out["median_pl_time"] = pl_time.median(over, skipna=True)
    out["reached_fraction"] = np.isfinite(measured).mean(over)
    out["max_ratio"] = ratio.max(over, skipna=True)
    out.attrs["eps"] = eps
    return out


def _first_crossing(excess, target, t_event, e_event, ts):
    """First time excess ≤ target, interpolated in log(excess) between saves (and the event
    point (t_event, e_event) when given); NaN if never (host, 1-D)."""
    ok = np.isfinite(excess)
    ts, excess = ts[ok], excess[ok]
    if np.isfinite(t_event) and np.isfinite(e_event) and (ts.size == 0 or t_event > ts[-1]):
        ts, excess = np.append(ts, t_event), np.append(excess, e_event)
    below = excess <= target
    if not below.any():
        return np.nan
    k = int(np.argmax(below))
    if k == 0:
        return float(ts[0])
    e0, e1 = excess[k - 1], excess[k]
    if not (e0 > 0 and e1 > 0 and target > 0):
        return float(ts[k])
    frac = (np.log(e0) - np.log(target)) / (np.log(e0) - np.log(e1))
    return float(ts[k - 1] + frac * (ts[k] - ts[k - 1]))


