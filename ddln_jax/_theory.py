"""Predictions of the theory, in the form simulations can be held to (MATH.md §5–6).

- Convergence bounds: the PL rate f − f* ≤ (f(θ0) − f*)e^{−2μc0t} with c0 = min_i ∏_{j≠m} δ_{j,i}
  (g_i ≥ c0 along the flow), the sublinear rate f − f* ≤ D_Q(θ*, θ0)/t, and a report that
  puts a trajectory next to both.
- Small initializations: Φ(∞) and c_L, the escape time from the saddle at 0, the scalar
  problem's exact hitting time by quadrature.
- Depth × scale: time-to-ε of a sweep next to the PL prediction ln(1/ε)/(2μc0).
- Saddle-to-saddle (L = 2, α → 0): rescaled time t/log(1/α), plateaus and jumps.

The implicit-bias limit and the LP/kernel limits live in `_implicit_bias.py`.
Functions that are JAX computations work under `jax.jit`/`jax.vmap` (validation runs only on
concrete inputs); the reports are host-side summaries of finished runs.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, Scalar

from ._geometry import _W, _X, Geometry, _psi, _psi_inv, _quad_integrand
from ._implicit_bias import ImplicitBias as ImplicitBias  # re-exported with the theory
from ._implicit_bias import LimitStatus as LimitStatus
from ._implicit_bias import _row_space
from ._implicit_bias import implicit_bias_limit as implicit_bias_limit
from ._implicit_bias import kernel_limit as kernel_limit
from ._implicit_bias import small_init_limit as small_init_limit
from ._implicit_bias import weighted_l1_interpolator as weighted_l1_interpolator
from ._init import check_assumption_a, check_init
from ._losses import LeastSquares, as_loss
from ._simulate import Trajectory
from ._validate import as_float_array, is_tracer, positive_scalar

# ---------------------------------------------------------------------------------------------
# 1. Convergence bounds


def pl_constant(loss) -> float:
    """The Polyak–Łojasiewicz constant μ: ½‖∇f(θ)‖² ≥ μ (f(θ) − f*) for every θ.

    For least squares f = (1/2n)‖Xθ − y‖² it is the smallest positive eigenvalue of XᵀX/n
    (λ_min(XXᵀ/n) when rank X = n). Losses without a global PL constant (logistic: on separable
    data inf f = 0 is not attained and ½‖∇f‖²/f → 0; callables: unknown) raise a `ValueError`;
    use [`ddln_jax.pl_estimate`][] for the constant along one trajectory.

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
    - `mu`: the smallest ratio over the valid saves: the exponential bound with this μ holds on
      the window of the run (the derivation only uses the inequality along the path).
    """

    ts: Float[Array, " n"]
    ratio: Float[Array, " n"]
    mu: Scalar


def _f_star(loss, f_star):
    if f_star is not None:
        value = np.asarray(as_float_array("f_star", f_star, ndim=0))
        return float(value)
    value = loss.minimum()
    if value is None:
        raise ValueError(
            f"`f_star` is required: `loss` ({type(loss).__name__}) does not know its minimum"
        )
    return float(value)


def _single_run(trajectory, name="trajectory"):
    if not isinstance(trajectory, Trajectory):
        raise TypeError(f"`{name}` must be a ddln_jax.Trajectory, got {type(trajectory).__name__}")
    if np.ndim(trajectory.loss) != 1:
        raise ValueError(
            f"`{name}` must be a single run (loss of shape (n,)), got a batch of shape "
            f"{np.shape(trajectory.loss)[:-1]}; select one with "
            "jax.tree_util.tree_map(lambda x: x[k], trajectory)"
        )
    return trajectory


def pl_estimate(loss, trajectory, *, f_star=None, floor: float = 1e-12) -> PLEstimate:
    """Estimate the PL constant along a trajectory, for any loss.

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
    grads = jax.vmap(loss.grad)(jnp.nan_to_num(theta))
    half_sq = 0.5 * jnp.sum(grads**2, axis=-1)
    valid = jnp.isfinite(excess) & (excess > floor * excess[0])
    ratio = jnp.where(valid, half_sq / jnp.where(valid, excess, 1.0), jnp.nan)
    mu = jnp.nanmin(ratio) if bool(jnp.any(valid)) else jnp.asarray(jnp.nan, excess.dtype)
    return PLEstimate(ts=jnp.asarray(trajectory.ts), ratio=ratio, mu=mu)


