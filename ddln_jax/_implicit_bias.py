"""Where the flow ends on least squares: the implicit-bias limit and its small/large-scale limits.

On interpolating least squares (y ∈ range X) the flow keeps ∇Q(θ(t)) − ∇Q(θ0) in range(Xᵀ)
(d/dt ∇Q(θ) = −∇f = −Xᵀr/n), so its limit is the Bregman projection (MATH.md §5.3)

    θ∞ = argmin {D_Q(θ, θ0) : Xθ = y},

the θ with Xθ = y and ∇Q(θ) = ∇Q(θ0) + Xᵀλ. We find λ from the concave dual, written as the
convex problem min_λ Σ_i Q*_i(η0_i + (Xᵀλ)_i) − λ·y, by Newton's method: its gradient is
X∇Q*(η) − y and its Hessian X diag(g(∇Q*(η))) Xᵀ, because ∇²Q* = (∇²Q)⁻¹ = diag(g). For L ≥ 3,
η lives in the open box |η_i| < Φ_i(∞) and Q* blows up at its faces, so a backtracking line
search that refuses points outside the box keeps every iterate inside.

As α → 0 along u0 = α·v the limit tends to a weighted-ℓ1 minimal interpolator (an LP), and for
inits with θ0 = 0 as α → ∞ to the minimum-norm interpolator of the metric at θ0 (the "kernel"
regime); both are here, next to the exact limit they approximate.
"""

from __future__ import annotations

import enum

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ._geometry import Geometry
from ._init import check_assumption_a, check_init
from ._losses import _check_data
from ._validate import as_float_array, check_tolerance, is_tracer, positive_int, positive_scalar


class LimitStatus(enum.IntEnum):
    """Outcome of [`ddln_jax.implicit_bias_limit`][] for one init."""

    CONVERGED = 0
    MAX_ITER = 1
    STALLED = 2  # no step along the Newton direction decreased the merit functions
    NONFINITE = 3
    # Stopped at the rounding floor of θ = ∇Q*(η), which lies above `rtol` here: as accurate
    # as the working precision allows, but not to the tolerance asked for.
    ROUNDING = 4


class ImplicitBias(eqx.Module):
    """The result of [`ddln_jax.implicit_bias_limit`][] (leading batch axes come first).

    **Fields:**

    - `theta`: θ∞ = argmin {D_Q(θ, θ0) : Xθ = y}, shape `(d,)`.
    - `eta`: ∇Q(θ∞) = ∇Q(θ0) + Xᵀ`multiplier`, shape `(d,)`.
    - `multiplier`: λ ∈ ℝⁿ of the KKT condition (the minimum-norm one when X is rank-deficient).
    - `bregman`: D_Q(θ∞, θ0), the smallest Bregman distance from θ0 to an interpolator.
    - `residual`: ‖Xθ∞ − y‖/‖y‖ (‖Xθ∞‖ when y = 0).
    - `iterations`: Newton steps taken.
    - `status`: a [`ddln_jax.LimitStatus`][] code (0 = converged).
    """

    theta: Float[Array, "*batch d"]
    eta: Float[Array, "*batch d"]
    multiplier: Float[Array, "*batch n"]
    bregman: Float[Array, "*batch"]
    residual: Float[Array, "*batch"]
    iterations: Int[Array, "*batch"]
    status: Int[Array, "*batch"]

    @property
    def converged(self):
        """True where Newton reached its tolerance."""
        return np.asarray(self.status) == LimitStatus.CONVERGED

    @property
    def status_name(self):
        """Status as names (a string, or an array of strings for a batch)."""
        names = np.vectorize(lambda s: LimitStatus(int(s)).name.lower())(np.asarray(self.status))
        return str(names) if names.ndim == 0 else names


# Line search: at most this many halvings of the Newton step (2^-60 is below rounding).
_LS_MAX = 60
_ARMIJO = 1e-4


