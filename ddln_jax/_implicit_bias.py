"""Where the flow ends on least squares: the implicit-bias limit and its small/large-scale limits.

On interpolating least squares (y ∈ range X) the flow keeps ∇Q(θ(t)) − ∇Q(θ0) in range(Xᵀ)
(d/dt ∇Q(θ) = −∇f = −Xᵀr/n), so its limit is the Bregman projection (`docs/math.md`,
"Mirror flow and potential" and "Implicit bias")

    θ∞ = argmin {D_Q(θ, θ0) : Xθ = y},

the θ with Xθ = y and ∇Q(θ) = ∇Q(θ0) + Xᵀμ. We find the multiplier from the convex dual
min_λ Σ_i Q*_i(η0_i + (Aᵀλ)_i) − λ·b, written with orthonormal constraints Aθ = b (A = Qᵀ from
Xᵀ = QR), by Newton's method: its gradient is A∇Q*(η) − b and its Hessian A diag(g) Aᵀ, because
∇²Q* = (∇²Q)⁻¹ = diag(g). Two things make this robust at any scale of the init:

- **Steps scaled to the geometry.** The curvature g_i changes along η at the rate
  |d log g_i/dη_i| ≤ 4(L−1)·m_i(w), m_i(w) = ∏_{j≥2} √(w² + δ_j) (δ ascending), so a step with
  |Δη_i| ≤ τ/(4(L−1)m_i) changes each g_i by a bounded factor and (for τ ≤ 1) cannot leave the
  box |η_i| < Φ_i(∞). Newton's direction is cut to that region; τ grows while the objective's
  decrease matches its quadratic model and shrinks when it does not (a trust region in the
  dual). The first Newton step, about 1/g(θ0) ∝ α^{−2(L−1)} for inits of scale α, is tamed
  without any halving loop.
- **The gap to the box kept exactly.** For L ≥ 3 and small inits the coordinates of the
  support end at |η_i| = Φ_i(∞) − γ_i with γ_i = O(1) and Φ_i(∞) ∝ α^{−(L−2)}: stored as η, γ
  would be lost to rounding. The solver carries γ alongside η, updates it by the step itself,
  and inverts the tail integral T(w) = Φ(∞) − Φ(w) = ∫_w^∞ dr/∏_j √(r² + δ_j) directly
  (`_tail`, `_dual_to_w`), so θ = ∇Q*(η) keeps full relative accuracy down to α = 1e-16.
  On the half-line of a balanced coordinate the gap is |w|^{−(L−2)}/(L−2), inverted in closed
  form; frozen coordinates (θ_i ≡ 0) do not move.

Stopping test: the θ-correction of the next Newton step, ‖g ⊙ Aᵀp‖, below `rtol`·‖θ‖ (then
that step is taken: the error left is its square). Full Newton steps that stop shrinking the
correction mean the rounding floor was reached above `rtol`: status `inaccurate`.

As α → 0 along u0 = α·v the limit tends to a weighted-ℓ1 minimal interpolator (an LP), and for
inits with θ0 = 0 as α → ∞ to the minimum-norm interpolator of the metric at θ0 (the "kernel"
regime); both are here, next to the exact limit they approximate.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ._geometry import (
    _W,
    _X,
    Geometry,
    _phi_inf,
    _quad_integrand,
    check_signed_geometry,
    geometry_problems,
)
from ._init import check_assumption_a, check_init
from ._losses import _check_data
from ._solution import (
    FAILED,
    INACCURATE,
    MAX_STEPS,
    NONFINITE,
    SUCCESS,
    Status,
    status_codes,
    status_item,
    status_names,
)
from ._validate import as_float_array, check_tolerance, is_tracer, positive_int, positive_scalar


class ImplicitBias(eqx.Module):
    """The result of [`ddln_jax.implicit_bias_limit`][] (leading batch axes come first).

    **Fields:**

    - `theta`: θ∞ = argmin {D_Q(θ, θ0) : Xθ = y}, shape `(d,)`.
    - `eta`: ∇Q(θ∞) = ∇Q(θ0) + Xᵀ`multiplier`, shape `(d,)`.
    - `gap`: Φ(∞) − |η|, the distance of η to the face of the dual box, computed without
      cancellation (+inf for L ≤ 2, where there is no box), shape `(d,)`.
    - `multiplier`: μ ∈ ℝⁿ of the KKT condition (the minimum-norm one when X is
      rank-deficient).
    - `bregman`: D_Q(θ∞, θ0), the smallest Bregman distance from θ0 to an interpolator.
    - `residual`: ‖Xθ∞ − y‖/‖y‖ (‖Xθ∞‖ when y = 0).
    - `iterations`: Newton steps taken.
    - `status`: a [`ddln_jax.Status`][]: `success` (converged to `rtol`), `max_steps` (ran
      out of `max_iter`), `failed` (the trust region collapsed, or X lost rank under `jit`),
      `nonfinite`, `inaccurate` (stopped at the rounding floor, above `rtol`).
    """

    theta: Float[Array, "*batch d"]
    eta: Float[Array, "*batch d"]
    gap: Float[Array, "*batch d"]
    multiplier: Float[Array, "*batch n"]
    bregman: Float[Array, "*batch"]
    residual: Float[Array, "*batch"]
    iterations: Int[Array, "*batch"]
    status: Status

    @property
    def converged(self):
        """True where Newton reached its tolerance (status `success`)."""
        return np.asarray(status_codes(self.status)) == SUCCESS

    @property
    def status_name(self):
        """Status as names (a string, or an array of strings for a batch)."""
        return status_names(self.status)


# ---------------------------------------------------------------------------------------------
# The tail of the mirror map, T(w) = Φ(∞) − Φ(w), and its inverse (L ≥ 3).

# Gauss–Legendre on [0, 1] for the far part of the tail, after r = W/u: the integrand
# u^{K−2} ∏_j (1 + δ_j u²/W²)^{-1/2} is analytic with singularities at |u| ≥ 2 (W ≥ 2√δ_K).
_XU, _WU = np.polynomial.legendre.leggauss(32)
_XU, _WU = (_XU + 1) / 2, _WU / 2


def _far_unit(W, delta):
    """W^{K−1}·∫_W^∞ dr/∏_j √(r² + δ_j), W ≥ 2√δ_K: after r = W/u, a smooth integral on [0, 1]."""
    K = delta.shape[0]
    lead = (1,) * jnp.ndim(W)  # the node axis, appended explicitly
    u = jnp.asarray(_XU, W.dtype).reshape(lead + (-1,))
    wu = jnp.asarray(_WU, W.dtype).reshape(lead + (-1,))
    ratio = (delta / W[None] ** 2)[..., None] * u[None] ** 2  # (K, d, nodes)
    return jnp.sum(wu * u ** (K - 2) * jnp.prod(jax.lax.rsqrt(1 + ratio), axis=0), axis=-1)


def _integral_s(sa, sb, delta):
    """∫_{sa}^{sb} k(s) ds by the composite rule of `_geometry` (k: the integrand of Φ in s)."""
    lead = (1,) * jnp.ndim(sa)  # the node axis, appended explicitly
    x = jnp.asarray(_X, sa.dtype).reshape(lead + (-1,))
    wx = jnp.asarray(_W, sa.dtype).reshape(lead + (-1,))
    nodes = sa[..., None] + (sb - sa)[..., None] * x
    return (sb - sa) * jnp.sum(wx * _quad_integrand(nodes, delta), axis=-1)


def _tail(w, delta):
    """T(w) = Φ(∞) − Φ(w) = ∫_w^∞ dr/∏_j √(r² + δ_j) for w ≥ 0, K = L − 1 ≥ 2, to full relative
    accuracy: [w, W] (W = max(w, 2√δ_K)) by the composite rule in s = asinh(r/√δ₁), [W, ∞) by
    r = W/u on [0, 1]. Both are sums of positive terms: no cancellation, however large Φ(∞) is.
    """
    K = delta.shape[0]
    W = jnp.maximum(w, 2 * jnp.sqrt(delta[-1]))
    sd1 = jnp.sqrt(delta[0])
    near = _integral_s(jnp.arcsinh(w / sd1), jnp.arcsinh(W / sd1), delta)
    return near + W ** (1 - K) * _far_unit(W, delta)


def _dual_to_w(eta, gap, delta, box):
    """w = Φ⁻¹(η), from η in the interior (|η| ≥ Φ(∞)/2 excluded) and from the exact gap γ
    near the faces.

    For L ≥ 3 one safeguarded Newton iteration in s = asinh(|w|/√δ₁) serves both: it solves
    Φ(w) = |η| inside and −T(w) = −γ near a face (both concave increasing in s with slope
    k(s)), from a lower bound of the bracket built from Φ(w) ≤ w/∏√δ_j and
    (w + √δ_K)^{−(L−2)}/(L−2) ≤ T(w) ≤ w^{−(L−2)}/(L−2); concavity makes it monotone.
    """
    K = delta.shape[0]
    if K == 0:
        return eta
    if K == 1:
        return jnp.sqrt(delta[0]) * jnp.sinh(eta)
    p = K - 1
    eps = jnp.finfo(eta.dtype).eps
    face = gap < 0.5 * box
    a = jnp.where(face, box - gap, jnp.abs(eta))  # Φ(|w|)
    gp = jnp.where(face, gap, box - jnp.abs(eta))  # T(|w|)
    sd1 = jnp.sqrt(delta[0])
    sdK2 = 2 * jnp.sqrt(delta[-1])
    w_tail = (p * gp) ** (-1.0 / p)
    w_lo = jnp.maximum(a * jnp.prod(jnp.sqrt(delta), axis=0), w_tail - jnp.sqrt(delta[-1]))
    to_s = lambda w: jnp.arcsinh(w / sd1)  # noqa: E731
    lo, hi = to_s(w_lo), to_s(jnp.maximum(w_tail, w_lo))
    target = jnp.where(face, -gp, a)

    def value(s):
        w = sd1 * jnp.sinh(s)
        W = jnp.maximum(w, sdK2)
        near = _integral_s(jnp.where(face, s, 0.0), jnp.where(face, to_s(W), s), delta)
        return jnp.where(face, -(near + W ** (1 - K) * _far_unit(W, delta)), near)

    def body(state):
        it, s, lo, hi, _ = state
        f = value(s) - target
        lo = jnp.where(f <= 0, s, lo)
        hi = jnp.where(f >= 0, s, hi)
        s_new = s - f / _quad_integrand(s[..., None], delta)[..., 0]
        ok = (s_new >= lo) & (s_new <= hi) & jnp.isfinite(s_new)
        s_new = jnp.where(ok, s_new, 0.5 * (lo + hi))
        small = jnp.abs(s_new - s) <= 4 * eps * jnp.abs(s_new)
        return it + 1, s_new, lo, hi, small | (hi - lo <= 4 * eps * hi)

    def cond(state):
        return (state[0] < 100) & ~jnp.all(state[-1])

    _, s, *_ = jax.lax.while_loop(cond, body, (0, lo, lo, hi, jnp.zeros(eta.shape, bool)))
    return jnp.where(eta < 0, -1.0, 1.0) * sd1 * jnp.sinh(s)


# ---------------------------------------------------------------------------------------------
# The dual Newton solve (pure JAX).

_TAU_MIN = 1e-14  # a trust region below this has collapsed: status `failed`
_TAU_MAX = 1e8
_STALL = 4  # full Newton steps in a row that stop shrinking the correction: rounding floor


def _metric_solve(M, g, r):
    """p = (M G Mᵀ)⁻¹ r and q = G Mᵀ p (G = diag g), through a QR of B = √G Mᵀ = QR.

    g spans dozens of orders at small α (α^{2(L−1)} off the support, O(1) on it): M G Mᵀ
    would round the small part away and be singular, and G(Mᵀp) would be a difference of
    huge terms on the support (p is ~1/g there). With the rows of B sorted by √g (Householder
    on a row-graded matrix), q = √G Q R⁻ᵀ r has no such cancellation. Also returns
    rᵀp = ‖R⁻ᵀr‖².
    """
    sg = jnp.sqrt(g)
    order = jnp.argsort(-sg)
    Q, R = jnp.linalg.qr((sg[:, None] * M.T)[order])
    z = jax.scipy.linalg.solve_triangular(R.T, r, lower=True)
    p = jax.scipy.linalg.solve_triangular(R, z, lower=False)
    q = (Q @ z)[jnp.argsort(order)] * sg  # back to the coordinates' order (a gather)
    return p, q, z @ z


def _orthonormal_constraints(X, y):
    """Xᵀ = QR: {Xθ = y} = {Qᵀθ = R⁻ᵀy}; `full_rank` is False when R is (numerically) singular."""
    Q, R = jnp.linalg.qr(X.T)
    diag = jnp.abs(jnp.diagonal(R))
    n, d = X.shape
    full_rank = jnp.all(diag > jnp.max(diag) * max(n, d) * jnp.finfo(X.dtype).eps)
    b = jax.scipy.linalg.solve_triangular(R.T, y, lower=True)
    return Q.T, b, R, full_rank


def _solve_one(X, y, u0, rtol, max_iter):
    """(θ, η, γ, μ, D_Q, ‖Xθ − y‖/‖y‖, iterations, status code) for one init (L, d)."""
    dtype = X.dtype
    eps = jnp.finfo(dtype).eps
    tiny = jnp.finfo(dtype).tiny
    A, b, R, full_rank = _orthonormal_constraints(X, y)
    geom = Geometry(u0, require_assumption_a=False)
    delta = geom.delta
    K = delta.shape[0]
    # Half-line (balanced) and frozen coordinates (docs/math.md, "Assumption A and the balanced
    # (half-line) geometry"): the untied maps get safe inputs there (δ = 1) and are replaced.
    tied, partial, frozen = geom.tied, geom.partial, geom.frozen
    half = tied & ~frozen
    special = tied | partial
    delta_u = jnp.where(special[None], 1.0, delta)
    sgn0 = jnp.where(geom.w0 < 0, -1.0, 1.0).astype(dtype)  # the side of a half-line
    theta0 = jnp.prod(u0, axis=0)
    w0 = geom.reduce(u0)  # ψ⁻¹(θ0), exactly
    eta0 = geom.phi(w0)
    box = geom.phi_inf  # on half-lines: the face, seen from the anchor η0 = 0
    if K >= 2:
        box_u = jnp.where(special, _phi_inf(delta_u), box)
        w0_u = jnp.where(special, 0.0, w0)
        # On a half-line γ = face − s·η = |w|^{−p}/p (p = L − 2) holds on the whole half-line,
        # so γ alone gives w to full relative accuracy, near the face and far from it.
        gap0 = jnp.where(half, box, jnp.where(frozen, jnp.inf, _tail(jnp.abs(w0_u), delta_u)))
    else:
        gap0 = jnp.full_like(eta0, jnp.inf)
    m_delta = delta[1:]

    def to_w(eta, gap):
        if K == 0:
            return eta
        if K == 1:
            wh = w0 * jnp.exp(sgn0 * jnp.where(half, eta, 0.0))  # Φ = s·log(|w|/|w0|)
            wu = _dual_to_w(jnp.where(special, 0.0, eta), gap, delta_u, box)
        else:
            p = K - 1
            wh = sgn0 * (p * jnp.where(half, gap, 1.0)) ** (-1.0 / p)
            wu = _dual_to_w(jnp.where(special, 0.0, eta), jnp.where(special, box_u, gap),
                            delta_u, box_u)
        return jnp.where(half, wh, jnp.where(frozen, 0.0, wu))

    def evaluate(eta, gap):
        w = to_w(eta, gap)
        theta = geom.psi(w)
        g = geom.metric_w(w)
        return w, theta, g, A @ theta - b

    def newton(g, r, theta):
        p, q, dec = _metric_solve(A, g, r)
        # The step: λ → λ − p, θ → θ − q (to first order), η → η − q/g (frozen: g = 0, fixed).
        nt = jnp.linalg.norm(theta)
        err = jnp.linalg.norm(q) / jnp.where(nt > 0, nt, tiny)
        return -p, jnp.where(frozen, 0.0, -q / jnp.where(frozen, 1.0, g)), err, dec

    def body(carry):
        it, lam, eta, gap, w, theta, g, r, tau, err_prev, stall, _ = carry
        p, deta, err, dec = newton(g, r, theta)
        finite_p = jnp.all(jnp.isfinite(p))
        # Step length: the geometric trust region, and (L ≥ 3) the face ahead.
        t = jnp.ones((), dtype)
        adeta = jnp.abs(deta)
        if K >= 1:
            m = jnp.prod(jnp.sqrt(w[None] ** 2 + m_delta), axis=0)
            reach = jnp.max(4 * K * m * adeta)  # τ-units of a full step
            t = jnp.minimum(t, tau / jnp.where(reach > 0, reach, tiny))
        else:
            reach = jnp.zeros((), dtype)
        if K >= 2:
            # A half-line has one face, on the side of its init; the other side is θ → 0.
            toward = jnp.where(half, (deta > 0) == (sgn0 > 0), (deta > 0) == (eta >= 0))
            ahead = jnp.where(toward, gap, jnp.where(tied, jnp.inf, 2 * box - gap))
            t = jnp.minimum(t, jnp.min(0.99 * ahead / jnp.where(adeta > 0, adeta, tiny)))
        done_now = err <= rtol
        t = jnp.where(finite_p, t, 0.0)
        # Candidate point.
        step = t * deta
        eta_c = eta + step
        if K >= 2:
            s = jnp.where(eta < 0, -1.0, 1.0)
            same = (eta_c < 0) == (eta < 0)
            incremental = same & (jnp.abs(eta_c) >= 0.25 * box)
            gap_c = jnp.where(incremental, gap - s * step, box - jnp.abs(eta_c))
            gap_c = jnp.where(half, gap - sgn0 * step, jnp.where(frozen, gap, gap_c))
        else:
            gap_c = gap
        w_c, theta_c, g_c, r_c = evaluate(eta_c, gap_c)
        ok = (
            jnp.all(jnp.isfinite(theta_c)) & jnp.all(jnp.isfinite(g_c)) & jnp.all(g_c > 0)
            & jnp.all(gap_c > 0) & finite_p
        )
        # Actual vs predicted decrease of the dual objective F(λ) = Σ ½w² − λ·b, written as
        # t·dec − Σ_i D_i with D_i = Q*_i(η_c) − Q*_i(η) − θ_i(η_c − η) ≥ 0 (no λ·b, which is
        # of size Φ(∞)‖b‖ at small α and would round the decrease away).
        dq = 0.5 * (w_c - w) * (w_c + w)
        D = dq - theta * step
        ared = t * dec - jnp.sum(D)
        pred = dec * t * (1 - 0.5 * t)
        # Rounding of the merit: of each term, and of the stored dual point itself (η, or the
        # gap γ near a face), which the new point inherits.
        stored = jnp.abs(eta) if K <= 1 else jnp.where(half | (gap < 0.5 * box), gap, jnp.abs(eta))
        noise = 16 * eps * (
            jnp.sum(jnp.abs(dq) + jnp.abs(theta * step) + jnp.abs(theta) * stored) + t * dec
        )
        decisive = pred > noise
        rho = ared / jnp.where(pred > 0, pred, tiny)
        better = jnp.linalg.norm(r_c) <= (1 - 1e-4 * t) * jnp.linalg.norm(r)
        accept = ok & (done_now | jnp.where(decisive, rho >= 1e-4, better))
        limited = t < 1
        grow = accept & limited & jnp.where(decisive, rho > 0.75, True)
        # On rejection shrink from the step actually tried (it may have been cut by the face).
        tau_new = jnp.where(
            ~accept, 0.25 * jnp.minimum(tau, t * reach),
            jnp.where(grow, jnp.minimum(4 * tau, _TAU_MAX),
                      jnp.where(decisive & (rho < 0.25), 0.5 * jnp.minimum(tau, t * reach), tau)),
        )
        # Rounding floor: full Newton steps that no longer shrink the correction.
        stalled_step = (~limited) & (~decisive) & (~accept | (err > 0.25 * err_prev))
        stall = jnp.where(stalled_step, stall + 1, jnp.where(accept, 0, stall))
        status = jnp.where(
            ~finite_p, NONFINITE,
            jnp.where(
                done_now & accept, SUCCESS,
                jnp.where(stall >= _STALL, INACCURATE, jnp.where(tau_new < _TAU_MIN, FAILED, -1)),
            ),
        ).astype(jnp.int32)
        pick = lambda new, old: jnp.where(accept, new, old)  # noqa: E731
        return (
            it + 1, pick(lam + t * p, lam), pick(eta_c, eta), pick(gap_c, gap), pick(w_c, w),
            pick(theta_c, theta), pick(g_c, g), pick(r_c, r), tau_new,
            jnp.where(accept, err, err_prev), stall, status,
        )

    def cond(carry):
        return (carry[-1] < 0) & (carry[0] < max_iter)

    g0 = geom.metric_w(w0)
    r0 = A @ theta0 - b
    ok0 = jnp.all(jnp.isfinite(b)) & jnp.all(jnp.isfinite(eta0)) & jnp.all(jnp.isfinite(g0))
    status0 = jnp.where(~full_rank, FAILED, jnp.where(ok0, -1, NONFINITE)).astype(jnp.int32)
    lam0 = jnp.zeros(A.shape[0], dtype)
    one = jnp.ones((), dtype)
    carry = (0, lam0, eta0, gap0, w0, theta0, g0, r0, one, jnp.asarray(jnp.inf, dtype), 0, status0)
    it, lam, eta, gap, w, theta, g, r, *_, status = jax.lax.while_loop(cond, body, carry)
    status = jnp.where(status < 0, MAX_STEPS, status).astype(jnp.int32)
    # Xᵀμ = QRμ = Aᵀλ  ⇒  Rμ = λ.
    mu = jax.scipy.linalg.solve_triangular(R, lam, lower=False)
    ynorm = jnp.linalg.norm(y)
    res = jnp.linalg.norm(X @ theta - y)
    residual = jnp.where(ynorm > 0, res / jnp.where(ynorm > 0, ynorm, 1.0), res)
    # D_Q(θ, θ0) = Σ θ(Φ(w) − Φ(w0)) − (w² − w0²)/2, from the w we have (as Geometry.bregman).
    bregman = jnp.sum(theta * (geom.phi(w) - eta0) - 0.5 * (w - w0) * (w + w0))
    return theta, eta, gap, mu, bregman, residual, it, status, w


# Derivatives by the implicit function theorem on the KKT conditions θ = ∇Q*(η),
# η = ∇Q(θ0) + Xᵀμ, Xθ = y; never through Newton's iterations.
# `rtol` and `max_iter` are traced (no recompilation when they change) and not differentiated.
@jax.custom_jvp
def _limit(X, y, u0, rtol, max_iter):
    return _solve_one(X, y, u0, rtol, max_iter)


@_limit.defjvp
def _limit_jvp(primals, tangents):
    X, y, u0, rtol, max_iter = primals
    dX, dy, du0, _, _ = tangents
    out = _limit(X, y, u0, rtol, max_iter)
    theta, eta, gap, mu, bregman, residual, it, status, w = out
    geom = Geometry(u0, require_assumption_a=False)
    g = geom.metric_w(w)

    def shape_terms(u):
        ge = Geometry(u, require_assumption_a=False)
        eta0 = ge.phi(ge.reduce(u))
        # At fixed w: θ = ψ(w; δ) moves with δ, and η − η0 = Φ(w; δ) − η0 must stay in
        # range(Xᵀ); both enter as shifts.
        return eta0 - ge.phi(w), ge.psi(w), eta0, ge.phi_inf

    _, (c_u, t_psi, d_eta0, d_box) = jax.jvp(shape_terms, (u0,), (du0,))
    c = c_u + dX.T @ mu
    rhs = dy - dX @ theta - X @ (g * c + t_psi)
    dmu, gxdmu, _ = _metric_solve(X, g, rhs)  # gxdmu = G Xᵀdμ, without cancellation
    dtheta = g * c + gxdmu + t_psi
    deta = d_eta0 + dX.T @ mu + X.T @ dmu
    half = geom.tied & ~geom.frozen
    side = jnp.where(half, jnp.where(geom.w0 < 0, -1.0, 1.0), jnp.where(eta < 0, -1.0, 1.0))
    dgap = jnp.where(jnp.isfinite(gap), d_box - side * deta, 0.0)
    gw = jnp.where(geom.frozen, 1.0, g)
    dw = jnp.where(geom.frozen, 0.0,
                   (dtheta - t_psi) / gw * jnp.prod(jnp.sqrt(w[None] ** 2 + geom.delta), axis=0))

    def breg(w_, u):
        ge = Geometry(u, require_assumption_a=False)
        w0 = ge.reduce(u)
        return jnp.sum(ge.psi(w_) * (ge.phi(w_) - ge.phi(w0)) - 0.5 * (w_ - w0) * (w_ + w0))

    _, dbreg = jax.jvp(breg, (w, u0), (dw, du0))
    float0 = jax.dtypes.float0
    tangents_out = (
        dtheta, deta, dgap, dmu, dbreg, jnp.zeros_like(residual),
        np.zeros(np.shape(it), float0), np.zeros(np.shape(status), float0), dw,
    )
    return out, tangents_out


@jax.jit
def _solve(X, y, u0, rtol, max_iter):
    if u0.ndim == 2:
        return _limit(X, y, u0, rtol, max_iter)
    return jax.vmap(lambda u: _limit(X, y, u, rtol, max_iter))(u0)


def _row_space(X, y, name_y="y", *, require_interpolation=True):
    """Orthonormal constraints (A, b) with {Aθ = b} = {Xθ = y}, from a thin SVD of X (host)."""
    Xn, yn = np.asarray(X, np.float64), np.asarray(y, np.float64)
    U, s, Vt = np.linalg.svd(Xn, full_matrices=False)
    keep = s > s[0] * max(Xn.shape) * np.finfo(np.float64).eps if s.size and s[0] > 0 else s > 0
    if not np.any(keep):
        raise ValueError("`X` is zero: no constraint Xθ = y to interpolate")
    U, s, Vt = U[:, keep], s[keep], Vt[keep]
    coef = U.T @ yn
    outside = np.linalg.norm(yn - U @ coef)
    scale = max(np.linalg.norm(yn), np.finfo(np.float64).tiny)
    if require_interpolation and outside > 1e-10 * scale:
        raise ValueError(
            f"no θ satisfies Xθ = {name_y}: `{name_y}` is off range(X) by {outside:.3g} "
            f"(relative {outside / scale:.3g}), so the implicit-bias limit "
            "argmin {D_Q(θ, θ0) : Xθ = y} does not exist. On least squares the flow then tends "
            "to the D_Q-projection onto the least-squares solutions: pass y projected onto "
            "range(X) (X @ np.linalg.lstsq(X, y)[0]) to get it."
        )
    return U, s, Vt, coef / s


def _independent_rows(X, rank):
    """Indices of `rank` linearly independent rows of X (pivoted QR of Xᵀ, host)."""
    from scipy.linalg import qr

    _, _, piv = qr(np.asarray(X, np.float64).T, pivoting=True, mode="economic")
    return np.sort(piv[:rank])


def implicit_bias_limit(
    X, y, u0, *, rtol: float = 1e-12, max_iter: int = 500
) -> ImplicitBias:
    """The limit of the flow on interpolating least squares: argmin {D_Q(θ, θ0) : Xθ = y}.

    Newton's method on the dual with a trust region scaled to the mirror geometry, carrying
    the gap Φ(∞) − |η| exactly for L ≥ 3 (see the module docstring and `docs/math.md`,
    "Implicit bias"). Converges from any init with a computable potential, any depth, α from
    1e-16 up, to full float64 accuracy: inits satisfying Assumption A, and balanced
    coordinates (all |u^j_i| equal: θ_i keeps its sign, the half-line geometry, whose gap to
    the face γ = |w|^{−(L−2)}/(L−2) is carried exactly in the same way) and frozen ones (two or
    more layers at 0: θ_i stays 0). Partial ties are refused.

    **JAX transformations.** The solve is pure JAX: `jax.jit`, `jax.vmap` (over inits and over
    data) and `jax.grad`/`jax.jvp` work. Derivatives with respect to `X`, `y` and `u0` come
    from the implicit function theorem on the optimality conditions, never from Newton's
    iterations. For L ≥ 3 and tiny inits they carry an absolute error of about
    eps·Φ(∞)·|∂θ| (the tangent of η near a face is a difference of Φ(∞)-sized terms).
    Host-side, and only when the inputs are concrete: the input checks (Assumption A, shapes,
    y ∈ range X) and the rank decision for rank-deficient X (a maximal set of independent rows
    is kept; the returned multiplier is the minimum-norm one). Under a transformation X must
    have full row rank; otherwise the status is `failed`.

    **Arguments:**

    - `X`: design matrix, shape `(n, d)`.
    - `y`: targets, shape `(n,)`; must lie in range(X) (otherwise a `ValueError`).
    - `u0`: the layers at t = 0, shape `(L, d)`, or `(B, L, d)` for a batch.
    - `rtol`: relative accuracy of θ (the next Newton correction, relative to ‖θ‖); the
      residual ends near rounding.
    - `max_iter`: Newton step budget.

    **Returns:** an [`ddln_jax.ImplicitBias`][]; check `status` (or `converged`).
    """
    concrete = not any(is_tracer(a) for a in (X, y, u0, rtol))
    if concrete:
        X, y = _check_data(X, y)
        if not isinstance(u0, jax.Array) and hasattr(u0, "__array__"):
            u0 = np.asarray(u0)
        u0 = as_float_array("u0", u0, ndim=(2, 3))
        batch = u0.ndim == 3
        for i, ui in enumerate(u0 if batch else [u0]):
            name = f"u0[{i}]" if batch else "u0"
            check_init(ui, name)
            report = check_assumption_a(ui)
            if not report.holds:
                # Balanced (half-line) and frozen coordinates have a potential; partial ties
                # and out-of-range values do not.
                problems = geometry_problems(np.asarray(ui))
                if problems:
                    reason, where = next(iter(problems.items()))
                    raise ValueError(
                        f"`{name}` violates Assumption A (ties at coordinates "
                        f"{report.tied[:10].tolist()}) and has no computable mirror geometry "
                        f"({reason} at coordinates {where[:10].tolist()}): the limit needs a "
                        "unique smallest layer, or all layers tied in magnitude (balanced)"
                    )
        rtol = positive_scalar("rtol", rtol)
    else:
        X, y, u0 = jnp.asarray(X), jnp.asarray(y), jnp.asarray(u0)
        if X.ndim != 2 or y.ndim != 1 or u0.ndim not in (2, 3) or X.shape[0] != y.shape[0]:
            raise ValueError(
                f"`X`, `y`, `u0` must have shapes (n, d), (n,), (L, d) or (B, L, d); got "
                f"{X.shape}, {y.shape}, {u0.shape}"
            )
    if u0.shape[-1] != X.shape[1]:
        raise ValueError(f"`u0` has d = {u0.shape[-1]} coordinates but `X` has {X.shape[1]} columns")
    max_iter = positive_int("max_iter", max_iter)
    dtype = jnp.result_type(X.dtype, y.dtype, u0.dtype)
    if concrete:
        check_tolerance("rtol", rtol, dtype)
    Xc, yc, rows = X, y, None
    if concrete:
        U, s, Vt, _ = _row_space(X, y)
        if s.size < X.shape[0]:
            rows = _independent_rows(X, s.size)
            Xc, yc = X[rows], y[rows]
    X_, y_, u_ = (jnp.asarray(a, dtype) for a in (Xc, yc, u0))
    theta, eta, gap, mu, bregman, _, it, status, _ = _solve(
        X_, y_, u_, jnp.asarray(rtol, dtype), jnp.asarray(max_iter, jnp.int32)
    )
    if rows is not None:
        # The minimum-norm μ with Xᵀμ = X_Rᵀμ_R: μ = (Xᵀ)⁺ X_Rᵀ μ_R = U S⁻¹ Vᵀ X_Rᵀ μ_R.
        mu = jnp.asarray(((np.asarray(mu) @ np.asarray(Xc)) @ Vt.T / s) @ U.T, dtype)
    Xf, yf = jnp.asarray(X, dtype), jnp.asarray(y, dtype)
    ynorm = jnp.linalg.norm(yf)
    res = jnp.linalg.norm(theta @ Xf.T - yf.reshape((1,) * (theta.ndim - 1) + (-1,)), axis=-1)
    residual = jnp.where(ynorm > 0, res / jnp.where(ynorm > 0, ynorm, 1.0), res)
    return ImplicitBias(
        theta=theta, eta=eta, gap=gap, multiplier=mu, bregman=bregman, residual=residual,
        iterations=it, status=status_item(status),
    )


# ---------------------------------------------------------------------------------------------
# The small-initialization limit: a weighted-ℓ1 minimal interpolator.


def weighted_l1_interpolator(X, y, weights=None, weights_neg=None) -> np.ndarray:
    """The exact LP min {Σ_i w⁺_i max(θ_i, 0) + w⁻_i max(−θ_i, 0) : Xθ = y}.

    With both weight vectors equal to 1 (the default) this is the minimum-ℓ1 interpolator.
    Solved with HiGHS (`scipy.optimize.linprog`), then polished: on the support found, the
    interpolation equations are solved again by least squares, so the returned vertex satisfies
    Xθ = y to rounding instead of to the LP's feasibility tolerance.

    **Arguments:**

    - `X`: design matrix, shape `(n, d)`; `y`: targets, shape `(n,)`.
    - `weights`: w⁺ > 0, shape `(d,)` or scalar (default 1).
    - `weights_neg`: w⁻ > 0 for negative coordinates (default: `weights`).

    **Returns:** θ as a float64 NumPy array of shape `(d,)`.
    """
    from scipy.optimize import linprog

    X, y = _check_data(X, y)
    Xn, yn = np.asarray(X, np.float64), np.asarray(y, np.float64)
    d = Xn.shape[1]

    def _weights(name, w):
        if w is None:
            return np.ones(d)
        w = np.broadcast_to(np.asarray(as_float_array(name, w), np.float64), (d,))
        if np.any(w <= 0):
            raise ValueError(f"`{name}` must be > 0, got minimum {float(np.min(w))!r}")
        return w

    wp = _weights("weights", weights)
    wm = wp if weights_neg is None else _weights("weights_neg", weights_neg)
    _row_space(Xn, yn)  # a clear error when y is off range(X)
    scale = max(np.max(wp), np.max(wm))
    res = linprog(
        np.concatenate([wp, wm]) / scale, A_eq=np.hstack([Xn, -Xn]), b_eq=yn, bounds=(0, None),
        method="highs",
        options={"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10},
    )
    if res.status != 0:
        raise RuntimeError(f"HiGHS failed on the weighted-ℓ1 LP: {res.message}")
    theta = res.x[:d] - res.x[d:]
    support = np.abs(theta) > 1e-9 * max(np.max(np.abs(theta)), 1e-300)
    Xs = Xn[:, support]
    if support.any() and np.linalg.matrix_rank(Xs) == support.sum():
        ts, *_ = np.linalg.lstsq(Xs, yn, rcond=None)
        polished = np.zeros(d)
        polished[support] = ts
        # Keep the polish only if it stays the same vertex (same signs) and fits better.
        if np.all(np.sign(ts) == np.sign(theta[support])) and np.linalg.norm(
            Xn @ polished - yn
        ) <= np.linalg.norm(Xn @ theta - yn):
            theta = polished
    return theta


def small_init_limit(X, y, u0) -> np.ndarray:
    """The α → 0 limit of the implicit bias along the ray of inits α·`u0`.

    For L ≥ 3, D_Q(θ, θ0) = Σ_i Φ_i(∞)|θ_i| − ∇Q(θ0)_i θ_i + O(1) with the first part of size
    α^{−(L−2)} (`docs/math.md`, "Small initializations and escape times"), so the limit is
    the weighted-ℓ1 minimal interpolator with weights
    w±_i = Φ_i(∞) ∓ ∇Q(θ0)_i (both > 0: ∇Q(θ0) is inside the box). It is the plain ℓ1
    interpolator when the weights are uniform, e.g. the zero-first init (θ0 = 0, equal δ's);
    for random inits ∇Q(θ0) is of the same order as Φ(∞) and the weights are not uniform.
    For L = 2 the weights are log(1/α) + O(1) in every coordinate, so the limit is the plain
    ℓ1 interpolator (approached only logarithmically); for L = 1 it is the minimum-ℓ2 one.
    Ratios of the weights do not depend on α, so any scale of `u0` gives the same answer.

    **Arguments:**

    - `X`, `y`: interpolating least-squares data, shapes `(n, d)` and `(n,)`.
    - `u0`: the layers (the direction of the ray), shape `(L, d)`, satisfying Assumption A.

    **Returns:** θ as a float64 NumPy array of shape `(d,)`.
    """
    X, y = _check_data(X, y)
    u0 = check_init(u0)
    if u0.shape[1] != X.shape[1]:
        raise ValueError(f"`u0` has d = {u0.shape[1]} coordinates but `X` has {X.shape[1]} columns")
    L = u0.shape[0]
    if L == 1:
        U, s, Vt, b = _row_space(X, y)
        return Vt.T @ b
    if L == 2:
        return weighted_l1_interpolator(X, y)
    report = check_assumption_a(u0)
    if not report.holds:
        raise ValueError(
            f"`u0` violates Assumption A (ties at coordinates {report.tied[:10].tolist()}): "
            "Φ(∞) and ∇Q(θ0), hence the weights of the limit, are not defined there"
        )
    geom = Geometry(u0)
    eta0 = np.asarray(geom.grad_Q(jnp.prod(u0, axis=0)), np.float64)
    box = np.asarray(geom.phi_inf, np.float64)
    return weighted_l1_interpolator(X, y, box - eta0, box + eta0)


def kernel_limit(X, y, u0) -> Float[Array, " d"]:
    """The linearized ("kernel" or lazy) limit: argmin {Σ_i (θ_i − θ0_i)²/g_i(θ0) : Xθ = y}.

    That is θ0 + G Xᵀ(X G Xᵀ)⁺(y − Xθ0) with G = diag g(θ0): the limit of the flow with the
    metric frozen at the init. For inits with θ0 = 0 and uniform g(0) (the zero-first init) it
    is the minimum-ℓ2 interpolator X⁺y and the flow's limit approaches it as α → ∞, at distance
    O(α^{−2L}). For inits with θ0 ≠ 0 there is no such regime: under u0 → α·u0 the problem is
    self-similar (θ/α^L solves the same problem with y/α^L), so the distance does not vanish.
    Exact for L = 1. Works under `jax.jit`/`jax.vmap` (no Assumption A needed).

    **Arguments:**

    - `X`, `y`: data, shapes `(n, d)` and `(n,)`.
    - `u0`: the layers, shape `(L, d)`.

    **Returns:** θ, shape `(d,)`.
    """
    if not any(is_tracer(a) for a in (X, y, u0)):
        X, y = _check_data(X, y)
        u0 = check_init(u0)
        if u0.shape[1] != X.shape[1]:
            raise ValueError(
                f"`u0` has d = {u0.shape[1]} coordinates but `X` has {X.shape[1]} columns"
            )
    geom = Geometry(u0, require_assumption_a=False)
    theta0 = jnp.prod(u0, axis=0)
    G = geom.metric_w(geom.reduce(u0))
    K = (X * G[None]) @ X.T
    return theta0 + G * (X.T @ (jnp.linalg.pinv(K, hermitian=True) @ (y - X @ theta0)))


# ---------------------------------------------------------------------------------------------
# Signed networks θ = θ⁺ − θ⁻: the product problem on [X, −X] from the stacked halves.


def _check_signed_data(X, y, u0, model="signed"):

    X, y = _check_data(X, y)
    if not isinstance(u0, jax.Array) and hasattr(u0, "__array__"):
        u0 = np.asarray(u0)
    u0 = as_float_array("u0", u0, ndim=(3, 4))
    if u0.shape[-3] != 2 or u0.shape[-2] < 1 or u0.shape[-1] < 1:
        raise ValueError(
            f"`u0` of a signed network must have shape (2, L, d) or (B, 2, L, d) (index 0 = the "
            f"+ half), got shape {tuple(u0.shape)}"
        )
    if u0.shape[-1] != X.shape[1]:
        raise ValueError(f"`u0` has d = {u0.shape[-1]} coordinates but `X` has {X.shape[1]} columns")
    return X, y, u0


def signed_implicit_bias_limit(X, y, u0, *, rtol: float = 1e-12, max_iter: int = 200):
    """The limit of the signed flow on interpolating least squares: argmin {D_R(θ, θ0) : Xθ = y}.

    The signed flow from halves (u⁺, u⁻) is the product flow on the design [X, −X] from the
    stacked layers [u⁺ | u⁻] (docs/math.md, "Signed models"): θ = θ'⁺ − θ'⁻, and
    η = ∇R(θ) is the + half's dual variable. So the limit is [`ddln_jax.implicit_bias_limit`][]
    of that problem, with its robustness: every kind of half-coordinate (untied, balanced —
    Woodworth's init w±(0) = α, Azulay's shape–scale init —, frozen), any depth, α from 1e-16
    up, to full float64 accuracy (near a face the gap is carried exactly). Tied and untied
    layers have the same limit. Works under `jax.jit`, `jax.vmap` and `jax.grad` as the product
    limit does (derivatives by the implicit function theorem).

    **Arguments:**

    - `X`: design matrix, shape `(n, d)`; `y`: targets in range(X), shape `(n,)`.
    - `u0`: the layers, shape `(2, L, d)`, or `(B, 2, L, d)` for a batch.
    - `rtol`: relative accuracy of the stacked (θ⁺, θ⁻) (the next Newton correction).
    - `max_iter`: Newton step budget.

    **Returns:** a [`ddln_jax.ImplicitBias`][] (θ∞, η∞ = ∇R(θ∞), its distance `gap` to the
    edge of the domain of R*, the multiplier, D_R(θ∞, θ0), the residual, Newton steps, status).
    """

    if not any(is_tracer(a) for a in (X, y, u0, rtol)):
        X, y, u0 = _check_signed_data(X, y, u0)
        check_signed_geometry(u0, "u0", "the implicit-bias limit")
        rtol = positive_scalar("rtol", rtol)
    else:  # under a transformation: shapes only (the product solver checks the rest)
        X, y, u0 = jnp.asarray(X), jnp.asarray(y), jnp.asarray(u0)
        if u0.ndim not in (3, 4) or u0.shape[-3] != 2 or X.ndim != 2:
            raise ValueError(
                f"`u0` of a signed network must have shape (2, L, d) or (B, 2, L, d) and `X` shape "
                f"(n, d); got {u0.shape} and {X.shape}"
            )
    max_iter = positive_int("max_iter", max_iter)
    d = X.shape[1]
    u0 = jnp.asarray(u0)
    stacked = jnp.concatenate([u0[..., 0, :, :], u0[..., 1, :, :]], axis=-1)
    r = implicit_bias_limit(jnp.concatenate([jnp.asarray(X), -jnp.asarray(X)], axis=1), y, stacked,
                            rtol=rtol, max_iter=max_iter)
    # η' = (∇Q⁺(θ⁺), ∇Q⁻(θ⁻)) = (η, c − η); R* is finite where both halves are. D_Q' of the
    # stacked problem is D_R (the + and − terms of ⟨θ', η' − η0'⟩ combine into ⟨θ, η − η0⟩).
    return ImplicitBias(
        theta=r.theta[..., :d] - r.theta[..., d:], eta=r.eta[..., :d],
        gap=jnp.minimum(r.gap[..., :d], r.gap[..., d:]), multiplier=r.multiplier,
        bregman=r.bregman, residual=r.residual, iterations=r.iterations, status=r.status,
    )