def c0(u0: Float[Array, "*batch L d"]) -> Float[Array, "*batch"]:
    """c0 = min_i ∏_{j≠m_i} δ_{j,i}, the smallest value of the metric g along any flow.

    g_i(θ) = ∏_j (w² + δ_j)(1 + Σ_j w²/(w² + δ_j)) ≥ ∏_j δ_j (its value at θ_i = 0), so
    θ̇ = −g ⊙ ∇f makes f decay at least like e^{−2μ c0 t} (MATH.md §5.4). It is 1 for L = 1 and
    0 when Assumption A fails (the bound is then vacuous). Works under `jax.jit`/`jax.vmap`.

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
    """The PL bound on f(θ(t)) − f*: (f(θ0) − f*)·e^{−2μ c0 t} (broadcasts; jittable)."""
    return excess0 * jnp.exp(-2 * mu * c0 * jnp.asarray(ts))


def sublinear_bound(ts, bregman0) -> Float[Array, "..."]:
    """The sublinear bound on f(θ(t)) − f(θ*): D_Q(θ*, θ0)/t (+inf at t = 0; jittable).

    It holds for every comparison point θ*: d/dt D_Q(θ*, θ(t)) = ⟨∇f(θ), θ* − θ⟩ ≤ f(θ*) − f(θ),
    integrate and use that f(θ(t)) decreases.
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
    f_star = _f_star(loss, f_star)
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


# ---------------------------------------------------------------------------------------------
# 3. Small initializations


def phi_inf_constant(L: int) -> float:
    """c_L with Φ(∞) = c_L α^{−(L−2)} for the zero-first init (MATH.md §3).

    c_L = ∫_0^∞ (r² + 1)^{−(L−1)/2} dr = (√π/2) Γ((L−2)/2)/Γ((L−1)/2): c_3 = π/2, c_4 = 1,
    c_5 = π/4, c_6 = 2/3. Defined for L ≥ 3 (for L ≤ 2, Φ(∞) = ∞).
    """
    if isinstance(L, bool) or not isinstance(L, (int, np.integer)):
        raise TypeError(f"`L` must be an integer, got {L!r}")
    if L < 3:
        raise ValueError(f"`L` must be ≥ 3 (Φ(∞) is infinite for L ≤ 2), got {L}")
    return math.sqrt(math.pi) / 2 * math.gamma((L - 2) / 2) / math.gamma((L - 1) / 2)


def phi_inf(u0: Float[Array, "L d"]) -> Float[Array, " d"]:
    """Φ_i(∞) = ∫_0^∞ dr/∏_{j≠m}√(r² + δ_{j,i}) per coordinate: the half-width of the dual box
    for L ≥ 3 (+inf for L ≤ 2). Needs Assumption A (checked on concrete input); jittable."""
    if not is_tracer(u0):
        u0 = check_init(u0)
        report = check_assumption_a(u0)
        if not report.holds:
            raise ValueError(
                f"`u0` violates Assumption A (ties at coordinates {report.tied[:10].tolist()}): "
                "Φ(∞) needs a unique smallest layer"
            )
    return _phi_inf_jit(u0)


@jax.jit
def _phi_inf_jit(u0):
    return Geometry(u0).phi_inf


class EscapePrediction(eqx.Module):
    """Predicted escape times from the saddle at 0 ([`ddln_jax.predict_escape_time`][]).

    **Fields:**

    - `times`: per coordinate, when η_i = ∇Q(θ)_i, moving at the frozen speed |∂_i f(θ0)|,
      reaches the face of the box (L ≥ 3) or log-scale (L = 2); +inf where ∂_i f(θ0) = 0, NaN
      where the small-init picture does not apply (L = 2 with δ_i ≥ 1).
    - `first`: the first escape, min_i `times`; `coordinate`: which coordinate escapes first.
    """

    times: Float[Array, "*batch d"]
    first: Float[Array, "*batch"]
    coordinate: Int[Array, "*batch"]


