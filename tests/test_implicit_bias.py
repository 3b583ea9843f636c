"""The implicit-bias limit argmin {D_Q(θ, θ0) : Xθ = y} at any depth and scale of the init.

Checked against an independent extended-precision solve (mpmath, 80 digits: Newton on the KKT
system in the smallest-layer variables w, with its own Gauss–Legendre quadratures), under
`jax.jit`/`jax.vmap`, and its derivatives (implicit function theorem) against central finite
differences and against the end point of long simulations.

One jitted solver per depth: every float64 solve of a depth goes through one batched call.
"""

import functools

import jax
import jax.numpy as jnp
import mpmath as mp
import numpy as np
import pytest

import ddln_jax as dj
from ddln_jax import Status, implicit_bias_limit

ALPHAS = (1.0, 1e-4, 1e-8, 1e-16)
N, D = 4, 9
DPS = 80


def _data(seed, n=N, d=D):
    """n < d, generic y = Xθ (θ dense): the small-α limits are non-degenerate LP vertices."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    return X, X @ rng.normal(size=d)


def _inits(L, d=D, seed=7):
    """Zero-first and Gaussian inits at every α of ALPHAS: shape (2·len(ALPHAS), L, d)."""
    v = np.random.default_rng(seed + L).normal(size=(L, d))
    zf = [np.asarray(dj.zero_first_init(L, d, a)) for a in ALPHAS]
    return np.stack(zf + [a * v for a in ALPHAS])


# ---------------------------------------------------------------------------------------------
# The extended-precision reference.


@functools.cache
def _gl(n=24):
    mp.mp.dps = DPS
    x, w = mp.gauss_quadrature(n, "legendre")
    return [(xi + 1) / 2 for xi in x], [wi / 2 for wi in w]


class _Coord:
    """Φ, ψ, ψ' of one coordinate in mpmath, from the layers u0[:, i]."""

    def __init__(self, layers):
        u = [mp.mpf(float(v)) for v in layers]
        m = min(range(len(u)), key=lambda j: abs(u[j]))
        sign = mp.mpf(1)
        for j, v in enumerate(u):
            if j != m and v < 0:
                sign = -sign
        self.w0 = sign * u[m]
        self.delta = sorted(u[j] ** 2 - u[m] ** 2 for j in range(len(u)) if j != m)
        self.K = len(self.delta)
        # Balanced (every gap 0): the half-line geometry, Φ(w) − Φ(w0) = ∫_{w0}^{w} dr/|r|^K.
        self.half = self.K >= 1 and all(dl == 0 for dl in self.delta)
        if self.K >= 2 and not self.half:
            self.sd1 = mp.sqrt(self.delta[0])
            self.W = 2 * mp.sqrt(self.delta[-1])
            self.box = self._head(self.W) + self._far(self.W)
        self.phi0 = self.phi(self.w0)

    def _k(self, s):
        sh2 = mp.sinh(s) ** 2
        out = mp.mpf(1)
        for dj_ in self.delta[1:]:
            out /= mp.sqrt(self.delta[0] * sh2 + dj_)
        return out

    def _head(self, w):
        """∫_0^w dr/P(r), w ≥ 0, in s = asinh(r/√δ₁), composite GL with panels ≤ 1/2."""
        x, wt = _gl()
        sb = mp.asinh(w / self.sd1)
        panels = max(1, int(mp.ceil(2 * sb)))
        h = sb / panels
        return sum(h * wi * self._k(h * (p + xi)) for p in range(panels) for xi, wi in zip(x, wt))

    def _far(self, w):
        """∫_w^∞ dr/P(r), w ≥ W, after r = W/u: ∫_0^{W/w} W u^{K−2} ∏ (W² + δ u²)^{-1/2} du."""
        x, wt = _gl()
        b = self.W / w
        tot = mp.mpf(0)
        for xi, wi in zip(x, wt):
            u = b * xi
            f = self.W * u ** (self.K - 2)
            for dj_ in self.delta:
                f /= mp.sqrt(self.W**2 + dj_ * u**2)
            tot += b * wi * f
        return tot

    def phi(self, w):
        if self.K == 0:
            return w
        if self.half:
            s, a0, a = mp.sign(self.w0), abs(self.w0), abs(w)
            assert s * w > 0, "off the half-line"
            if self.K == 1:
                return s * mp.log(a / a0)
            p = self.K - 1
            return s * (a0 ** (-p) - a ** (-p)) / p
        if self.K == 1:
            return mp.asinh(w / mp.sqrt(self.delta[0]))
        a = abs(w)
        val = self._head(a) if a <= self.W else self.box - self._far(a)
        return val if w >= 0 else -val

    def P(self, w):
        out = mp.mpf(1)
        for dj_ in self.delta:
            out *= mp.sqrt(w**2 + dj_)
        return out

    def psi(self, w):
        return w * self.P(w)

    def dpsi(self, w):
        return self.P(w) * (1 + sum(w**2 / (w**2 + dj_) for dj_ in self.delta))