def _dual_newton(A, b, u0, rtol, max_iter: int):
    """Newton on the dual with the reduced constraints Aθ = b (A has orthonormal rows)."""
    geom = Geometry(u0)
    theta0 = jnp.prod(u0, axis=0)
    eta0 = geom.grad_Q(theta0)
    eps = jnp.finfo(A.dtype).eps
    bnorm = jnp.linalg.norm(b)
    absA = jnp.abs(A)

    def evaluate(lam):
        eta = eta0 + A.T @ lam
        w = geom.phi_inv(eta)  # ±inf outside the box (L ≥ 3)
        theta = geom.psi(w)
        g = geom.metric_w(w)
        grad = A @ theta - b
        obj = 0.5 * jnp.sum(w**2) - lam @ b
        ok = jnp.all(jnp.isfinite(theta)) & jnp.all(jnp.isfinite(g)) & jnp.isfinite(obj)
        # What rounding leaves of the residual: θ = ∇Q*(η) carries g·eps·|η|, Aθ eps·|A||θ|.
        floor = 16 * eps * (jnp.linalg.norm(absA @ (jnp.abs(theta) + g * jnp.abs(eta))) + bnorm)
        return obj, grad, g, ok, floor

    def classify(grad, floor, accepted):
        r = jnp.linalg.norm(grad)
        return jnp.where(
            r <= rtol * bnorm,
            LimitStatus.CONVERGED,
            jnp.where(
                r <= floor,
                LimitStatus.ROUNDING,
                jnp.where(
                    accepted, -1, jnp.where(r <= 4 * floor, LimitStatus.ROUNDING, LimitStatus.STALLED)
                ),
            ),
        )

    def cond(carry):
        it, _, _, _, _, _, status = carry
        return (status < 0) & (it < max_iter)

    def body(carry):
        it, lam, obj, grad, g, floor, _ = carry
        H = (A * g) @ A.T
        p = -jnp.linalg.solve(H, grad)
        dec = -(grad @ p)  # Newton decrement², ≥ 0 since H is positive definite
        gnorm = jnp.linalg.norm(grad)

        def ls_cond(state):
            _, k, accepted = state
            return (~accepted) & (k < _LS_MAX)

        def ls_body(state):
            step, k, _ = state
            o, gr, _, ok, _ = evaluate(lam + step * p)
            # Armijo on the dual objective, or (once its decrease is below rounding) a
            # decrease of the residual, along which the Newton direction also descends.
            armijo = o <= obj - _ARMIJO * step * dec
            resid = jnp.linalg.norm(gr) <= (1 - _ARMIJO * step) * gnorm
            accepted = ok & (armijo | resid)
            return jnp.where(accepted, step, 0.5 * step), k + 1, accepted

        finite_p = jnp.all(jnp.isfinite(p))
        # A non-finite direction skips the search (and ends the solve as NONFINITE).
        step, _, accepted = jax.lax.while_loop(
            ls_cond, ls_body, (jnp.ones((), A.dtype), 0, ~finite_p)
        )
        accepted = accepted & finite_p
        lam_new = jnp.where(accepted, lam + step * p, lam)
        o, gr, gg, _, fl = evaluate(lam_new)
        status = jnp.where(~finite_p, LimitStatus.NONFINITE, classify(gr, fl, accepted))
        return it + 1, lam_new, o, gr, gg, fl, status.astype(jnp.int32)

    lam = jnp.zeros(A.shape[0], A.dtype)
    obj, grad, g, ok, floor = evaluate(lam)
    status = jnp.where(~ok, LimitStatus.NONFINITE, classify(grad, floor, True)).astype(jnp.int32)
    it, lam, _, grad, _, _, status = jax.lax.while_loop(
        cond, body, (0, lam, obj, grad, g, floor, status)
    )
    status = jnp.where(status < 0, LimitStatus.MAX_ITER, status).astype(jnp.int32)
    eta = eta0 + A.T @ lam
    theta = geom.grad_Q_star(eta)
    return theta, eta, lam, geom.bregman(theta, theta0), it, status


_dual_newton_jit = eqx.filter_jit(_dual_newton)