def _escape_times(loss, u0):
    geom = Geometry(u0)
    theta0 = jnp.prod(u0, axis=0)
    grad = loss.grad(theta0)
    speed = jnp.abs(grad)
    toward = -jnp.sign(grad)  # the face η_i moves to
    eta0 = geom.grad_Q(theta0)
    if u0.shape[0] >= 3:
        distance = geom.phi_inf - toward * eta0
    else:
        # L = 2: θ_i = (δ/2)sinh(2η_i) is of order 1 once η_i ≈ ½ log(1/δ_i).
        distance = 0.5 * jnp.log(1 / geom.delta[0]) - toward * eta0
        distance = jnp.where(distance > 0, distance, jnp.nan)
    times = jnp.where(speed > 0, distance / jnp.where(speed > 0, speed, 1.0), jnp.inf)
    k = jnp.argmin(jnp.where(jnp.isnan(times), jnp.inf, times))
    return EscapePrediction(times=times, first=times[k], coordinate=k)


def predict_escape_time(loss, u0) -> EscapePrediction:
    """The time a small init spends at the saddle θ = 0 before its first coordinate escapes.

    Near 0 the gradient is frozen at ∇f(θ0), so η(t) = ∇Q(θ0) − t∇f(θ0) moves in a straight line
    and θ_i = ∇Q*_i(η_i) stays tiny until η_i reaches ±Φ_i(∞) (L ≥ 3), where θ_i blows up:

        t_i = (Φ_i(∞) − s_i ∇Q(θ0)_i)/|∂_i f(θ0)|,   s_i = −sign ∂_i f(θ0),

    which is Φ_i(∞)/|∂_i f(θ0)| when ∇Q(θ0) = 0 (zero-first init; MATH.md §5.5). For random
    inits ∇Q(θ0) is of the same order as Φ(∞) and must be kept. The relative error is
    O(α^{L−2}). For L = 2 the box is unbounded and θ_i ≈ (δ_i/4)e^{2η_i} becomes of order one
    at η_i ≈ ½ log(1/δ_i): t_i = (½ log(1/δ_i) − s_i ∇Q(θ0)_i)/|∂_i f(θ0)|, i.e.
    log(1/α)/|∂_i f(θ0)| for the zero-first init, with an O(1/log(1/α)) relative error.
    Works under `jax.jit`/`jax.vmap`.

    **Arguments:**

    - `loss`: a ddln_jax loss (or a callable f(θ)).
    - `u0`: a small init, shape `(L, d)` with L ≥ 2, satisfying Assumption A.

    **Returns:** an [`ddln_jax.EscapePrediction`][].
    """
    loss = as_loss(loss)
    if not is_tracer(u0):
        u0 = check_init(u0)
        if u0.shape[0] < 2:
            raise ValueError(
                f"`u0` has L = {u0.shape[0]} layer: L = 1 is plain gradient flow, with no saddle "
                "at 0 to escape from"
            )
        report = check_assumption_a(u0)
        if not report.holds:
            raise ValueError(
                f"`u0` violates Assumption A (ties at coordinates {report.tied[:10].tolist()}): "
                "the escape prediction uses ∇Q(θ0) and Φ(∞), which need a unique smallest layer"
            )
    return _escape_times_jit(loss, u0)


_escape_times_jit = eqx.filter_jit(_escape_times)