def _mp_limit(X, y, u0, w_start, mu):
    """Newton on Φ_i(w_i) − Φ_i(w0_i) = (Xᵀμ)_i, Xψ(w) = y from a float64 start, to 1e-28.

    Near a face the large part of Φ(w) − Φ(w0) is Φ(∞) − Φ(w0), rounded at 80 digits; that
    rounding is a shift of η on the support, absorbed by μ, so θ is still resolved fully.
    """
    mp.mp.dps = DPS
    n, d = X.shape
    coords = [_Coord(u0[:, i]) for i in range(d)]
    Xm = [[mp.mpf(float(v)) for v in row] for row in X]
    w = [mp.mpf(float(v)) for v in w_start]

    def residual(w, mu_):
        """E1 scaled by P(w_i) (so that its Jacobian block is the identity), and E2."""
        Pw = [c.P(wi) for c, wi in zip(coords, w)]
        raw = [coords[i].phi(w[i]) - coords[i].phi0 - sum(Xm[k][i] * mu_[k] for k in range(n))
               for i in range(d)]
        th = [c.psi(wi) for c, wi in zip(coords, w)]
        e2 = [sum(Xm[k][i] * th[i] for i in range(d)) - mp.mpf(float(y[k])) for k in range(n)]
        # d(P·E1_i)/dw_i = 1 + E1_i·P'(w_i), with P'/P = Σ_j w/(w² + δ_j).
        diag = [1 + raw[i] * Pw[i] * sum(w[i] / (w[i] ** 2 + dj_) for dj_ in coords[i].delta)
                for i in range(d)]
        return [r * p for r, p in zip(raw, Pw)] + e2, (Pw, diag)

    # μ of the float64 answer is off by ~eps·Φ(∞); refit it to the start's w (least squares
    # with weights P(w_i)², which the support dominates) before Newton.
    with mp.workdps(200):
        Pw = [c.P(wi) for c, wi in zip(coords, w)]
        F = [coords[i].phi(w[i]) - coords[i].phi0 for i in range(d)]
        M = mp.matrix(n, n)
        rhs = mp.matrix(n, 1)
        for a in range(n):
            rhs[a] = sum(Xm[a][i] * Pw[i] ** 2 * F[i] for i in range(d))
            for b in range(n):
                M[a, b] = sum(Xm[a][i] * Pw[i] ** 2 * Xm[b][i] for i in range(d))
        mu_ = list(mp.lu_solve(M, rhs))
    res, (Pw, diag) = residual(w, mu_)
    for _ in range(40):
        J = mp.zeros(d + n, d + n)
        for i in range(d):
            J[i, i] = diag[i]
            for k in range(n):
                J[i, d + k] = -Xm[k][i] * Pw[i]
                J[d + k, i] = Xm[k][i] * coords[i].dpsi(w[i])
        # The Schur complement X G Xᵀ spans ~1e-130..1 at α = 1e-16: wide working precision.
        with mp.workdps(200):
            step = mp.lu_solve(J, mp.matrix(res))
        norm0 = mp.norm(mp.matrix(res))
        t = mp.mpf(1)
        while True:  # backtracking on the scaled residual
            w_t = [w[i] - t * step[i] for i in range(d)]
            mu_t = [mu_[k] - t * step[d + k] for k in range(n)]
            res_t, aux_t = residual(w_t, mu_t)
            if mp.norm(mp.matrix(res_t)) < norm0 or norm0 < mp.mpf(10) ** -50 or t < 1e-12:
                break
            t /= 2
        w, mu_, res, (Pw, diag) = w_t, mu_t, res_t, aux_t
        if max(abs(step[i]) / (abs(w[i]) + mp.mpf(10) ** -300) for i in range(d)) < mp.mpf(10) ** -28:
            break
    else:
        raise AssertionError("the mpmath reference did not converge")
    return np.array([float(coords[i].psi(w[i])) for i in range(d)])


