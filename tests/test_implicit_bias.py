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
from ddln_jax._implicit_bias import _tail

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
        if self.K >= 2:
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