def measure_escape_time(trajectory, threshold) -> Float[Array, "*batch"]:
    """The first time max_i |θ_i(t) − θ_i(0)| reaches `threshold`, from the saved θ.

    Between the two saves that bracket the crossing the deviation is interpolated linearly in
    its logarithm (it grows like an exponential or a power near an escape). NaN when the
    threshold is not reached within the saves. Works on batched trajectories and under
    `jax.jit`.

    **Arguments:**

    - `trajectory`: a run (or batch) of [`ddln_jax.simulate`][]; save densely around the escape.
    - `threshold`: the deviation that counts as escaped (> 0), e.g. a tenth of the scale of
      the solution.

    **Returns:** the escape time(s), one per run.
    """
    if not is_tracer(threshold):
        threshold = positive_scalar("threshold", threshold)
    ts = jnp.asarray(trajectory.ts)
    theta = jnp.asarray(trajectory.theta)
    dev = jnp.max(jnp.abs(theta - theta[..., :1, :]), axis=-1)
    dev = jnp.where(jnp.isfinite(dev), dev, 0.0)
    above = dev >= threshold
    k = jnp.argmax(above, axis=-1)
    found = jnp.any(above, axis=-1) & (k > 0)
    km = jnp.maximum(k - 1, 0)
    take = lambda x, i: jnp.take_along_axis(x, i[..., None], axis=-1)[..., 0]
    tsb = jnp.broadcast_to(ts, dev.shape)
    t0, t1 = take(tsb, km), take(tsb, k)
    d0, d1 = take(dev, km), take(dev, k)
    tiny = jnp.finfo(dev.dtype).tiny
    l0, l1, lt = jnp.log(jnp.maximum(d0, tiny)), jnp.log(jnp.maximum(d1, tiny)), jnp.log(threshold)
    frac = jnp.where(l1 > l0, (lt - l0) / jnp.where(l1 > l0, l1 - l0, 1.0), 1.0)
    return jnp.where(found, t0 + jnp.clip(frac, 0, 1) * (t1 - t0), jnp.nan)


def scalar_hitting_time(u0, target=0.5) -> Scalar:
    """Exact time for the scalar problem f(θ) = ½(θ − 1)² to bring θ from θ0 to `target`.

    The reduced flow ẇ = ∏_j√(w² + δ_j)·(1 − ψ(w)) separates:
    T = ∫_{w0}^{w*} dw / (∏_j√(w² + δ_j)(1 − ψ(w))), w* = ψ⁻¹(target), computed by composite
    Gauss–Legendre quadrature after the substitution w = √δ₁ sinh s (δ₁ the smallest gap), or
    w = e^v when δ₁ = 0 (a tie, e.g. the balanced init, where θ keeps its sign). Small inits
    need T ≈ Φ(∞) (zero-first: c_L α^{−(L−2)}; balanced: α^{−(L−2)}/(L−2)).
    Works under `jax.jit`/`jax.vmap`; +inf when θ cannot reach the target (θ0 = 0 at a tie).

    **Arguments:**

    - `u0`: the layers of the one-coordinate network, shape `(L,)` or `(L, 1)`.
    - `target`: the level to reach, θ0 < target < 1.

    **Returns:** the hitting time T.
    """
    if not is_tracer(u0):
        u0 = as_float_array("u0", u0, ndim=(1, 2))
        if u0.ndim == 2 and u0.shape[1] != 1:
            raise ValueError(f"`u0` must have shape (L,) or (L, 1), got {tuple(u0.shape)}")
        u0 = check_init(u0.reshape(-1, 1))[:, 0]
    if not is_tracer(u0) and not is_tracer(target):
        target = float(target)
        theta0 = float(jnp.prod(u0))
        if not theta0 < target < 1:
            raise ValueError(
                f"`target` must lie in (θ0, 1) = ({theta0:.6g}, 1) for f = ½(θ − 1)², got {target}"
            )
    u0 = jnp.asarray(u0).reshape(-1)
    return _scalar_time(u0, jnp.asarray(target, u0.dtype))