@jax.jit
@jax.vmap
def _w_of(u0, theta):
    return dj.Geometry(u0).psi_inv(theta)


def _reference(X, y, u0, lim):
    """θ of the mpmath solve for each init of a batch."""
    w = np.asarray(_w_of(jnp.asarray(u0), lim.theta))
    return np.stack([_mp_limit(X, y, u0[k], w[k], np.asarray(lim.multiplier[k])) for k in range(len(u0))])


@pytest.fixture(scope="module")
def solved():
    """Every depth once (one batched solve each): {L: (X, y, u0 (8, L, d), ImplicitBias)}."""
    X, y = _data(0)
    return {L: (X, y, _inits(L), implicit_bias_limit(X, y, _inits(L))) for L in (2, 3, 4, 5)}


def test_reference_quadrature_against_closed_forms():
    """The mpmath Φ against closed forms (zero-first: L = 3 arctan, L = 4 algebraic; L = 3
    two gaps: an elliptic integral) and mpmath's own tanh-sinh quadrature, to 1e-40."""
    mp.mp.dps = DPS
    a = mp.mpf(1e-8)  # the float the layers hold
    for w in (mp.mpf("3e-9"), mp.mpf("0.7"), mp.mpf(-5)):
        c3 = _Coord([0.0, 1e-8, 1e-8])
        assert abs(c3.phi(w) - mp.atan(w / a) / a) <= mp.mpf(10) ** -40 * abs(c3.phi(w))
        c4 = _Coord([0.0, 1e-8, 1e-8, 1e-8])
        assert abs(c4.phi(w) - w / (a**2 * mp.sqrt(w**2 + a**2))) <= mp.mpf(10) ** -40 * abs(c4.phi(w))
    c = _Coord([0.3, -0.9, 1.7])
    d1, d2 = c.delta
    for w in (mp.mpf("0.2"), mp.mpf(40)):
        ell = mp.ellipf(mp.atan(w / mp.sqrt(d1)), 1 - d1 / d2) / mp.sqrt(d2)
        assert abs(c.phi(w) - c.phi(0) - ell) <= mp.mpf(10) ** -40 * ell
    c5 = _Coord([0.2, -0.5, 1.1, 0.9, -2.0])
    ref = mp.quad(lambda r: 1 / c5.P(r), [0, 1, mp.inf])
    assert abs(c5.box - ref) <= mp.mpf(10) ** -40 * ref


