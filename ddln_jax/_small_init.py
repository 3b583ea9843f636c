"""Small initializations: the box of the dual variable, the escape from the saddle at 0, and
the scalar problem's exact hitting time (docs/math.md, "Small initializations
and escape times").

`phi_inf`, `predict_escape_time`, `measure_escape_time` and `scalar_hitting_time` are JAX
computations (jit and vmap; grad where the quantity is smooth); `phi_inf_constant` is a closed
form on the host.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, Scalar

from ._geometry import _W, _X, Geometry, _psi, _psi_inv, _quad_integrand
from ._init import check_init, require_assumption_a
from ._losses import as_loss
from ._validate import as_float_array, check_traced, is_tracer, positive_scalar


def phi_inf_constant(L: int) -> float:
    """c_L with Φ(∞) = c_L α^{−(L−2)} for the zero-first init.

    c_L = ∫_0^∞ (r² + 1)^{−(L−1)/2} dr = (√π/2) Γ((L−2)/2)/Γ((L−1)/2): c_3 = π/2, c_4 = 1,
    c_5 = π/4, c_6 = 2/3 (docs/math.md, "Mirror flow and potential"). Defined for L ≥ 3 (for
    L ≤ 2, Φ(∞) = ∞). Host-side (a Python float).
    """
    if isinstance(L, bool) or not isinstance(L, (int, np.integer)):
        raise TypeError(f"`L` must be an integer, got {L!r}")
    if L < 3:
        raise ValueError(f"`L` must be ≥ 3 (Φ(∞) is infinite for L ≤ 2), got {L}")
    return math.sqrt(math.pi) / 2 * math.gamma((L - 2) / 2) / math.gamma((L - 1) / 2)


def phi_inf(u0: Float[Array, "L d"]) -> Float[Array, " d"]:
    """Φ_i(∞) = ∫_0^∞ dr/∏_{j≠m}√(r² + δ_{j,i}) per coordinate: the half-width of the box in
    which η = ∇Q(θ) lives for L ≥ 3 (+inf for L ≤ 2).

    Needs Assumption A (a `ValueError` on concrete input, a runtime error of the compiled
    program when traced). Works under `jax.jit`, `jax.vmap` and `jax.grad`.

    **Arguments:**

    - `u0`: layers, shape `(L, d)`.

    **Returns:** Φ(∞), shape `(d,)`.
    """
    if not is_tracer(u0):
        u0 = check_init(u0)
    u0 = require_assumption_a(u0, "u0", "Φ(∞)")
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

    which is Φ_i(∞)/|∂_i f(θ0)| when ∇Q(θ0) = 0 (zero-first init; docs/math.md, "Small
    initializations and escape times"). For random inits ∇Q(θ0) is of the same order as
    Φ(∞) and must be kept. The relative error is
    O(α^{L−2}). For L = 2 the box is unbounded and θ_i ≈ (δ_i/4)e^{2η_i} becomes of order one
    at η_i ≈ ½ log(1/δ_i): t_i = (½ log(1/δ_i) − s_i ∇Q(θ0)_i)/|∂_i f(θ0)|, i.e.
    log(1/α)/|∂_i f(θ0)| for the zero-first init, with an O(1/log(1/α)) relative error.
    Works under `jax.jit`, `jax.vmap` and `jax.grad` (with respect to `u0` and the loss's
    data; `first` is smooth where the escaping coordinate is unique).

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
    u0 = require_assumption_a(u0, "u0", "the escape prediction (through ∇Q(θ0) and Φ(∞))")
    return _escape_times_jit(loss, u0)


_escape_times_jit = eqx.filter_jit(_escape_times)


def measure_escape_time(trajectory, threshold) -> Float[Array, "*batch"]:
    """The first time max_i |θ_i(t) − θ_i(0)| reaches `threshold`, from the saved θ.

    Between the two saves that bracket the crossing the deviation is interpolated linearly in
    its logarithm (it grows like an exponential or a power near an escape). NaN when the
    threshold is not reached within the saves. Works on batched trajectories and under
    `jax.jit`, `jax.vmap` and `jax.grad` (in `threshold` and the saved θ).

    **Arguments:**

    - `trajectory`: a run (or batch) of [`ddln_jax.simulate`][]; save densely around the escape.
    - `threshold`: the deviation that counts as escaped (> 0), e.g. a tenth of the scale of
      the solution.

    **Returns:** the escape time(s), one per run.
    """
    if is_tracer(threshold):
        threshold = check_traced(threshold, ~(threshold > 0), "`threshold` must be > 0")
    else:
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
    Works under `jax.jit`, `jax.vmap` and `jax.grad` (in `u0` and `target`); +inf when θ
    cannot reach the target (θ0 = 0 at a tie).

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
    target = jnp.asarray(target, u0.dtype)
    if is_tracer(u0) or is_tracer(target):
        theta0 = jnp.prod(u0)
        target = check_traced(target, ~((theta0 < target) & (target < 1)),
                              "`target` must lie in (θ0, 1) for f = ½(θ − 1)²")
    return _scalar_time(u0, target)


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
    f_sinh = (s1 - s0) * jnp.sum(wts * k / (1 - _psi(ws[None], delta[:, None, None])[0]))

    # A tie: θ keeps its sign; w = e^v, dw/∏√(w² + δ_j) = dv/∏_{j≥2}√(e^{2v} + δ_j).
    wpos = jnp.where(w0 > 0, w0, 1.0)
    v0, v1 = jnp.log(wpos), jnp.log(w_star)
    v = v0 + (v1 - v0) * x
    ev = jnp.exp(v)
    k_tie = jnp.prod(jax.lax.rsqrt(ev[None, :] ** 2 + delta[1:, None]), axis=0)
    f_log = (v1 - v0) * jnp.sum(wts * k_tie / (1 - _psi(ev[None], delta[:, None, None])[0]))
    return jnp.where(tie, jnp.where(w0 > 0, f_log, jnp.inf), f_sinh)