@jax.jit
def _scalar_time(u0, target):
    L = u0.shape[0]
    theta0 = jnp.prod(u0)
    if L == 1:
        return jnp.log((1 - theta0) / (1 - target))
    geom = Geometry(u0[:, None], require_assumption_a=False)
    # Under jit a tie can come out as a gap of −1e-18 (u² rounded two ways): clamp, and call
    # gaps at rounding level ties (the two substitutions agree to rounding there).
    delta = jnp.maximum(geom.delta[:, 0], 0.0)
    w0 = geom.reduce(u0[:, None])[0]
    d1 = delta[0]
    tie = d1 <= 8 * jnp.finfo(u0.dtype).eps * jnp.max(u0**2)
    x = jnp.asarray(_X, u0.dtype)
    wts = jnp.asarray(_W, u0.dtype)

    w_star = _psi_inv(target[None], delta[:, None])[0]

    # Smooth substitution for a positive smallest gap.
    sd1 = jnp.sqrt(jnp.where(tie, 1.0, d1))
    s0, s1 = jnp.arcsinh(w0 / sd1), jnp.arcsinh(w_star / sd1)
    s = s0 + (s1 - s0) * x
    ws = sd1 * jnp.sinh(s)
    k = _quad_integrand(s, jnp.where(tie, 1.0, delta))
    f_sinh = (s1 - s0) * jnp.sum(wts * k / (1 - _psi(ws[None], delta[:, None])[0]))

    # A tie: θ keeps its sign; w = e^v, dw/∏√(w² + δ_j) = dv/∏_{j≥2}√(e^{2v} + δ_j).
    wpos = jnp.where(w0 > 0, w0, 1.0)
    v0, v1 = jnp.log(wpos), jnp.log(w_star)
    v = v0 + (v1 - v0) * x
    ev = jnp.exp(v)
    k_tie = jnp.prod(jax.lax.rsqrt(ev[None, :] ** 2 + delta[1:, None]), axis=0)
    f_log = (v1 - v0) * jnp.sum(wts * k_tie / (1 - _psi(ev[None], delta[:, None])[0]))
    return jnp.where(tie, jnp.where(w0 > 0, f_log, jnp.inf), f_sinh)


# ---------------------------------------------------------------------------------------------
# 4. Depth × scale