@pytest.mark.parametrize("L", [2, 3, 4, 5])
def test_matches_extended_precision(solved, L):
    """Zero-first and Gaussian inits, α ∈ {1, 1e-4, 1e-8, 1e-16}: status success and
    ‖θ − θ_ref‖/‖θ_ref‖ ≤ 1e-12 against the 80-digit solve; the KKT residual at rounding."""
    X, y, u0, lim = solved[L]
    assert list(lim.status_name) == ["success"] * len(u0), lim.status_name
    assert float(jnp.max(lim.residual)) <= 1e-13
    ref = _reference(X, y, u0, lim)
    err = np.linalg.norm(np.asarray(lim.theta) - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert err.max() <= 1e-12, err


def _balanced_inits(L, d=D, seed=11):
    """Per α of ALPHAS: α·v with coordinates 0–3 balanced (|v^j_i| = 1; θ0 of both signs) beside
    untied Gaussian ones, shape (len(ALPHAS), L, d)."""
    v = np.random.default_rng(seed + L).normal(size=(L, d))
    v[:, :4] = 1.0
    v[0, 1] = v[-1, 3] = -1.0
    return np.stack([a * v for a in ALPHAS])


@pytest.mark.parametrize("L", [2, 3, 4, 5])
def test_balanced_coordinates_match_extended_precision(L):
    """Balanced (half-line) coordinates, α ∈ {1, 1e-4, 1e-8, 1e-16}, against the 80-digit solve
    with the half-line potential Φ(w) − Φ(w0) = ∫_{w0}^{w} dr/|r|^{L−1}: a product init with
    balanced coordinates of both signs beside untied ones, and Woodworth's signed init
    w±(0) = α (the product problem on [X, −X] with every half-coordinate balanced). Status
    success and ≤ 1e-12 relative (before, balanced inits went through a d-dimensional dual
    line search that ended `inaccurate` for L ≥ 3 below α ≈ 1e-4)."""
    X, y = _data(1)
    u0 = _balanced_inits(L)
    lim = implicit_bias_limit(X, y, u0)
    assert list(lim.status_name) == ["success"] * len(u0), lim.status_name
    assert float(jnp.max(lim.residual)) <= 1e-13
    ref = _reference(X, y, u0, lim)
    err = np.linalg.norm(np.asarray(lim.theta) - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert err.max() <= 1e-12, err
    # θ_i keeps the sign of θ0_i on a half-line.
    assert np.all(np.sign(lim.theta[:, :4]) == np.sign(np.prod(u0[:, :, :4], axis=1)))

    wood = np.stack([np.asarray(dj.woodworth_init(L, D, a)) for a in ALPHAS])
    signed = dj.signed_implicit_bias_limit(X, y, wood)
    assert list(signed.status_name) == ["success"] * len(wood), signed.status_name
    X2, stacked = np.hstack([X, -X]), np.concatenate([wood[:, 0], wood[:, 1]], axis=-1)
    ref2 = _reference(X2, y, stacked, implicit_bias_limit(X2, y, stacked))
    ref2 = ref2[:, :D] - ref2[:, D:]
    err = np.linalg.norm(np.asarray(signed.theta) - ref2, axis=1) / np.linalg.norm(ref2, axis=1)
    assert err.max() <= 1e-12, err


def test_issue_8_problem_converges():
    """n = 10, d = 30, θ* = (1, −2, 0.5, 0, …), zero-first init, L = 4, α = 1e-3 (before: stopped
    1.8e-9 away at the rounding floor): success, residual at rounding, the KKT condition
    η = Xᵀμ (η0 = 0 here) to 1e-12 of Φ(∞) = α^{−2}, 0 < gap ≤ Φ(∞), and θ within O(α^L) of
    the minimum-ℓ1 interpolator."""
    np.random.seed(0)
    X = np.random.randn(10, 30)
    theta_star = np.zeros(30)
    theta_star[:3] = [1.0, -2.0, 0.5]
    y = X @ theta_star
    lim = implicit_bias_limit(X, y, dj.zero_first_init(4, 30, 1e-3))
    assert lim.status == Status.success and lim.converged
    assert float(lim.residual) <= 1e-14
    box = 1e6  # c_4 α^{−2}, c_4 = 1
    assert np.max(np.abs(np.asarray(lim.eta - lim.multiplier @ X))) <= 1e-12 * box
    gap = np.asarray(lim.gap)
    assert np.all(gap > 0) and np.all(gap <= box)
    np.testing.assert_allclose(gap + np.abs(np.asarray(lim.eta)), box, rtol=1e-12)
    l1 = dj.weighted_l1_interpolator(X, y)
    assert np.abs(np.asarray(lim.theta) - l1).sum() <= 1e-6


@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(N, D))
    return X, X @ rng.normal(size=D), rng


def _objective(c):
    return lambda X, y, u0: c @ implicit_bias_limit(X, y, u0, rtol=1e-14).theta


@pytest.mark.parametrize("L", [2, 3, 4])
def test_derivatives_by_implicit_differentiation(small, L):
    """Forward mode (jax.jvp) of c·θ∞ along a random direction in (X, y, u0) jointly, and along
    each argument alone, against central finite differences (≤ 1e-6 relative); for L = 2 also
    reverse mode (jax.grad), equal to forward mode to 1e-12."""
    X, y, rng = small
    u0 = rng.normal(size=(L, D)) * np.linspace(0.6, 1.2, L)[:, None]
    f = _objective(rng.normal(size=D))
    args = [X, y, u0]
    dirs = [rng.normal(size=a.shape) for a in args]
    h = 1e-6  # the smallest gaps δ are ~1e-2 here: the third derivative is large
    fd = (f(*[a + h * v for a, v in zip(args, dirs)]) - f(*[a - h * v for a, v in zip(args, dirs)])) / (2 * h)
    fwd = jax.jvp(f, tuple(map(jnp.asarray, args)), tuple(map(jnp.asarray, dirs)))[1]
    assert abs(float(fwd) - float(fd)) <= 1e-6 * abs(float(fd)), (fwd, fd)
    if L == 2:
        grads = jax.grad(f, argnums=(0, 1, 2))(*map(jnp.asarray, args))
        rev = sum(float(jnp.sum(g * v)) for g, v in zip(grads, dirs))
        assert abs(rev - float(fwd)) <= 1e-12 * abs(rev)
        for k in range(3):  # each argument alone, from the gradient
            plus, minus = list(args), list(args)
            plus[k], minus[k] = args[k] + h * dirs[k], args[k] - h * dirs[k]
            fd_k = (f(*plus) - f(*minus)) / (2 * h)
            rev_k = float(jnp.sum(grads[k] * dirs[k]))
            assert abs(rev_k - fd_k) <= 1e-6 * abs(fd_k), (k, rev_k, fd_k)


@pytest.mark.parametrize("L", [2, 3])
def test_derivatives_with_balanced_coordinates(small, L):
    """Balanced (half-line) coordinates beside untied ones: forward mode of c·θ∞ along a random
    direction in (X, y) and along the scale of u0 (u0 → (1 + h)u0 keeps every tie) against
    central finite differences, ≤ 1e-6 relative; under jit, as any init."""
    X, y, rng = small
    u0 = 0.5 * _balanced_inits(L)[0]
    f = jax.jit(_objective(rng.normal(size=D)))
    args = [X, y, u0]
    dirs = [rng.normal(size=X.shape), rng.normal(size=y.shape), u0]
    h = 1e-6
    fd = (f(*[a + h * v for a, v in zip(args, dirs)]) - f(*[a - h * v for a, v in zip(args, dirs)])) / (2 * h)
    fwd = jax.jvp(f, tuple(map(jnp.asarray, args)), tuple(map(jnp.asarray, dirs)))[1]
    assert abs(float(fwd) - float(fd)) <= 1e-6 * abs(float(fd)), (fwd, fd)


def test_alpha_derivative_matches_long_simulations(small):
    """d θ∞/dα along u0 = α·v (forward mode through the limit) equals the central difference
    in α of the end points of two long simulations (rtol 1e-12), to 1e-6 relative."""
    X, y, rng = small
    alpha, h = 0.8, 1e-4
    v = np.stack([rng.choice([-1.0, 1.0], D) * rng.uniform(0.9, 1.1, D),
                  rng.choice([-1.0, 1.0], D) * rng.uniform(0.2, 0.4, D)])
    deriv = jax.jvp(lambda a: implicit_bias_limit(X, y, a * v, rtol=1e-14).theta,
                    (alpha,), (1.0,))[1]
    tr = dj.simulate(dj.LeastSquares(X, y), np.stack([(alpha + h) * v, (alpha - h) * v]),
                     t1=3000.0, ts=np.array([0.0, 3000.0]), rtol=1e-12, atol=1e-14,
                     max_steps=100_000)
    assert list(tr.status_name) == ["success"] * 2
    fd = (np.asarray(tr.theta_final[0]) - np.asarray(tr.theta_final[1])) / (2 * h)
    assert np.linalg.norm(np.asarray(deriv) - fd) <= 1e-6 * np.linalg.norm(fd)


def _close(a, b, rtol):
    a, b = np.asarray(a), np.asarray(b)
    assert np.linalg.norm(a - b) <= rtol * np.linalg.norm(b), (a, b)


def test_jit_and_vmap_over_inits_and_data(solved):
    """Under jax.jit, jax.vmap over (data, init) pairs: each lane equals its eager solve."""
    X, y, u0, lim = solved[3]
    X2 = X + 0.1 * np.random.default_rng(5).normal(size=X.shape)
    y2 = X2 @ np.asarray(lim.theta[5])
    solve = jax.jit(jax.vmap(lambda X_, y_, u_: implicit_bias_limit(X_, y_, u_)))
    out = solve(jnp.stack([X, X2]), jnp.stack([y, y2]), jnp.asarray(u0[[5, 2]]))
    assert list(out.status_name) == ["success"] * 2
    _close(out.theta[0], lim.theta[5], 1e-14)
    _close(out.theta[1], implicit_bias_limit(X2, y2, u0[2]).theta, 1e-13)


def test_bad_input_and_statuses(solved):
    X, y, u0, _ = solved[3]
    with pytest.raises(ValueError, match=r"no θ satisfies Xθ = y"):
        implicit_bias_limit(np.vstack([X, X[:1]]), np.concatenate([y, [y[0] + 1]]), u0[0])
    partial = np.stack([0.5 * np.ones(D), 0.5 * np.ones(D), np.ones(D)])  # a partial tie, L = 3
    with pytest.raises(ValueError, match=r"`u0\[1\]` violates Assumption A .* no computable mirror geometry \(partial_tie"):
        implicit_bias_limit(X, y, np.stack([u0[0], partial]))
    with pytest.raises(ValueError, match=r"`u0` has d = 4 coordinates but `X` has 9"):
        implicit_bias_limit(X, y, u0[0][:, :4])
    with pytest.raises(ValueError, match=r"`max_iter` must be an integer ≥ 1"):
        implicit_bias_limit(X, y, u0[0], max_iter=0)
    with pytest.raises(TypeError, match=r"`max_iter` must be an integer"):
        implicit_bias_limit(X, y, u0[0], max_iter=2.5)
    with pytest.raises(ValueError, match=r"`rtol` must be finite and > 0"):
        implicit_bias_limit(X, y, u0[0], rtol=-1.0)
    with pytest.raises(ValueError, match=r"`rtol`=1e-12 is below what float32"):
        implicit_bias_limit(X.astype(np.float32), y.astype(np.float32), u0[0].astype(np.float32))
    with pytest.raises(ValueError, match=r"must have shapes \(n, d\)"):
        jax.jit(lambda X_: implicit_bias_limit(X_, y, u0[0]))(X[0])
    # Statuses: out of steps; under jit a rank-deficient X cannot be reduced: failed.
    short = implicit_bias_limit(X, y, u0[3], max_iter=2)
    assert short.status == Status.max_steps and not short.converged
    Xr = X.copy()
    Xr[3] = Xr[2]
    yr = Xr @ np.ones(D)
    traced = jax.jit(lambda X_, y_: implicit_bias_limit(X_, y_, u0[0]))(Xr, yr)
    assert traced.status_name == "failed"
    eager = implicit_bias_limit(Xr, yr, u0[0])  # host-side: the repeated row is dropped
    assert eager.status_name == "success" and float(eager.residual) <= 1e-14
    np.testing.assert_allclose(eager.multiplier @ Xr, eager.eta - dj.Geometry(u0[0]).grad_Q(jnp.prod(jnp.asarray(u0[0]), axis=0)), rtol=1e-10, atol=1e-12)


def test_balanced_coordinates_end_where_the_flow_ends():
    """Balanced coordinates (all |u^j_i| equal, one of them negative: θ_i keeps its sign, the
    half-line geometry) beside untied ones: the limit is where a long run of the
    product flow ends (measured 1e-14 relative; asserted 1e-10), with residual at rounding.
    L = 2 (w = w0·e^{sη}) and 4 (the power form of the gap); every depth is checked against an
    80-digit solve in test_balanced_coordinates_match_extended_precision."""
    X = jax.random.normal(jax.random.PRNGKey(5), (3, 6))
    y = X @ jnp.array([1.0, -0.5, 0.0, 0.0, 0.3, 0.0])
    for L in (2, 4):
        u0 = 0.4 * np.ones((L, 6))
        u0[0, 1] = -0.4
        u0[:, 3:] = np.asarray(dj.gaussian_init(jax.random.PRNGKey(L), L, 3, 0.6))
        lim = implicit_bias_limit(X, y, u0)
        assert lim.status_name == "success" and float(lim.residual) <= 1e-13
        assert np.all(np.sign(lim.theta[:3]) == np.sign(np.prod(u0[:, :3], axis=0)))
        tr = dj.simulate(dj.LeastSquares(X, y), u0, t1=1000.0, rtol=1e-12, atol=1e-14,
                         formulation="reduced")
        assert tr.status_name == "success"
        _close(tr.theta_final, lim.theta, 1e-10)