def _dual_newton_batched(A, b, u0, rtol, max_iter):
    if u0.ndim == 2:
        return _dual_newton_jit(A, b, u0, rtol, max_iter)
    # A host loop over the inits: under vmap the nested while loops (Newton, line search,
    # Φ⁻¹) would all run as long as the slowest lane, ~10× slower than one lane at a time.
    outs = [_dual_newton_jit(A, b, u, rtol, max_iter) for u in u0]
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *outs)


def _row_space(X, y, name_y="y", *, require_interpolation=True):
    """Orthonormal constraints (A, b) with {Aθ = b} = {Xθ = y}, from a thin SVD of X."""
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


def implicit_bias_limit(
    X, y, u0, *, rtol: float = 1e-12, max_iter: int = 200
) -> ImplicitBias:
    """The limit of the flow on interpolating least squares: argmin {D_Q(θ, θ0) : Xθ = y}.

    Solved through the dual by Newton's method with a backtracking line search that keeps
    η = ∇Q(θ0) + Xᵀλ inside the box |η_i| < Φ_i(∞) for L ≥ 3 (MATH.md §5.3). Any depth, any
    init satisfying Assumption A; X may be rank-deficient (the constraints are reduced to an
    orthonormal basis of its row space first).

    Accuracy: the residual is driven to `rtol`·‖y‖. For L ≥ 3 and tiny inits the dual point
    η ≈ ±Φ(∞) is stored with an absolute rounding error eps·Φ(∞) ∝ α^{−(L−2)}, which caps the
    accuracy of θ = ∇Q*(η) near eps·Φ(∞)·g (about 1e-11 for L = 4, α = 0.01 and 1e-6 for
    L = 5, α = 0.001); when that floor lies above `rtol` the status says `ROUNDING`.

    **Arguments:**

    - `X`: design matrix, shape `(n, d)`.
    - `y`: targets, shape `(n,)`; must lie in range(X) (otherwise a `ValueError`).
    - `u0`: the layers at t = 0, shape `(L, d)`, or `(B, L, d)` for a batch.
    - `rtol`: target relative residual ‖Xθ − y‖/‖y‖ (float64 is needed below ~1e-6).
    - `max_iter`: Newton step budget.

    **Returns:** an [`ddln_jax.ImplicitBias`][]; check `status`/`converged`.
    """
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
            raise ValueError(
                f"`{name}` violates Assumption A (ties at coordinates "
                f"{report.tied[:10].tolist()}): D_Q and the implicit-bias limit are not defined "
                "on ℝ^d there. Perturb the init."
            )
    if u0.shape[-1] != X.shape[1]:
        raise ValueError(f"`u0` has d = {u0.shape[-1]} coordinates but `X` has {X.shape[1]} columns")
    rtol = positive_scalar("rtol", rtol)
    max_iter = positive_int("max_iter", max_iter)
    dtype = jnp.result_type(X.dtype, u0.dtype)
    check_tolerance("rtol", rtol, dtype)
    U, s, Vt, b = _row_space(X, y)
    theta, eta, lam, breg, it, status = _dual_newton_batched(
        jnp.asarray(Vt, dtype), jnp.asarray(b, dtype), u0.astype(dtype),
        jnp.asarray(rtol, dtype), max_iter,
    )
    # Xᵀμ = V S Uᵀμ = Vλ  ⇒  μ = U S⁻¹ λ.
    multiplier = jnp.asarray((np.asarray(lam) / s) @ U.T, dtype)
    Xn, yn = np.asarray(X, np.float64), np.asarray(y, np.float64)
    res = np.linalg.norm(np.asarray(theta) @ Xn.T - yn, axis=-1)
    residual = res / np.linalg.norm(yn) if np.linalg.norm(yn) > 0 else res
    return ImplicitBias(
        theta=theta, eta=eta, multiplier=multiplier, bregman=breg,
        residual=jnp.asarray(residual, dtype), iterations=it, status=status,
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
    α^{−(L−2)} (MATH.md §5.5), so the limit is the weighted-ℓ1 minimal interpolator with weights
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
    K = (X * G) @ X.T
    return theta0 + G * (X.T @ (jnp.linalg.pinv(K, hermitian=True) @ (y - X @ theta0)))