def time_to_eps_table(ds, *, eps=None):
    """Time-to-ε of a sweep next to the PL prediction, and where each limit lands.

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


# ---------------------------------------------------------------------------------------------
# 5. Saddle-to-saddle (L = 2, small α)


def rescaled_time(ts, alpha) -> Float[Array, "..."]:
    """t̃ = t/log(1/α), the clock on which small-α depth-2 flows jump between saddles."""
    if not is_tracer(alpha):
        alpha = positive_scalar("alpha", alpha)
        if alpha >= 1:
            raise ValueError(f"`alpha` must be in (0, 1) for the rescaled time, got {alpha}")
    return jnp.asarray(ts) / jnp.log(1 / alpha)


def predict_first_jump(loss, theta0=None) -> Scalar:
    """The first jump of the saddle-to-saddle dynamics in rescaled time: 1/‖∇f(θ0)‖∞.

    (Pesme & Flammarion 2023, L = 2, α → 0: the coordinate with the largest |∂_i f(0)| is the
    first to reach log(1/α) in η.) θ0 defaults to 0; jittable.
    """
    loss = as_loss(loss)
    if theta0 is None:
        if loss.dim is None:
            raise ValueError("`theta0` is required: the loss does not know its dimension")
        theta0 = jnp.zeros(loss.dim)
    return 1 / jnp.max(jnp.abs(loss.grad(jnp.asarray(theta0))))


class SaddleToSaddle(eqx.Module):
    """Plateaus and jumps of a small-α trajectory ([`ddln_jax.detect_saddles`][]).

    **Fields:**

    - `rescaled_ts`: t̃ = t/log(1/α) at the saves; `rate`: −d log(f − f*)/dt̃ between saves.
    - `plateaus`: (k, 2) array of rescaled intervals where the rate stays below `threshold`;
      `plateau_levels`: f − f* at the middle of each plateau.
    - `jumps`: (m, 2) array of rescaled intervals between plateaus; `jump_times`: where
      log(f − f*) crosses the midpoint of the levels on either side.
    - `first_jump`: `jump_times[0]` (NaN when no jump was seen).
    """

    rescaled_ts: np.ndarray
    rate: np.ndarray
    plateaus: np.ndarray
    plateau_levels: np.ndarray
    jumps: np.ndarray
    jump_times: np.ndarray
    first_jump: float


def detect_saddles(
    trajectory,
    alpha,
    *,
    f_star: float = 0.0,
    threshold: float = 1.0,
    min_length: float = 0.05,
    floor: float = 1e-10,
) -> SaddleToSaddle:
    """Find the plateaus and jumps of a small-initialization trajectory in rescaled time.

    As α → 0 the loss is piecewise constant in t̃ = t/log(1/α): on a plateau its log-rate
    −d log(f − f*)/dt̃ is exponentially small, during a jump it is of order log(1/α). Saves
    where the rate is below `threshold` are plateau, the rest jump; plateaus shorter than
    `min_length` are merged into the surrounding jump. Once f − f* is below `floor`·(f(θ0) − f*)
    the run has converged and is not looked at.

    **Arguments:**

    - `trajectory`: one run of [`ddln_jax.simulate`][] with dense saves in t̃ (a few hundred
      per unit).
    - `alpha`: the init scale, 0 < α < 1.
    - `f_star`: f* (default 0, interpolation).
    - `threshold`, `min_length`, `floor`: detection parameters (rescaled units).

    **Returns:** a [`ddln_jax.SaddleToSaddle`][].
    """
    trajectory = _single_run(trajectory)
    threshold = positive_scalar("threshold", threshold)
    min_length = positive_scalar("min_length", min_length, allow_zero=True)
    tt = np.asarray(rescaled_time(np.asarray(trajectory.ts, np.float64), alpha))
    excess = np.asarray(trajectory.loss, np.float64) - f_star
    ok = np.isfinite(excess) & (excess > floor * excess[0])
    last = int(np.argmin(ok)) if not ok.all() else len(ok)
    tt, excess = tt[:last], excess[:last]
    if tt.size < 3:
        raise ValueError("`trajectory` has fewer than 3 usable saves; save more densely")
    log_e = np.log(excess)
    rate = -np.diff(log_e) / np.diff(tt)
    flat = rate < threshold  # per save interval
    # Runs of flat intervals → plateaus (in save indices [a, b]).
    runs, start = [], None
    for i, f in enumerate(flat):
        if f and start is None:
            start = i
        if not f and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(flat)))
    runs = [r for r in runs if tt[r[1]] - tt[r[0]] >= min_length or r[0] == 0]
    plateaus = np.array([(tt[a], tt[b]) for a, b in runs]).reshape(-1, 2)
    levels = np.array([excess[(a + b) // 2] for a, b in runs])
    jumps, jump_times = [], []
    for (a0, b0), nxt in zip(runs, [*runs[1:], None]):
        a1 = nxt[0] if nxt is not None else len(tt) - 1
        if a1 <= b0:
            continue
        jumps.append((tt[b0], tt[a1]))
        lo = np.log(excess[(nxt[0] + nxt[1]) // 2]) if nxt is not None else log_e[a1]
        mid = 0.5 * (np.log(excess[(a0 + b0) // 2]) + lo)
        seg = np.arange(b0, a1 + 1)
        k = seg[np.argmax(log_e[seg] <= mid)] if np.any(log_e[seg] <= mid) else seg[-1]
        if k > 0 and log_e[k - 1] != log_e[k]:
            frac = (log_e[k - 1] - mid) / (log_e[k - 1] - log_e[k])
            jump_times.append(tt[k - 1] + np.clip(frac, 0, 1) * (tt[k] - tt[k - 1]))
        else:
            jump_times.append(tt[k])
    jump_times = np.array(jump_times)
    return SaddleToSaddle(
        rescaled_ts=tt, rate=rate, plateaus=plateaus, plateau_levels=levels,
        jumps=np.array(jumps).reshape(-1, 2), jump_times=jump_times,
        first_jump=float(jump_times[0]) if jump_times.size else math.nan,
    )

