"""Per-coordinate mirror geometry of an initialization (docs/math.md, "Conserved quantities and reduction", "Mirror flow and potential", "Robust computation").

From the layers at t = 0 we keep, per coordinate i: the smallest layer m_i, the gaps
δ_{j,i} = u^j_i(0)² − u^m_i(0)² (j ≠ m_i), the sign σ_i, and the signs of the layers.
Everything else is a function of the signed smallest layer w:

    θ = ψ(w) = w ∏_j √(w² + δ_j),      Φ(w) = ∫_0^w dr / ∏_j √(r² + δ_j),
    ∇Q(θ) = Φ(ψ⁻¹(θ)),  ∇Q*(η) = ψ(Φ⁻¹(η)),  Q = θΦ(w) − w²/2,  Q* = ½Φ⁻¹(η)².

L = 1 is Euclidean and L = 2 has closed forms. For L ≥ 3, Φ is a composite Gauss–Legendre
quadrature after the substitution r = √δ₁ sinh s (δ₁ the smallest gap), which makes the
integrand smooth with singularities at distance π/2 from the real axis. The inverses ψ⁻¹ and
Φ⁻¹ are safeguarded Newton iterations whose derivatives come from the implicit function
theorem (custom JVPs), so `jax.grad`, `jax.jvp`, `jax.jit` and `jax.vmap` work through all.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array, Bool, Float, Int, Scalar

from ._init import check_init
from ._validate import is_tracer

# Composite Gauss–Legendre rule on [0, 1]: _PANELS panels of _NODES nodes each. The
# integrand is analytic in a strip of half-width π/2, so the error of one panel of width h
# decays like ρ^(-2·_NODES) with ρ ≈ π/h; 8×64 keeps it below 1e-15 for s up to ~60.
_PANELS = 8
_NODES = 64


def _composite_rule(panels: int, nodes: int):
    xi, wi = np.polynomial.legendre.leggauss(nodes)
    x = (np.arange(panels)[:, None] + (xi[None, :] + 1) / 2) / panels
    w = np.broadcast_to(wi / (2 * panels), x.shape)
    return x.ravel(), w.ravel()


_X, _W = _composite_rule(_PANELS, _NODES)
# A 64-node rule for the first Newton iterations of Φ⁻¹; the full rule finishes them.
_X_COARSE, _W_COARSE = _composite_rule(4, 16)
# Φ(∞): integrate until the integrand, decaying like e^{-(L-2)s}, is below e^{-_TAIL}.
_TAIL = 40.0
_MAX_ITER = 100


def _sign(x):
    """sign with sign(0) = +1."""
    return jnp.where(x < 0, -1.0, 1.0).astype(x.dtype)


def _prod_sqrt(w, delta):
    """∏_j √(w² + δ_j) over the gap axis (1 when there are no gaps)."""
    return jnp.prod(jnp.sqrt(w[None] ** 2 + delta), axis=0)


def _sat(w, delta):
    """w²/(w² + δ_j), with its limit 1 at w = δ_j = 0 (a tie)."""
    w2 = w[None] ** 2
    den = w2 + delta
    return jnp.where(den > 0, w2 / jnp.where(den > 0, den, 1.0), 1.0)


def _psi(w, delta):
    return w * _prod_sqrt(w, delta)


def _dpsi(w, delta):
    return _prod_sqrt(w, delta) * (1 + jnp.sum(_sat(w, delta), axis=0))


def _quad_integrand(s, delta):
    """k(s) = ∏_{j≥2} 1/√(δ₁ sinh² s + δ_j); s has a trailing node axis."""
    d1 = delta[0][..., None]
    rest = delta[1:][..., None]
    sh2 = jnp.sinh(s) ** 2
    return jnp.prod(jax.lax.rsqrt((d1 * sh2)[None] + rest), axis=0)


def _integral(a, b, delta, rule=(_X, _W)):
    """∫_a^b k (L ≥ 3), by the composite rule; a, b broadcast against each other."""
    a, b = jnp.broadcast_arrays(a, b)
    lead = (1,) * jnp.ndim(a)  # the node axis is appended explicitly (no rank promotion)
    x = jnp.asarray(rule[0], dtype=a.dtype).reshape(lead + (-1,))
    wts = jnp.asarray(rule[1], dtype=a.dtype).reshape(lead + (-1,))
    nodes = a[..., None] + (b - a)[..., None] * x
    return (b - a) * jnp.sum(wts * _quad_integrand(nodes, delta), axis=-1)


def _phi_of_s(s, delta, rule=(_X, _W)):
    """∫_0^s k for s ≥ 0 (L ≥ 3), by the composite rule."""
    return _integral(jnp.zeros_like(s), s, delta, rule)


def _s_end(delta):
    """Where the integrand has decayed below e^{-_TAIL} of its value at the last gap."""
    return jnp.arcsinh(jnp.sqrt(delta[-1] / delta[0])) + _TAIL / (delta.shape[0] - 1)


def _phi_quad(w, delta):
    # Past _s_end the rest of the integral is below rounding; clamping makes Φ(±∞) = ±Φ(∞).
    s = jnp.minimum(jnp.arcsinh(jnp.abs(w) / jnp.sqrt(delta[0])), _s_end(delta))
    return jnp.sign(w) * _phi_of_s(s, delta)


def _phi_closed(w, delta):
    K = delta.shape[0]
    if K == 0:
        return w
    if K == 1:
        return jnp.arcsinh(w / jnp.sqrt(delta[0]))
    return _phi_quad(w, delta)


@jax.custom_jvp
def _phi(w, delta):
    return _phi_closed(w, delta)


@_phi.defjvp
def _phi_jvp(primals, tangents):
    w, delta = primals
    dw, ddelta = tangents
    out = _phi(w, delta)
    # dΦ/dw is exact; the δ-derivative goes through the quadrature.
    tangent = dw / _prod_sqrt(w, delta)
    if delta.shape[0] > 0:
        tangent = tangent + jax.jvp(lambda d_: _phi_closed(w, d_), (delta,), (ddelta,))[1]
    return out, tangent


def _phi_inf(delta):
    """Φ(∞) per coordinate: +inf for L ≤ 2, finite for L ≥ 3."""
    K = delta.shape[0]
    if K <= 1:
        return jnp.full(delta.shape[1:], jnp.inf)
    return _phi_of_s(_s_end(delta), delta)


# ---------------------------------------------------------------------------------------------
# Inverses: solver + implicit-function-theorem JVP.


def _implicit_inverse(forward, dforward, solve):
    """w = inverse(target, δ) with forward(w, δ) = target, differentiable by the IFT."""

    @jax.custom_jvp
    def inverse(target, delta):
        return solve(target, delta)

    def jvp(primals, tangents):
        target, delta = primals
        dtarget, ddelta = tangents
        w = inverse(target, delta)
        slope = dforward(w, delta)
        num = jnp.zeros_like(target) if type(dtarget) is SymbolicZero else dtarget
        if type(ddelta) is not SymbolicZero and delta.shape[0] > 0:
            num = num - jax.jvp(lambda d_: forward(w, d_), (delta,), (ddelta,))[1]
        return w, num / slope

    inverse.defjvp(jvp, symbolic_zeros=True)
    return inverse


def _newton_loop(step, init, tol_fn):
    """Iterate `state -> state` until `tol_fn(old, new)` holds everywhere (at most _MAX_ITER)."""

    def cond(carry):
        it, _, done = carry
        return (it < _MAX_ITER) & ~jnp.all(done)

    def body(carry):
        it, x, _ = carry
        x_new = step(x)
        return it + 1, x_new, tol_fn(x, x_new)

    _, out, _ = jax.lax.while_loop(cond, body, (0, init, jnp.zeros(jnp.shape(init[0]), bool)))
    return out


def _psi_inv_solve(theta, delta):
    K = delta.shape[0]
    if K == 0:
        return theta
    if K == 1:
        d = delta[0]
        return theta * jnp.sqrt(2 / (d + jnp.hypot(d, 2 * theta)))  # hypot: no overflow
    # Newton on h(v) = log ψ(e^v) = v + ½ Σ log(e^{2v} + δ_j), convex with slope in [1, L]:
    # from an upper bound it decreases monotonically to the root, for any |θ| and δ.
    a = jnp.abs(theta)
    # Subnormal θ count as 0 (XLA may flush them to zero inside the iteration): an absolute
    # change below the smallest normal number, and w passes through 0 freely here.
    zero = a < jnp.finfo(a.dtype).tiny
    special = zero | jnp.isinf(a)
    c = jnp.log(jnp.where(special, 1.0, a))
    logd = jnp.log(delta)
    v0 = jnp.minimum(c - 0.5 * jnp.sum(logd, axis=0), c / (K + 1))

    def step(state):
        (v,) = state
        lae = jnp.logaddexp(2 * v[None], logd)
        h = v + 0.5 * jnp.sum(lae, axis=0)
        dh = 1 + jnp.sum(jnp.exp(2 * v[None] - lae), axis=0)
        return (v - (h - c) / dh,)

    def tol(old, new):
        return jnp.abs(new[0] - old[0]) <= 4 * jnp.finfo(a.dtype).eps * jnp.maximum(1, jnp.abs(new[0]))

    (v,) = _newton_loop(step, (v0,), tol)
    w = jnp.exp(v)
    w = w - (_psi(w, delta) - a) / _dpsi(w, delta)  # one polishing step in linear scale
    return jnp.where(special, jnp.where(zero, 0.0, theta), jnp.sign(theta) * w)


def _phi_inv_solve(eta, delta):
    K = delta.shape[0]
    if K == 0:
        return eta
    if K == 1:
        return jnp.sqrt(delta[0]) * jnp.sinh(eta)
    # Newton in s = asinh(w/√δ₁) on the concave increasing Φ(s), from a lower bound and kept
    # in a bracket [lo, hi] built from Φ(w) ≤ w/∏√δ_j and the tail bounds
    # (w+√δ_K)^{-(L-2)}/(L-2) ≤ Φ(∞) − Φ(w) ≤ w^{-(L-2)}/(L-2).
    p = K - 1
    a = jnp.abs(eta)
    box = _phi_inf(delta)
    inside = a < box
    gap = jnp.where(inside, box - a, 1.0)
    sd1 = jnp.sqrt(delta[0])
    w_tail = (p * gap) ** (-1.0 / p)
    w_lo = jnp.maximum(a * jnp.prod(jnp.sqrt(delta), axis=0), w_tail - jnp.sqrt(delta[-1]))
    to_s = lambda w: jnp.arcsinh(w / sd1)
    lo, hi = to_s(w_lo), to_s(jnp.maximum(w_tail, w_lo))

    # Past the middle of the box Newton runs on the gap itself, log(∫_s^∞ k) = log(Φ(∞) − |η|):
    # nearly linear in s in the tail (k ≈ C·e^{−(L−2)s}), so it converges in a few steps where
    # the residual Φ(s) − |η|, flat there, took a dozen, and the tail integral has no
    # cancellation (its only error is the rounding of Φ(∞) − |η| itself).
    tail = a > 0.5 * box
    s_end = _s_end(delta)
    log_gap = jnp.log(gap)

    def make_step(rule):
        def step(state):
            s, lo, hi = state
            k = _quad_integrand(s[..., None], delta)[..., 0]
            # One quadrature: ∫_s^∞ k in the tail, Φ(s) = ∫_0^s k elsewhere.
            start = jnp.where(tail, jnp.minimum(s, s_end), 0.0)
            val = _integral(start, jnp.where(tail, s_end, s), delta, rule)
            T = jnp.where(tail, val, 1.0)
            # Both residuals increase with s and vanish at the root (T = 0: far past it).
            f = jnp.where(tail, jnp.where(T > 0, log_gap - jnp.log(jnp.where(T > 0, T, 1.0)), jnp.inf),
                          val - a)
            slope = jnp.where(tail, k / jnp.where(T > 0, T, 1.0), k)
            lo = jnp.where(f <= 0, s, lo)
            hi = jnp.where(f >= 0, s, hi)
            s_new = s - f / slope
            ok = (s_new >= lo) & (s_new <= hi) & jnp.isfinite(s_new)
            return jnp.where(ok, s_new, 0.5 * (lo + hi)), lo, hi

        return step

    def make_tol(rel):
        def tol(old, new):
            small = jnp.abs(new[0] - old[0]) <= rel * jnp.abs(new[0])
            # Two floats a few ulps apart can trap Newton in a 2-cycle: a bracket that narrow
            # is converged too.
            return small | (new[2] - new[1] <= 2 * rel * new[2]) | ~inside

        return tol

    # Cheap iterations to ~1e-9, then the full rule (quadratic convergence: one or two steps),
    # restarted in the analytic bracket, which holds for the exact Φ.
    eps = jnp.finfo(a.dtype).eps
    s, _, _ = _newton_loop(make_step((_X_COARSE, _W_COARSE)), (lo, lo, hi), make_tol(1e-9))
    s = jnp.clip(s, lo, hi)
    s, _, _ = _newton_loop(make_step((_X, _W)), (s, lo, hi), make_tol(4 * eps))
    w = sd1 * jnp.sinh(s)
    return jnp.where(inside, jnp.sign(eta) * w, jnp.sign(eta) * jnp.inf)


_psi_inv = _implicit_inverse(_psi, _dpsi, _psi_inv_solve)
_phi_inv = _implicit_inverse(_phi, lambda w, d: 1 / _prod_sqrt(w, d), _phi_inv_solve)


# ---------------------------------------------------------------------------------------------
# Half-line coordinates (docs/math.md, "Assumption A and the balanced (half-line) geometry"). When every gap of a coordinate is 0 (a balanced
# coordinate: |u^j_i(0)| equal for all j), w keeps the sign s of w0 and Φ diverges at 0, so ∇Q
# is anchored at the init instead of at 0 (only differences of ∇Q matter):
#     Φ(w) = ∫_{w0}^{w} dr/|r|^K = s·ℓ (K = 1),   s·|w0|^{-p}(1 − e^{−pℓ})/p (K ≥ 2, p = K − 1),
# with ℓ = log(|w|/|w0|), which keeps Φ accurate near the anchor. Q is anchored the same way:
# Q = θΦ(w) − (w² − w0²)/2, Q* = (w² − w0²)/2 = ½w0² expm1(2ℓ), so Q(θ0) = 0 and ∇Q(θ0) = 0.
# Coordinates with two or more zero layers (tied at w0 = 0) are frozen at θ = 0: Q is the
# indicator of {0}, g = 0, ∇Q* ≡ 0. A tie of the two smallest layers with some gap > 0 (a
# "partial" tie, L ≥ 3) has no potential written here: Φ-based maps give NaN there and the
# constructor refuses it on concrete input.


def _kinds(delta, w0):
    """Per coordinate: `tied` (every gap 0, or frozen), `partial` (smallest gap 0, another > 0,
    w0 ≠ 0), `frozen` (smallest gap 0 at w0 = 0: two or more layers at 0)."""
    if delta.shape[0] == 0:
        no = jnp.zeros(delta.shape[1:], bool)
        return no, no, no
    tied = jnp.all(delta == 0, axis=0)
    # Two or more layers at 0: w ≡ 0 (ẇ has the factor |w|), θ ≡ 0, whatever the other gaps.
    frozen = (delta[0] == 0) & (w0 == 0)
    return tied | frozen, (delta[0] == 0) & ~tied & ~frozen, frozen


def _tied_phi(w, w0, K):
    """Φ on a half-line anchored at w0 ≠ 0; −s·∞ at w = 0 and on the wrong side."""
    s, a0 = _sign(w0), jnp.abs(w0)
    on = s * w > 0
    ell = jnp.log(jnp.where(on, jnp.abs(w), a0) / a0)
    if K == 1:
        val = s * ell
    else:
        p = K - 1
        val = s * a0 ** (-p) * (-jnp.expm1(-p * ell)) / p
    return jnp.where(on, val, -s * jnp.inf)


def _tied_ell(eta, w0, K):
    """ℓ = log(|w|/|w0|) of w = Φ⁻¹(η) on a half-line; +inf past the face (K ≥ 2)."""
    s, a0 = _sign(w0), jnp.abs(w0)
    if K == 1:
        return s * eta
    p = K - 1
    x = p * s * eta * a0**p
    inside = x < 1
    return jnp.where(inside, -jnp.log1p(-jnp.where(inside, x, 0.0)) / p, jnp.inf)


def _tied_face(w0, K):
    """|η| of the face of a half-line (the value of s·Φ(±∞)); +inf for K = 1."""
    if K == 1:
        return jnp.full(w0.shape, jnp.inf, w0.dtype)
    p = K - 1
    return jnp.abs(w0) ** (-p) / p


def _phi_all(w, delta, w0):
    """Φ for every kind of coordinate (the untied maps get safe inputs where they do not apply,
    so that neither values nor derivatives pick up NaN through `jnp.where`)."""
    K = delta.shape[0]
    if K == 0:
        return w
    tied, partial, frozen = _kinds(delta, w0)
    special = tied | partial
    out = _phi(jnp.where(special, 0.0, w), jnp.where(special[None], 1.0, delta))
    half = tied & ~frozen
    t = _tied_phi(jnp.where(half, w, 1.0), jnp.where(half, w0, 1.0), K)
    out = jnp.where(half, t, jnp.where(frozen, 0.0, out))
    return jnp.where(partial, jnp.nan, out)


def _phi_inv_all(eta, delta, w0):
    """(w, ℓ): w = Φ⁻¹(η) and, on half-lines, ℓ = log(|w|/|w0|) (0 elsewhere)."""
    K = delta.shape[0]
    if K == 0:
        return eta, jnp.zeros_like(eta)
    tied, partial, frozen = _kinds(delta, w0)
    special = tied | partial
    # The untied branch is a Newton iteration with quadratures: skip it when no coordinate
    # needs it (balanced inits; under vmap both branches run anyway).
    out = jax.lax.cond(
        jnp.all(special),
        lambda e, dl: jnp.zeros_like(e),
        lambda e, dl: _phi_inv(e, dl),
        jnp.where(special, 0.0, eta), jnp.where(special[None], 1.0, delta),
    )
    half = tied & ~frozen
    w0s = jnp.where(half, w0, 1.0)
    ell = _tied_ell(jnp.where(half, eta, 0.0), w0s, K)
    out = jnp.where(half, w0s * jnp.exp(ell), jnp.where(frozen, 0.0, out))
    return jnp.where(partial, jnp.nan, out), jnp.where(half, ell, 0.0)


def _psi_inv_all(theta, delta, w0):
    K = delta.shape[0]
    if K == 0:
        return theta
    tied, _, _ = _kinds(delta, w0)
    out = _psi_inv(jnp.where(tied, 0.0, theta), jnp.where(tied[None], 1.0, delta))
    ok = tied & (theta != 0)
    ts = jnp.where(ok, theta, 1.0)
    root = _sign(ts) * jnp.abs(ts) ** (1.0 / (K + 1))
    return jnp.where(tied, jnp.where(ok, root, 0.0), out)


def _eta_bounds(delta, w0):
    """The open interval of η where ∇Q* is finite, per coordinate."""
    K = delta.shape[0]
    inf = jnp.full(w0.shape, jnp.inf, w0.dtype)
    if K <= 1:
        return -inf, inf
    tied, partial, frozen = _kinds(delta, w0)
    special = tied | partial
    box = _phi_inf(jnp.where(special[None], 1.0, delta))
    half = tied & ~frozen
    face = _tied_face(jnp.where(half, w0, 1.0), K)
    pos = w0 > 0
    lo = jnp.where(half, jnp.where(pos, -inf, -face), jnp.where(frozen, -inf, -box))
    hi = jnp.where(half, jnp.where(pos, face, inf), jnp.where(frozen, inf, box))
    nan = jnp.full(w0.shape, jnp.nan, w0.dtype)
    return jnp.where(partial, nan, lo), jnp.where(partial, nan, hi)


def _metric_w(w, delta):
    return jnp.prod(w[None] ** 2 + delta, axis=0) * (1 + jnp.sum(_sat(w, delta), axis=0))


def _q_star_all(eta, delta, w0):
    """Q*(η) per coordinate: ½w² (untied), ½(w² − w0²) (half-line), 0 (frozen)."""
    w, ell = _phi_inv_all(eta, delta, w0)
    return _q_star_from(w, ell, delta, w0)


def _q_star_from(w, ell, delta, w0):
    tied, _, frozen = _kinds(delta, w0)
    half = tied & ~frozen
    tq = 0.5 * w0**2 * jnp.expm1(2 * ell)
    return jnp.where(half, tq, jnp.where(frozen, 0.0, 0.5 * w**2))


# ---------------------------------------------------------------------------------------------
# Checks on concrete inits (NumPy, before anything is traced).

# η and the slopes of ∇Q must stay below this (in absolute value) for the maps to be
# computable in the working precision; beyond it they would overflow on the way.
_BIG_LOG = float(np.log(1e250))


def _gaps_np(u0):
    # Layers along the contiguous axis: NumPy's argmin/sort along axis 0 of an (L, N) array
    # crawl (seconds for a batch of 2000 inits of width 1000).
    a = np.ascontiguousarray(np.abs(u0).T)
    m = np.argmin(a, axis=-1)
    srt = np.sort(a, axis=-1)
    am = srt[:, :1]
    # (|u_j| − |u_m|)(|u_j| + |u_m|): exactly 0 at a tie, no cancellation; ascending.
    delta = ((srt[:, 1:] - am) * (srt[:, 1:] + am)).T
    return delta, m, am[:, 0]


def _log_phi_inf_np(delta):
    """log Φ(∞) per coordinate (untied, K ≥ 2) by the coarse rule in the log domain."""
    d1 = delta[0]
    s_end = np.arcsinh(np.sqrt(delta[-1] / d1)) + _TAIL / (delta.shape[0] - 1)
    x, w = _composite_rule(4, 16)
    s = s_end[..., None] * x
    log_sh2 = 2 * np.log(np.sinh(s))
    log_k = -0.5 * np.sum(
        np.logaddexp(np.log(d1)[None, :, None] + log_sh2[None], np.log(delta[1:])[..., None]),
        axis=0,
    )
    return np.log(s_end) + np.log(np.sum(w * np.exp(log_k - log_k.max(-1, keepdims=True)), -1)) + log_k.max(-1)


def geometry_problems(u0) -> dict[str, np.ndarray]:
    """Coordinates of a concrete init whose mirror geometry cannot be computed here.

    Returns a dict from a reason to the coordinate indices (empty when all is well):
    `"partial_tie"` (the two smallest layers tie while another gap is > 0, L ≥ 3),
    `"subnormal_gap"` (0 < δ below the smallest normal float: no correct digits left),
    `"overflow"` (Φ(∞), 1/∏√δ or the half-line face exceed ~1e250: η would overflow),
    `"underflow"` (a half-line coordinate whose θ0 = ±|w0|^L underflows, losing its anchor).
    """
    u0 = np.asarray(u0)
    dtype = u0.dtype if np.issubdtype(u0.dtype, np.floating) else np.float64
    L, d = u0.shape
    out = {}
    if L == 1:
        return out
    with np.errstate(all="ignore"):
        delta, _, am = _gaps_np(u0.astype(np.float64))
        K = L - 1
        tiny = np.finfo(dtype).tiny
        frozen = (delta[0] == 0) & (am == 0)
        tied = np.all(delta == 0, axis=0) | frozen
        partial = (delta[0] == 0) & ~tied
        sub = np.any((delta > 0) & (delta < tiny), axis=0)
        half = tied & ~frozen
        over = np.zeros(d, bool)
        under = half & (L * np.log(np.where(half, am, 1.0)) < np.log(tiny) + 1)
        untied = ~tied & ~partial & ~sub
        if K >= 2:
            p = K - 1
            over |= half & (-p * np.log(np.where(half, am, 1.0)) - np.log(p) > _BIG_LOG)
            if np.any(untied):
                dl = delta[:, untied]
                # Φ(∞) and the largest slope of ∇Q, Φ'(0) = 1/∏√δ_j, bound |η| and ∇²Q.
                # Φ(∞) ≤ 1/∏√δ_j + 1/(K − 1) (the integrand is ≤ 1/∏√δ_j on [0, 1] and ≤ r^{-K}
                # past 1), so the slope bound decides, and the quadrature runs only where
                # that bound is close to the limit (it is the slow part of a big batch).
                slope = -0.5 * np.sum(np.log(dl), 0)
                bad = slope > _BIG_LOG
                near = ~bad & (slope > _BIG_LOG - 2)
                if np.any(near):
                    bad[near] = _log_phi_inf_np(dl[:, near]) > _BIG_LOG
                over[np.flatnonzero(untied)[bad]] = True
        # θ0 and g(θ0) = ∏(w0² + δ_j)(1 + Σ w0²/(w0² + δ_j)) must be representable too.
        log_w2 = 2 * np.log(am)
        log_g = np.sum(np.logaddexp(log_w2, np.log(delta)), axis=0) + np.log(L)
        log_theta = np.sum(np.log(np.abs(u0.astype(np.float64))), axis=0)
        over |= ~partial & ((log_g > _BIG_LOG) | (log_theta > _BIG_LOG))
        for name, mask in [("partial_tie", partial), ("subnormal_gap", sub), ("overflow", over),
                           ("underflow", under)]:
            if np.any(mask):
                out[name] = np.flatnonzero(mask)
    return out


_PROBLEM_TEXT = {
    "partial_tie": "the two smallest |u^j_i| tie while another layer is larger (L ≥ 3): the "
    "potential of such a coordinate is not implemented",
    "subnormal_gap": "a gap δ = u_j² − u_m² underflows to a subnormal number (no correct "
    "digits left)",
    "overflow": "θ0, the metric g(θ0), the dual variable η = ∇Q(θ) or the slope of ∇Q would "
    "exceed 1e250 (huge layers, or tiny gaps at L ≥ 3)",
    "underflow": "θ0 = ±|u|^L of a balanced coordinate underflows, so its anchor is lost",
}


def _problem_message(name, problems):
    parts = []
    for reason, idx in problems.items():
        parts.append(f"{_PROBLEM_TEXT[reason]} at coordinates {idx[:10].tolist()}"
                     f"{' ...' if idx.size > 10 else ''}")
    return (
        f"`{name}` has no computable mirror geometry: " + "; ".join(parts) + ". The 'layer' and "
        "'reduced' formulations do not need it; otherwise perturb or rescale the init (with "
        "u → s·u, θ → s^L θ)."
    )


def _check_shape(name, x, shape):
    if jnp.shape(x) != shape:
        raise ValueError(
            f"`{name}` must have shape {shape} (one entry per coordinate; vmap for batches), "
            f"got shape {jnp.shape(x)}"
        )


# ---------------------------------------------------------------------------------------------


class Geometry(eqx.Module):
    """The mirror geometry of one initialization (batch it with `jax.vmap`).

    Construct it with `Geometry(u0)`: `u0` has shape `(L, d)`. Coordinatewise maps take and
    return arrays of shape `(d,)`; `Q`, `Q_star` and `bregman` return scalars (Q is separable).

    Three kinds of coordinates coexist (docs/math.md, "Mirror flow and potential", "Assumption A and the balanced (half-line) geometry"):

    - **untied** (a unique smallest layer, Assumption A): Q is finite on ℝ, normalized by
      Q(0) = 0 and ∇Q(0) = 0;
    - **half-line** (every gap 0, e.g. the balanced init |u^j(0)| = α): θ keeps the sign of
      θ0 and Q lives on that half-line, anchored at the init: Q(θ0) = 0, ∇Q(θ0) = 0,
      g = L|θ|^{2−2/L}; for L ≥ 3, η = ∇Q(θ) is bounded on the growing side (a box face);
    - **frozen** (two or more layers at 0): θ ≡ 0, g = 0, Q is the indicator of {0}.

    A tie of the two smallest layers with another layer larger (L ≥ 3) has no potential here
    (NaN from Φ-based maps; refused on concrete input), nor has an init whose gaps or dual
    values fall outside float64 (see [`ddln_jax.geometry_problems`][]).

    **Fields:**

    - `delta`: the gaps δ_{j,i} (j ≠ m_i), sorted ascending, shape `(L-1, d)`.
    - `delta_full`: u^j_i(0)² − u^m_i(0)², shape `(L, d)` (0 on the smallest layer).
    - `m`: index of the smallest layer per coordinate, shape `(d,)`.
    - `sigma`: σ_i = sign ∏_{j≠m} u^j_i(0) (sign 0 = +1), shape `(d,)`.
    - `signs`: sign of each layer at t = 0 (sign 0 = +1), shape `(L, d)`.
    - `w0`: the reduced state at t = 0, σ·u^m(0) (the anchor of half-line coordinates).

    **Properties:** `phi_inf` (Φ_i(∞), +inf for L ≤ 2; on half-lines the distance from the
    anchor to the face), `eta_bounds` (the open interval of η per coordinate), `tied`,
    `frozen`, `partial` (masks of the coordinate kinds).
    """

    delta: Float[Array, "K d"]
    delta_full: Float[Array, "L d"]
    m: Int[Array, " d"]
    sigma: Float[Array, " d"]
    signs: Float[Array, "L d"]
    w0: Float[Array, " d"]

    def __init__(self, u0, *, require_assumption_a: bool = True):
        """**Arguments:**

        - `u0`: layers at t = 0, shape `(L, d)`.
        - `require_assumption_a`: raise a `ValueError` when some coordinate has no
          computable potential (checked only on concrete arrays; see
          [`ddln_jax.geometry_problems`][]). Balanced (half-line) and frozen coordinates are
          accepted. Without the check the layer maps (`layers`, `reduce`, `psi`, `metric`)
          stay valid everywhere and the Φ-based maps are NaN on the refused coordinates.
        """
        if not is_tracer(u0):
            u0 = check_init(u0)
            if require_assumption_a:
                problems = geometry_problems(np.asarray(u0))
                if problems:
                    raise ValueError(_problem_message("u0", problems))
        u0 = jnp.asarray(u0)
        a = jnp.abs(u0)
        m = jnp.argmin(a, axis=0)
        am = jnp.take_along_axis(a, m[None], axis=0)[0]
        # (|u_j| − |u_m|)(|u_j| + |u_m|) ≥ 0: exactly 0 at a tie (also under jit), and no
        # cancellation for close layers.
        self.delta_full = (a - am[None]) * (a + am[None])
        self.delta = jnp.sort(self.delta_full, axis=0)[1:]
        self.m = m
        self.signs = _sign(u0)
        self.sigma = jnp.prod(self.signs, axis=0) * jnp.take_along_axis(self.signs, m[None], 0)[0]
        self.w0 = self.sigma * jnp.take_along_axis(u0, m[None], axis=0)[0]

    @property
    def d(self) -> int:
        return self.delta_full.shape[1]

    @property
    def depth(self) -> int:
        return self.delta_full.shape[0]

    @property
    def tied(self) -> Bool[Array, " d"]:
        """Half-line coordinates (every gap 0), frozen ones included."""
        return _kinds(self.delta, self.w0)[0]

    @property
    def partial(self) -> Bool[Array, " d"]:
        return _kinds(self.delta, self.w0)[1]

    @property
    def frozen(self) -> Bool[Array, " d"]:
        return _kinds(self.delta, self.w0)[2]

    @property
    def phi_inf(self) -> Float[Array, " d"]:
        lo, hi = self.eta_bounds
        return jnp.where(self.w0 < 0, -lo, hi)

    @property
    def eta_bounds(self) -> tuple[Float[Array, " d"], Float[Array, " d"]]:
        """(η_min, η_max): where ∇Q* is finite, per coordinate (±Φ(∞) when untied)."""
        return _eta_bounds(self.delta, self.w0)

    def _vec(self, name, x):
        _check_shape(name, x, (self.d,))

    def gaps(self, u: Float[Array, "L d"]) -> Float[Array, "L d"]:
        """The conserved quantities u^j² − u^m² of layers `u` (equal to `delta_full` along
        the flow)."""
        _check_shape("u", u, self.delta_full.shape)
        return u**2 - jnp.take_along_axis(u, self.m[None], axis=0) ** 2

    # --- reduced state ------------------------------------------------------------------------
    def reduce(self, u: Float[Array, "L d"]) -> Float[Array, " d"]:
        """Signed smallest layer w = σ u^m."""
        _check_shape("u", u, self.delta_full.shape)
        return self.sigma * jnp.take_along_axis(u, self.m[None], axis=0)[0]

    def layers(self, w: Float[Array, " d"]) -> Float[Array, "L d"]:
        """The layers u(t) from w(t): u^m = σw, u^j = sign(u^j(0))·√(w² + δ_j)."""
        self._vec("w", w)
        rows = jnp.arange(self.depth)[:, None]
        others = self.signs * jnp.sqrt(w[None] ** 2 + self.delta_full)
        return jnp.where(rows == self.m[None], self.sigma[None] * w[None], others)

    # --- maps between w, θ and η --------------------------------------------------------------
    def psi(self, w: Float[Array, " d"]) -> Float[Array, " d"]:
        """θ = ψ(w) = w ∏_j √(w² + δ_j)."""
        self._vec("w", w)
        return _psi(w, self.delta)

    def psi_inv(self, theta: Float[Array, " d"]) -> Float[Array, " d"]:
        """w = ψ⁻¹(θ)."""
        self._vec("theta", theta)
        return _psi_inv_all(theta, self.delta, self.w0)

    def phi(self, w: Float[Array, " d"]) -> Float[Array, " d"]:
        """Φ(w) = ∫_0^w dr / ∏_j √(r² + δ_j) (from w0 on half-lines)."""
        self._vec("w", w)
        return _phi_all(w, self.delta, self.w0)

    def phi_inv(self, eta: Float[Array, " d"]) -> Float[Array, " d"]:
        """w = Φ⁻¹(η); ±inf past a box face (L ≥ 3)."""
        self._vec("eta", eta)
        return _phi_inv_all(eta, self.delta, self.w0)[0]

    def metric(self, theta: Float[Array, " d"]) -> Float[Array, " d"]:
        """g(θ) = ∏_j (w² + δ_j)·(1 + Σ_j w²/(w² + δ_j)): θ̇ = −g(θ) ⊙ ∇f(θ)."""
        return self.metric_w(self.psi_inv(theta))

    def metric_w(self, w: Float[Array, " d"]) -> Float[Array, " d"]:
        """g as a function of w (no inversion needed)."""
        self._vec("w", w)
        return _metric_w(w, self.delta)

    # --- the potential ------------------------------------------------------------------------
    def grad_Q(self, theta: Float[Array, " d"]) -> Float[Array, " d"]:
        """The mirror map ∇Q(θ) = Φ(ψ⁻¹(θ))."""
        return self.phi(self.psi_inv(theta))

    def grad_Q_star(self, eta: Float[Array, " d"]) -> Float[Array, " d"]:
        """The inverse mirror map ∇Q*(η) = ψ(Φ⁻¹(η))."""
        return self.psi(self.phi_inv(eta))

    def Q(self, theta: Float[Array, " d"]) -> Scalar:
        """Q(θ) = Σ_i θ_i Φ_i(w_i) − (w_i² − c_i)/2 with c_i = w0_i² on half-lines (so Q = 0
        at θ0 there) and 0 elsewhere (Q(0) = 0); +inf off a half-line."""
        w = self.psi_inv(theta)
        tied, frozen = self.tied, self.frozen
        half = tied & ~frozen
        zero = theta == 0
        lin = jnp.where(half & zero, 0.0, theta * self.phi(w))
        q = lin - 0.5 * jnp.where(half, (w - self.w0) * (w + self.w0), w**2)
        q = jnp.where(frozen, jnp.where(zero, 0.0, jnp.inf), q)
        return jnp.sum(q)

    def Q_star(self, eta: Float[Array, " d"]) -> Scalar:
        """Q*(η) = Σ_i ½(Φ_i⁻¹(η_i)² − c_i) (+inf past a box face for L ≥ 3)."""
        self._vec("eta", eta)
        return jnp.sum(_q_star_all(eta, self.delta, self.w0))

    def hess_Q_diag(self, theta: Float[Array, " d"]) -> Float[Array, " d"]:
        """The diagonal of ∇²Q(θ), 1/g(θ)."""
        return 1 / self.metric(theta)

    def bregman(self, a: Float[Array, " d"], b: Float[Array, " d"]) -> Scalar:
        """D_Q(a, b) = Q(a) − Q(b) − ⟨∇Q(b), a − b⟩ ≥ 0."""
        wa, wb = self.psi_inv(a), self.psi_inv(b)
        # Written as Σ a(Φ(w_a) − Φ(w_b)) − (w_a² − w_b²)/2, which avoids forming Q itself.
        lin = a * (self.phi(wa) - self.phi(wb))
        # On a half-line a·Φ(a) → 0 as a → 0 (Φ diverges only like log or a^{-(L-2)/L}).
        lin = jnp.where(self.tied & (a == 0), 0.0, lin)
        out = lin - 0.5 * (wa - wb) * (wa + wb)
        out = jnp.where(self.frozen, jnp.where((a == 0) & (b == 0), 0.0, jnp.inf), out)
        return jnp.sum(out)


# ---------------------------------------------------------------------------------------------
# Signed networks θ = θ⁺ − θ⁻ (docs/math.md, "Signed models"). Each half is a product network with its own
# geometry; we keep both in one `Geometry` on 2d coordinates, [+ half | − half]. With
# η = ∇Q⁺(θ⁺), the sum ∇Q⁺(θ⁺) + ∇Q⁻(θ⁻) = c is conserved, and θ = ∇R*(η) with
# R*(η) = Q⁺*(η) + Q⁻*(c − η). Going back from θ to η (∇R) is a monotone scalar equation per
# coordinate, θ(η) = ∇Q⁺*(η) − ∇Q⁻*(c − η) = θ, with dθ/dη = g⁺ + g⁻ > 0.


def _signed_eval(eta, delta, w0, c):
    """θ(η), g⁺ + g⁻ and the halves' reduced states (w⁺, w⁻) and ℓ's, shape (2, d)."""
    E = jnp.concatenate([eta, c - eta])
    w, ell = _phi_inv_all(E, delta, w0)
    T = _psi(w, delta)
    g = _metric_w(w, delta)
    d = eta.shape[0]
    theta = T[:d] - T[d:]
    if delta.shape[0] > 0:
        # Two half-lines of the same sign (Woodworth's init): θ = s|θ⁻|·expm1(log|θ⁺| − log|θ⁻|)
        # with log|θ±| = L(log|w0±| + ℓ±), exact where θ⁺ − θ⁻ would cancel (|θ| ≪ |θ±|).
        L = delta.shape[0] + 1
        tied, _, frozen = _kinds(delta, w0)
        half = tied & ~frozen
        a0 = jnp.abs(jnp.where(half, w0, 1.0))
        same = half[:d] & half[d:] & (w0[:d] * w0[d:] > 0)
        diff = L * (jnp.log(a0[:d] / a0[d:]) + ell[:d] - ell[d:])
        close = same & (jnp.abs(diff) < 1)
        exact = jnp.sign(w0[:d]) * jnp.abs(T[d:]) * jnp.expm1(jnp.where(close, diff, 0.0))
        theta = jnp.where(close, exact, theta)
    return theta, g[:d] + g[d:], w.reshape(2, d), ell.reshape(2, d)


def _signed_bounds(delta, w0, c):
    lo, hi = _eta_bounds(delta, w0)
    d = c.shape[0]
    return jnp.maximum(lo[:d], c - hi[d:]), jnp.minimum(hi[:d], c - lo[d:])


def _signed_scale(delta, w0):
    """Per coordinate, the θ-scale at which the metric of either half changes regime."""
    T0 = jnp.abs(_psi(w0, delta))
    if delta.shape[0] > 0:
        T0 = T0 + jnp.abs(_psi(jnp.sqrt(delta[0]), delta))
    d = w0.shape[0] // 2
    tau = T0[:d] + T0[d:]
    return jnp.where(tau > 0, tau, 1.0)


def _eta_solve(theta, delta, w0, c):
    """η with ∇R*(η) = θ: safeguarded Newton on asinh(θ(η)/τ) (nearly linear in η where θ
    grows exponentially or like a power), inside a bracket that bisects or expands."""
    lo, hi = _signed_bounds(delta, w0, c)
    tau = _signed_scale(delta, w0)
    d = theta.shape[0]
    eta0 = _phi_all(w0, delta, w0)[:d]  # θ(η0) = θ0
    target = jnp.arcsinh(theta / tau)
    eps = jnp.finfo(theta.dtype).eps

    def step(state):
        eta, lo, hi, _ = state
        th, g, _, _ = _signed_eval(eta, delta, w0, c)
        F = jnp.arcsinh(th / tau) - target
        lo = jnp.where(F <= 0, eta, lo)
        hi = jnp.where(F >= 0, eta, hi)
        slope = g / jnp.sqrt(tau**2 + th**2)
        newton = eta - F / slope
        ok = (newton > lo) & (newton < hi) & jnp.isfinite(newton)
        width = jnp.maximum(1.0, jnp.abs(eta))
        fallback = jnp.where(
            jnp.isfinite(lo) & jnp.isfinite(hi), 0.5 * (lo + hi),
            jnp.where(jnp.isfinite(lo), lo + width, hi - width),
        )
        new = jnp.where(F == 0, eta, jnp.where(ok, newton, fallback))
        return new, lo, hi, eta

    def tol(old, new):
        eta, lo, hi, prev = new
        small = jnp.abs(eta - prev) <= 4 * eps * jnp.abs(eta)
        width = hi - lo
        collapsed = jnp.isfinite(width) & (width <= 4 * eps * jnp.maximum(jnp.abs(lo), jnp.abs(hi)))
        return small | collapsed | (
            theta == jnp.inf) | (theta == -jnp.inf)

    start = jnp.clip(eta0, lo, hi)
    eta, _, _, _ = _newton_loop(step, (start, lo, hi, start + 1.0), tol)
    return eta


@jax.custom_jvp
def _eta_of_theta(theta, delta, w0, c):
    return _eta_solve(theta, delta, w0, c)


@_eta_of_theta.defjvp
def _eta_of_theta_jvp(primals, tangents):
    theta, delta, w0, c = primals
    dtheta, ddelta, dw0, dc = tangents
    eta = _eta_of_theta(theta, delta, w0, c)
    _, g, _, _ = _signed_eval(eta, delta, w0, c)
    # θ(η; δ, w0, c) = θ  ⇒  (g⁺ + g⁻) dη = dθ − ∂θ/∂(δ, w0, c)·(dδ, dw0, dc).
    forward = lambda d_, w_, c_: _signed_eval(eta, d_, w_, c_)[0]
    _, dparams = jax.jvp(forward, (delta, w0, c), (ddelta, dw0, dc))
    return eta, (dtheta - dparams) / g


class SignedGeometry(eqx.Module):
    """The mirror geometry of a signed network θ = θ⁺ − θ⁻, θ± = ∏_j u^{±j} (docs/math.md, "Signed models").

    Construct it with `SignedGeometry(u0)`, `u0` of shape `(2, L, d)` (index 0 = the + half).
    θ follows the mirror flow θ̇ = −(g⁺(θ⁺) + g⁻(θ⁻)) ⊙ ∇f(θ) with potential R, whose conjugate
    is R*(η) = Q⁺*(η) + Q⁻*(c − η), η = ∇Q⁺(θ⁺), c = ∇Q⁺(θ0⁺) + ∇Q⁻(θ0⁻) (conserved). Every
    kind of half-coordinate of [`ddln_jax.Geometry`][] is allowed, balanced halves (the
    Woodworth init w±(0) = α) included. Maps take and return arrays of shape `(d,)` (the
    reduced state is `(2, d)`); jittable, vmappable and differentiable (∇R by an implicit-
    function-theorem JVP of a per-coordinate root find).

    The names of [`ddln_jax.Geometry`][] are kept where they mean the same thing for θ
    (`grad_Q` is ∇R, `Q` is R, `metric` is g⁺ + g⁻, `bregman` is D_R, ...), so code written
    for the product model runs on the signed one.

    **Fields:**

    - `halves`: the [`ddln_jax.Geometry`][] of the 2d coordinates [+ half | − half].
    - `c`: ∇Q⁺(θ0⁺) + ∇Q⁻(θ0⁻), shape `(d,)`.
    """

    halves: Geometry
    c: Float[Array, " d"]

    def __init__(self, u0, *, require_assumption_a: bool = True):
        """**Arguments:**

        - `u0`: layers at t = 0, shape `(2, L, d)`: `u0[0]` the + half, `u0[1]` the − half.
        - `require_assumption_a`: refuse (on concrete input) half-coordinates without a
          computable potential, as [`ddln_jax.Geometry`][] does.
        """
        if jnp.ndim(u0) != 3 or jnp.shape(u0)[0] != 2:
            raise ValueError(
                f"`u0` of a signed network must have shape (2, L, d) (index 0 = the + half), "
                f"got shape {jnp.shape(u0)}"
            )
        if not is_tracer(u0):
            u0 = jnp.asarray(check_init(np.asarray(u0).reshape(-1, jnp.shape(u0)[-1]))).reshape(
                jnp.shape(u0))
            if require_assumption_a:
                stacked = np.concatenate([np.asarray(u0[0]), np.asarray(u0[1])], axis=-1)
                problems = geometry_problems(stacked)
                if problems:
                    d = u0.shape[-1]
                    problems = {k: np.unique(v % d) for k, v in problems.items()}
                    raise ValueError(_problem_message("u0", problems))
        u0 = jnp.asarray(u0)
        self.halves = Geometry(jnp.concatenate([u0[0], u0[1]], axis=-1), require_assumption_a=False)
        h = self.halves
        eta0 = _phi_all(h.w0, h.delta, h.w0)
        d = u0.shape[-1]
        self.c = eta0[:d] + eta0[d:]

    @property
    def d(self) -> int:
        return self.c.shape[0]

    @property
    def depth(self) -> int:
        return self.halves.depth

    def _vec(self, name, x):
        _check_shape(name, x, (self.d,))

    def _split(self, x):
        return jnp.stack([x[: self.d], x[self.d :]])

    def _join(self, x):
        return jnp.concatenate([x[0], x[1]])

    @property
    def delta_full(self) -> Float[Array, "2 L d"]:
        """The gaps of both halves, shape `(2, L, d)`."""
        return jnp.stack([self.halves.delta_full[:, : self.d], self.halves.delta_full[:, self.d :]])

    @property
    def eta_bounds(self) -> tuple[Float[Array, " d"], Float[Array, " d"]]:
        """The open interval of η = ∇R(θ) where ∇R* is finite, per coordinate."""
        h = self.halves
        return _signed_bounds(h.delta, h.w0, self.c)

    @property
    def eta0(self) -> Float[Array, " d"]:
        """η at t = 0, ∇Q⁺(θ0⁺) (no root find: from the reduced init)."""
        h = self.halves
        return _phi_all(h.w0[: self.d], h.delta[:, : self.d], h.w0[: self.d])

    def theta0(self) -> Float[Array, " d"]:
        h = self.halves
        T0 = _psi(h.w0, h.delta)
        return T0[: self.d] - T0[self.d :]

    def gaps(self, u: Float[Array, "2 L d"]) -> Float[Array, "2 L d"]:
        """The conserved quantities u^{±j}² − u^{±m}², shape `(2, L, d)`."""
        _check_shape("u", u, (2, self.depth, self.d))
        return self._split_layers(self.halves.gaps(self._join_layers(u)))

    def _join_layers(self, u):
        return jnp.concatenate([u[0], u[1]], axis=-1)

    def _split_layers(self, U):
        return jnp.stack([U[:, : self.d], U[:, self.d :]])

    # --- layers and the reduced state (2, d) ---------------------------------------------------
    def reduce(self, u: Float[Array, "2 L d"]) -> Float[Array, "2 d"]:
        """The signed smallest layer of each half, shape `(2, d)`."""
        _check_shape("u", u, (2, self.depth, self.d))
        return self._split(self.halves.reduce(self._join_layers(u)))

    def layers(self, w: Float[Array, "2 d"]) -> Float[Array, "2 L d"]:
        _check_shape("w", w, (2, self.d))
        return self._split_layers(self.halves.layers(self._join(w)))

    def theta_halves(self, w: Float[Array, "2 d"]) -> Float[Array, "2 d"]:
        """(θ⁺, θ⁻) from the reduced state."""
        _check_shape("w", w, (2, self.d))
        return self._split(self.halves.psi(self._join(w)))

    def psi(self, w: Float[Array, "2 d"]) -> Float[Array, " d"]:
        """θ = ψ⁺(w⁺) − ψ⁻(w⁻)."""
        T = self.theta_halves(w)
        return T[0] - T[1]

    # --- η ↔ θ ----------------------------------------------------------------------------------
    def reduced_of_eta(self, eta: Float[Array, " d"]) -> Float[Array, "2 d"]:
        """(w⁺, w⁻) = (Φ⁺⁻¹(η), Φ⁻⁻¹(c − η))."""
        self._vec("eta", eta)
        h = self.halves
        return _signed_eval(eta, h.delta, h.w0, self.c)[2]

    def grad_R_star(self, eta: Float[Array, " d"]) -> Float[Array, " d"]:
        """θ = ∇R*(η) = ∇Q⁺*(η) − ∇Q⁻*(c − η)."""
        self._vec("eta", eta)
        h = self.halves
        return _signed_eval(eta, h.delta, h.w0, self.c)[0]

    def grad_R(self, theta: Float[Array, " d"]) -> Float[Array, " d"]:
        """η = ∇R(θ) = ∇Q⁺(θ⁺) at the split θ⁺ − θ⁻ = θ with ∇Q⁺(θ⁺) + ∇Q⁻(θ⁻) = c."""
        self._vec("theta", theta)
        h = self.halves
        return _eta_of_theta(theta, h.delta, h.w0, self.c)

    def split(self, theta: Float[Array, " d"]) -> Float[Array, "2 d"]:
        """(θ⁺, θ⁻) with θ⁺ − θ⁻ = θ on the flow's invariant curve."""
        return self.theta_halves(self.reduced_of_eta(self.grad_R(theta)))

    def reduced_of_theta(self, theta: Float[Array, " d"]) -> Float[Array, "2 d"]:
        """(w⁺, w⁻) from θ."""
        return self.reduced_of_eta(self.grad_R(theta))

    def metric_eta(self, eta: Float[Array, " d"]) -> Float[Array, " d"]:
        """g⁺ + g⁻ as a function of η (no root find)."""
        self._vec("eta", eta)
        h = self.halves
        return _signed_eval(eta, h.delta, h.w0, self.c)[1]

    def metric(self, theta: Float[Array, " d"]) -> Float[Array, " d"]:
        """g⁺(θ⁺) + g⁻(θ⁻): θ̇ = −g ⊙ ∇f(θ), and ∇²R = diag(1/g)."""
        return self.metric_eta(self.grad_R(theta))

    def metric_w(self, w: Float[Array, "2 d"]) -> Float[Array, " d"]:
        _check_shape("w", w, (2, self.d))
        g = self.halves.metric_w(self._join(w))
        return g[: self.d] + g[self.d :]

    def hess_R_diag(self, theta: Float[Array, " d"]) -> Float[Array, " d"]:
        """The diagonal of ∇²R(θ), 1/(g⁺ + g⁻)."""
        return 1 / self.metric(theta)

    # --- the potential ----------------------------------------------------------------------------
    def R_star(self, eta: Float[Array, " d"]) -> Scalar:
        """R*(η) = Q⁺*(η) + Q⁻*(c − η) (the halves' Q* normalized as in `Geometry`)."""
        self._vec("eta", eta)
        h = self.halves
        return jnp.sum(_q_star_all(jnp.concatenate([eta, self.c - eta]), h.delta, h.w0))

    def dual_terms(self, eta: Float[Array, " d"]):
        """(θ = ∇R*(η), g⁺ + g⁻, R*(η)) in one pass (one Φ⁻¹ per half-coordinate)."""
        self._vec("eta", eta)
        h = self.halves
        theta, g, w, ell = _signed_eval(eta, h.delta, h.w0, self.c)
        q = _q_star_from(self._join(w), self._join(ell), h.delta, h.w0)
        return theta, g, jnp.sum(q)

    def R(self, theta: Float[Array, " d"]) -> Scalar:
        """R(θ) = ⟨θ, ∇R(θ)⟩ − R*(∇R(θ)) (= min over splits of Q⁺(θ⁺) + Q⁻(θ⁻) − ⟨c, θ⁻⟩)."""
        eta = self.grad_R(theta)
        return jnp.sum(theta * eta) - self.R_star(eta)

    def bregman(self, a: Float[Array, " d"], b: Float[Array, " d"]) -> Scalar:
        """D_R(a, b) = R(a) − R(b) − ⟨∇R(b), a − b⟩ ≥ 0."""
        ea, eb = self.grad_R(a), self.grad_R(b)
        h = self.halves
        qa = _q_star_all(jnp.concatenate([ea, self.c - ea]), h.delta, h.w0)
        qb = _q_star_all(jnp.concatenate([eb, self.c - eb]), h.delta, h.w0)
        return jnp.sum(a * (ea - eb)) - jnp.sum(qa - qb)

    # Names shared with `Geometry` (θ-space meaning).
    grad_Q = grad_R
    grad_Q_star = grad_R_star
    Q = R
    Q_star = R_star
    hess_Q_diag = hess_R_diag


def check_signed_geometry(u0, name: str = "u0", why: str = "the mirror geometry"):
    """`u0` (shape `(2, L, d)` or `(B, 2, L, d)`) unchanged, or a clear `ValueError` when a
    half-coordinate has no computable potential (see [`ddln_jax.geometry_problems`][])."""
    un = np.asarray(u0)
    for i, ui in enumerate(un if un.ndim == 4 else [un]):
        stacked = np.concatenate([ui[0], ui[1]], axis=-1)
        problems = geometry_problems(stacked)
        if problems:
            d = ui.shape[-1]
            problems = {k: np.unique(v % d) for k, v in problems.items()}
            label = f"{name}[{i}]" if un.ndim == 4 else name
            raise ValueError(_problem_message(label, problems) + f" ({why} needs it)")
    return u0
