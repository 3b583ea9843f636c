"""Convergence bounds, in the form a simulation can be held to (docs/math.md, "Convergence
bounds").

- The PL rate: f(θ(t)) − f* ≤ (f(θ0) − f*)·e^{−2μ c0 t}, with c0 = min_i ∏_{j≠m} δ_{j,i} the
  smallest value the metric g takes along any flow.
- The sublinear rate: f(θ(t)) − f(θ*) ≤ D_Q(θ*, θ0)/t for any comparison point θ*.
- A report that puts one trajectory next to both and measures its late decay rate.

`c0`, `pl_bound`, `sublinear_bound` and `pl_estimate` are JAX computations (jit, vmap, grad);
`pl_constant` and `bound_report` are host-side summaries.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Scalar

from ._geometry import Geometry
from ._implicit_bias import _row_space, implicit_bias_limit
from ._init import check_assumption_a, check_init
from ._losses import LeastSquares, as_loss
from ._solution import Trajectory
from ._validate import as_float_array, is_tracer, positive_scalar


def pl_constant(loss) -> float:
    """The Polyak–Łojasiewicz constant μ: ½‖∇f(θ)‖² ≥ μ (f(θ) − f*) for every θ.

    For least squares f = (1/2n)‖Xθ − y‖² it is the smallest positive eigenvalue of XᵀX/n
    (λ_min(XXᵀ/n) when rank X = n). Losses without a global PL constant (logistic: on separable
    data inf f = 0 is not attained and ½‖∇f‖²/f → 0; callables: unknown) raise a `ValueError`;
    use [`ddln_jax.pl_estimate`][] for the constant along one trajectory. Host-side (an SVD of
    concrete data).

    **Arguments:**

    - `loss`: a ddln_jax loss.

    **Returns:** μ > 0 as a Python float.
    """
    loss = as_loss(loss)
    mu = loss.pl_constant()
    if mu is None:
        raise ValueError(
            f"`loss` ({type(loss).__name__}) has no known global PL constant, so the exponential "
            "bound does not apply; `pl_estimate(loss, trajectory)` measures ½‖∇f‖²/(f − f*) "
            "along a run, which gives a bound valid on that run's time window"
        )
    return float(mu)


class PLEstimate(eqx.Module):
    """The PL ratio along a trajectory ([`ddln_jax.pl_estimate`][]).

    **Fields:**

    - `ts`: save times; `ratio`: ½‖∇f(θ(t))‖²/(f(θ(t)) − f*) (NaN where f − f* is at the
      rounding floor or the save is missing).
    - `mu`: the smallest ratio over the valid saves (NaN when there is none): the exponential
      bound with this μ holds on the window of the run (the derivation only uses the
      inequality along the path).
    """

    ts: Float[Array, " n"]
    ratio: Float[Array, " n"]
    mu: Scalar


def _f_star(loss, f_star):
    """f* as given (a JAX scalar, possibly traced) or from the loss (host-side)."""
    if f_star is not None:
        return as_float_array("f_star", f_star, ndim=0)
    value = loss.minimum()
    if value is None:
        raise ValueError(
            f"`f_star` is required: `loss` ({type(loss).__name__}) does not know its minimum"
        )
    return jnp.asarray(value)


def _single_run(trajectory, name="trajectory"):
    """Check that `trajectory` is one run (vmap over a batch instead)."""
    if not isinstance(trajectory, Trajectory):
        raise TypeError(f"`{name}` must be a ddln_jax.Trajectory, got {type(trajectory).__name__}")
    if np.ndim(trajectory.loss) != 1:
        raise ValueError(
            f"`{name}` must be a single run (loss of shape (n,)), got a batch of shape "
            f"{np.shape(trajectory.loss)[:-1]}; select one with `trajectory[k]` (or jax.vmap "
            "over the batch where the function is a JAX computation)"
        )
    return trajectory


def pl_estimate(loss, trajectory, *, f_star=None, floor: float = 1e-12) -> PLEstimate:
    """Estimate the PL constant along a trajectory, for any loss.

    Works under `jax.jit` / `eqx.filter_jit` (pass `f_star` there when the loss's data are
    traced) and `jax.vmap` over a batch of runs.

    **Arguments:**

    - `loss`: the loss the trajectory was run on.
    - `trajectory`: one run of [`ddln_jax.simulate`][].
    - `f_star`: f* (default `loss.minimum()`; required when the loss does not know it).
    - `floor`: saves with f − f* ≤ `floor`·(f(θ0) − f*) are left out (rounding dominates there).

    **Returns:** a [`ddln_jax.PLEstimate`][].
    """
    loss = as_loss(loss)
    trajectory = _single_run(trajectory)
    f_star = _f_star(loss, f_star)
    theta = jnp.asarray(trajectory.theta)
    excess = jnp.asarray(trajectory.loss) - f_star
    # Missing saves (NaN after an early stop) are masked below; zeros keep the gradient finite.
    grads = jax.vmap(loss.grad)(jnp.where(jnp.isfinite(theta), theta, 0.0))
    half_sq = 0.5 * jnp.sum(grads**2, axis=-1)
    valid = jnp.isfinite(excess) & (excess > floor * excess[0])
    ratio = jnp.where(valid, half_sq / jnp.where(valid, excess, 1.0), jnp.nan)
    mu = jnp.min(jnp.where(valid, ratio, jnp.inf))
    mu = jnp.where(jnp.any(valid), mu, jnp.nan)
    return PLEstimate(ts=jnp.asarray(trajectory.ts), ratio=ratio, mu=mu)


def c0(u0: Float[Array, "*batch L d"]) -> Float[Array, "*batch"]:
    """c0 = min_i ∏_{j≠m_i} δ_{j,i}, the smallest value of the metric g along any flow.

    g_i(θ) = ∏_j (w² + δ_j)(1 + Σ_j w²/(w² + δ_j)) ≥ ∏_j δ_j (its value at θ_i = 0), so
    θ̇ = −g ⊙ ∇f makes f decay at least like e^{−2μ c0 t} (docs/math.md, "Convergence
    bounds"). It is 1 for L = 1 and 0 when Assumption A fails (the bound is then
    vacuous). Works under `jax.jit`, `jax.vmap` and `jax.grad`.

    **Arguments:**

    - `u0`: layers, shape `(L, d)` or with leading batch axes.

    **Returns:** c0, one per init.
    """
    if not is_tracer(u0):
        u0 = as_float_array("u0", u0)
        if u0.ndim < 2:
            raise ValueError(f"`u0` must have shape (..., L, d), got shape {tuple(u0.shape)}")
    sq = jnp.sort(u0**2, axis=-2)
    return jnp.min(jnp.prod(sq[..., 1:, :] - sq[..., :1, :], axis=-2), axis=-1)


def pl_bound(ts, excess0, mu, c0) -> Float[Array, "..."]:
    """The PL bound on f(θ(t)) − f*: (f(θ0) − f*)·e^{−2μ c0 t}.

    Broadcasts over its arguments; works under `jax.jit`, `jax.vmap` and `jax.grad`.
    """
    return excess0 * jnp.exp(-2 * mu * c0 * jnp.asarray(ts))


def sublinear_bound(ts, bregman0) -> Float[Array, "..."]:
    """The sublinear bound on f(θ(t)) − f(θ*): D_Q(θ*, θ0)/t (+inf at t = 0).

    It holds for every comparison point θ*: d/dt D_Q(θ*, θ(t)) = ⟨∇f(θ), θ* − θ⟩ ≤ f(θ*) − f(θ),
    integrate and use that f(θ(t)) decreases. Works under `jax.jit`, `jax.vmap` and `jax.grad`.
    """
    ts = jnp.asarray(ts)
    return jnp.where(ts > 0, bregman0 / jnp.where(ts > 0, ts, 1.0), jnp.inf)


def _intervals(ts, mask):
    """Maximal runs of consecutive saves where `mask` holds, as ((t_start, t_end), ...)."""
    out, start = [], None
    for t, m in zip(ts, mask):
        if m and start is None:
            start = last = float(t)
        elif m:
            last = float(t)
        elif start is not None:
            out.append((start, last))
            start = None
    if start is not None:
        out.append((start, last))
    return tuple(out)


class BoundReport(eqx.Module):
    """A trajectory next to the convergence bounds ([`ddln_jax.bound_report`][]).

    Bounds are on the excess f(θ(t)) − f*; a bound that does not apply has `*_applicable`
    False, NaN curves and the reason in `*_note` (never a silent number).

    **Fields:**

    - `ts`, `excess`: save times and f(θ(t)) − f* (NaN at missing saves).
    - `mu`, `c0`, `bound_rate` (= 2μc0): the PL constants; `pl`: the PL curve.
    - `theta_star`, `bregman0` (= D_Q(θ*, θ0)), `sublinear`: the 1/t curve (shifted by
      f(θ*) − f* if θ* is not a minimizer).
    - `pl_holds`, `sublinear_holds`: whether the excess stays below each bound (up to
      `allowance`·(f(θ0) − f*)) at every save; `pl_holds_on`, `sublinear_holds_on`: the time
      ranges where it does; `pl_tighter_on`, `sublinear_tighter_on`: where each bound is the
      smaller of the two.
    - `measured_rate`: the late-time exponential decay rate of the excess (a least-squares
      fit of log(excess) over the saves in the lower half, on a log scale, of the range it
      went through above `floor`); `rate_ratio`:
      measured_rate / bound_rate (≥ 1 when the bound holds; 1 = tight); `local_rate`:
      −d log(excess)/dt between consecutive saves.
    """

    ts: np.ndarray
    excess: np.ndarray
    mu: float
    c0: float
    bound_rate: float
    pl: np.ndarray
    pl_applicable: bool = eqx.field(static=True)
    pl_note: str = eqx.field(static=True)
    theta_star: np.ndarray | None
    bregman0: float
    sublinear: np.ndarray
    sublinear_applicable: bool = eqx.field(static=True)
    sublinear_note: str = eqx.field(static=True)
    pl_holds: bool = eqx.field(static=True)
    sublinear_holds: bool = eqx.field(static=True)
    pl_holds_on: tuple = eqx.field(static=True)
    sublinear_holds_on: tuple = eqx.field(static=True)
    pl_tighter_on: tuple = eqx.field(static=True)
    sublinear_tighter_on: tuple = eqx.field(static=True)
    measured_rate: float
    rate_ratio: float
    local_rate: np.ndarray


@jax.jit
def _bregman(u0, a, b):
    return Geometry(u0).bregman(a, b)


def _late_rate(ts, excess, floor):
    """Decay rate from a linear fit of log(excess) over the late saves: those in the lower
    half, on a log scale, of the range the excess went through above `floor` (there the
    slowest mode dominates). NaN with fewer than 3 such saves."""
    ok = np.isfinite(excess) & (excess > floor * excess[0]) & (excess > 0)
    idx = np.flatnonzero(ok)
    if idx.size < 3:
        return math.nan
    logs = np.log(excess[idx])
    late = idx[logs <= 0.5 * (logs[0] + logs[-1])]
    if late.size < 3:
        late = idx[-3:]
    slope = np.polyfit(ts[late], np.log(excess[late]), 1)[0]
    return float(-slope)


def bound_report(
    trajectory,
    loss,
    u0,
    *,
    mu=None,
    theta_star=None,
    f_star=None,
    allowance: float = 1e-9,
    floor: float = 1e-20,
) -> BoundReport:
    """Hold one trajectory to the PL and sublinear bounds, and measure its decay rate.

    Host-side: a summary of a finished run, in NumPy (not for `jax.jit`).

    **Arguments:**

    - `trajectory`: one run of [`ddln_jax.simulate`][] (its `ts`, `loss`).
    - `loss`: the loss it ran on; `u0`: its init, shape `(L, d)`.
    - `mu`: the PL constant (default [`ddln_jax.pl_constant`][]; when the loss has none the
      PL bound is marked not applicable; pass `pl_estimate(...).mu` to use the run's own).
    - `theta_star`: the comparison point of the 1/t bound. Default: for interpolating least
      squares the implicit-bias limit (the minimizer closest to θ0 in D_Q, hence the tightest
      bound), for other least squares the D_Q-closest least-squares solution; other losses
      need it passed (else the bound is marked not applicable).
    - `f_star`: f* (default `loss.minimum()`).
    - `allowance`: slack, relative to f(θ0) − f*, in the `*_holds` checks.
    - `floor`: saves with excess below `floor`·(f(θ0) − f*) are left out of the rate fit.

    **Returns:** a [`ddln_jax.BoundReport`][].
    """
    loss = as_loss(loss)
    trajectory = _single_run(trajectory)
    u0 = check_init(u0)
    ts = np.asarray(trajectory.ts, np.float64)
    f_star = float(_f_star(loss, f_star))
    theta0 = jnp.prod(u0, axis=0)
    excess0 = float(loss(theta0)) - f_star
    excess = np.asarray(trajectory.loss, np.float64) - f_star
    valid = np.isfinite(excess)
    slack = allowance * max(excess0, 0.0)

    # PL bound.
    c0_ = float(c0(u0))
    pl_note = ""
    if mu is None:
        try:
            mu = pl_constant(loss)
        except ValueError as e:
            mu, pl_note = math.nan, str(e)
    else:
        mu = positive_scalar("mu", mu)
    pl_applicable = bool(np.isfinite(mu))
    if pl_applicable and c0_ == 0:
        pl_note = "c0 = 0 (Assumption A fails): the PL bound is the constant f(θ0) − f*, vacuous"
    pl = np.asarray(pl_bound(ts, excess0, mu, c0_)) if pl_applicable else np.full_like(ts, np.nan)

    # Sublinear bound.
    sub_note = ""
    report_a = check_assumption_a(u0)
    theta_star_arr = None
    if not report_a.holds:
        sub_note = (
            f"`u0` violates Assumption A (ties at {report_a.tied[:10].tolist()}): D_Q(θ*, θ0) "
            "is not defined on ℝ^d, the 1/t bound does not apply"
        )
    elif theta_star is not None:
        theta_star_arr = np.asarray(as_float_array("theta_star", theta_star, ndim=1))
        if theta_star_arr.shape != (u0.shape[1],):
            raise ValueError(
                f"`theta_star` must have shape ({u0.shape[1]},), got {theta_star_arr.shape}"
            )
    elif isinstance(loss, LeastSquares):
        X, y = np.asarray(loss.X, np.float64), np.asarray(loss.y, np.float64)
        U, _, _, _ = _row_space(X, y, require_interpolation=False)
        y_fit = U @ (U.T @ y)  # the least-squares minimizers are {Xθ = Py}
        theta_star_arr = np.asarray(implicit_bias_limit(X, y_fit, u0).theta)
    else:
        sub_note = (
            f"`theta_star` is required for the 1/t bound on a {type(loss).__name__} loss "
            "(no minimizer is known)"
        )
    sub_applicable = theta_star_arr is not None
    if sub_applicable:
        bregman0 = float(_bregman(u0, jnp.asarray(theta_star_arr, u0.dtype), theta0))
        shift = float(loss(jnp.asarray(theta_star_arr))) - f_star
        sublinear = np.asarray(sublinear_bound(ts, bregman0)) + shift
    else:
        bregman0, sublinear = math.nan, np.full_like(ts, np.nan)

    pl_ok = valid & (excess <= pl + slack) if pl_applicable else np.zeros_like(valid)
    sub_ok = valid & (excess <= sublinear + slack) if sub_applicable else np.zeros_like(valid)
    both = valid & np.isfinite(pl) & np.isfinite(sublinear)
    measured = _late_rate(ts, excess, floor)
    bound_rate = 2 * mu * c0_
    with np.errstate(divide="ignore", invalid="ignore"):
        local = -np.diff(np.log(np.where(excess > 0, excess, np.nan))) / np.diff(ts)
        ratio = measured / bound_rate if bound_rate > 0 else math.nan
    return BoundReport(
        ts=ts, excess=excess, mu=float(mu), c0=c0_, bound_rate=float(bound_rate), pl=pl,
        pl_applicable=pl_applicable, pl_note=pl_note, theta_star=theta_star_arr,
        bregman0=bregman0, sublinear=sublinear, sublinear_applicable=sub_applicable,
        sublinear_note=sub_note,
        pl_holds=bool(pl_applicable and np.all(pl_ok[valid])),
        sublinear_holds=bool(sub_applicable and np.all(sub_ok[valid])),
        pl_holds_on=_intervals(ts, pl_ok), sublinear_holds_on=_intervals(ts, sub_ok),
        pl_tighter_on=_intervals(ts, both & (pl < sublinear)),
        sublinear_tighter_on=_intervals(ts, both & (sublinear <= pl)),
        measured_rate=measured, rate_ratio=float(ratio), local_rate=local,
    )
