"""Per-coordinate mirror geometry of an initialization (MATH.md §2, §3, §7).

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
from jaxtyping import Array, Float, Int, Scalar

from ._init import check_assumption_a, check_init
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
    return jnp.prod(jnp.sqrt(w**2 + delta), axis=0)


def _sat(w, delta):
    """w²/(w² + δ_j), with its limit 1 at w = δ_j = 0 (a tie)."""
    den = w**2 + delta
    return jnp.where(den > 0, w**2 / jnp.where(den > 0, den, 1.0), 1.0)


def _psi(w, delta):
    return w * _prod_sqrt(w, delta)


def _dpsi(w, delta):
    return _prod_sqrt(w, delta) * (1 + jnp.sum(_sat(w, delta), axis=0))


def _quad_integrand(s, delta):
    """k(s) = ∏_{j≥2} 1/√(δ₁ sinh² s + δ_j); s has a trailing node axis."""
    d1 = delta[0][..., None]
    rest = delta[1:][..., None]
    sh2 = jnp.sinh(s) ** 2
    return jnp.prod(jax.lax.rsqrt(d1 * sh2 + rest), axis=0)


def _phi_of_s(s, delta, rule=(_X, _W)):
    """∫_0^s k for s ≥ 0 (L ≥ 3), by the composite rule."""
    x = jnp.asarray(rule[0], dtype=s.dtype)
    wts = jnp.asarray(rule[1], dtype=s.dtype)
    nodes = s[..., None] * x
    return s * jnp.sum(wts * _quad_integrand(nodes, delta), axis=-1)


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
    zero = a == 0
    special = zero | jnp.isinf(a)
    c = jnp.log(jnp.where(special, 1.0, a))
    logd = jnp.log(delta)
    v0 = jnp.minimum(c - 0.5 * jnp.sum(logd, axis=0), c / (K + 1))

    def step(state):
        (v,) = state
        lae = jnp.logaddexp(2 * v, logd)
        h = v + 0.5 * jnp.sum(lae, axis=0)
        dh = 1 + jnp.sum(jnp.exp(2 * v - lae), axis=0)
        return (v - (h - c) / dh,)

    def tol(old, new):
        return jnp.abs(new[0] - old[0]) <= 4 * jnp.finfo(a.dtype).eps * jnp.maximum(1, jnp.abs(new[0]))

    (v,) = _newton_loop(step, (v0,), tol)
    w = jnp.exp(v)
    w = w - (_psi(w, delta) - a) / _dpsi(w, delta)  # one polishing step in linear scale
    return jnp.where(special, theta, jnp.sign(theta) * w)


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

    def make_step(rule):
        def step(state):
            s, lo, hi = state
            f = _phi_of_s(s, delta, rule) - a
            lo = jnp.where(f <= 0, s, lo)
            hi = jnp.where(f >= 0, s, hi)
            s_new = s - f / _quad_integrand(s[..., None], delta)[..., 0]
            ok = (s_new >= lo) & (s_new <= hi) & jnp.isfinite(s_new)
            return jnp.where(ok, s_new, 0.5 * (lo + hi)), lo, hi

        return step

    def make_tol(rel):
        def tol(old, new):
            small = jnp.abs(new[0] - old[0]) <= rel * jnp.abs(new[0])
            return small | (new[2] - new[1] <= rel * new[2]) | ~inside

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


class Geometry(eqx.Module):
    """The mirror geometry of one initialization (batch it with `jax.vmap`).

    Construct it with `Geometry(u0)`: `u0` has shape `(L, d)`. Coordinatewise maps take and
    return arrays of shape `(d,)`; `Q`, `Q_star` and `bregman` return scalars (Q is separable).

    **Fields:**

    - `delta`: the gaps δ_{j,i} (j ≠ m_i), sorted ascending, shape `(L-1, d)`.
    - `delta_full`: u^j_i(0)² − u^m_i(0)², shape `(L, d)` (0 on the smallest layer).
    - `m`: index of the smallest layer per coordinate, shape `(d,)`.
    - `sigma`: σ_i = sign ∏_{j≠m} u^j_i(0) (sign 0 = +1), shape `(d,)`.
    - `signs`: sign of each layer at t = 0 (sign 0 = +1), shape `(L, d)`.

    **Properties:** `phi_inf`, Φ_i(∞) (+inf for L ≤ 2), the half-width of the dual box for
    L ≥ 3 (a quadrature, computed when asked for).
    """

    delta: Float[Array, "K d"]
    delta_full: Float[Array, "L d"]
    m: Int[Array, " d"]
    sigma: Float[Array, " d"]
    signs: Float[Array, "L d"]

    def __init__(self, u0, *, require_assumption_a: bool = True):
        """**Arguments:**

        - `u0`: layers at t = 0, shape `(L, d)`.
        - `require_assumption_a`: raise a `ValueError` when some coordinate has two smallest
          layers (checked only on concrete arrays). Without Assumption A the layer maps
          (`layers`, `reduce`, `psi`, `metric`) stay valid, but Q, ∇Q and their relatives do
          not exist on ℝ (the balanced init lives on a half-line).
        """
        if not is_tracer(u0):
            u0 = check_init(u0)
            if require_assumption_a:
                report = check_assumption_a(u0)
                if not report.holds:
                    raise ValueError(
                        f"`u0` violates Assumption A: the smallest |u^j_i| is attained by two "
                        f"layers at coordinates {report.tied[:10].tolist()}"
                        f"{' ...' if report.tied.size > 10 else ''}. The mirror geometry "
                        "(Q, ∇Q, the mirror and dual flows) needs a unique smallest layer; use "
                        "the 'layer' or 'reduced' formulation, or perturb the init."
                    )
        u0 = jnp.asarray(u0)
        sq = u0**2
        m = jnp.argmin(sq, axis=0)
        sq_m = jnp.take_along_axis(sq, m[None], axis=0)[0]
        # ≥ 0 exactly: under jit the two roundings of u² may differ at a tie.
        self.delta_full = jnp.maximum(sq - sq_m, 0.0)
        self.delta = jnp.sort(self.delta_full, axis=0)[1:]
        self.m = m
        self.signs = _sign(u0)
        self.sigma = jnp.prod(self.signs, axis=0) * jnp.take_along_axis(self.signs, m[None], 0)[0]

    @property
    def phi_inf(self) -> Float[Array, " d"]:
        return _phi_inf(self.delta)

    @property
    def depth(self) -> int:
        return self.delta_full.shape[0]

    # --- reduced state ------------------------------------------------------------------------
    def reduce(self, u: Float[Array, "L d"]) -> Float[Array, " d"]:
        """Signed smallest layer w = σ u^m."""
        return self.sigma * jnp.take_along_axis(u, self.m[None], axis=0)[0]

    def layers(self, w: Float[Array, " d"]) -> Float[Array, "L d"]:
        """The layers u(t) from w(t): u^m = σw, u^j = sign(u^j(0))·√(w² + δ_j)."""
        rows = jnp.arange(self.depth)[:, None]
        others = self.signs * jnp.sqrt(w**2 + self.delta_full)
        return jnp.where(rows == self.m, self.sigma * w, others)

    # --- maps between w, θ and η --------------------------------------------------------------
    def psi(self, w: Float[Array, " d"]) -> Float[Array, " d"]:
        """θ = ψ(w) = w ∏_j √(w² + δ_j)."""
        return _psi(w, self.delta)

    def psi_inv(self, theta: Float[Array, " d"]) -> Float[Array, " d"]:
        """w = ψ⁻¹(θ)."""
        return _psi_inv(theta, self.delta)

    def phi(self, w: Float[Array, " d"]) -> Float[Array, " d"]:
        """Φ(w) = ∫_0^w dr / ∏_j √(r² + δ_j)."""
        return _phi(w, self.delta)

    def phi_inv(self, eta: Float[Array, " d"]) -> Float[Array, " d"]:
        """w = Φ⁻¹(η); ±inf outside the box |η| < Φ(∞) (L ≥ 3)."""
        return _phi_inv(eta, self.delta)

    def metric(self, theta: Float[Array, " d"]) -> Float[Array, " d"]:
        """g(θ) = ∏_j (w² + δ_j)·(1 + Σ_j w²/(w² + δ_j)): θ̇ = −g(θ) ⊙ ∇f(θ)."""
        return self.metric_w(self.psi_inv(theta))

    def metric_w(self, w: Float[Array, " d"]) -> Float[Array, " d"]:
        """g as a function of w (no inversion needed)."""
        return jnp.prod(w**2 + self.delta, axis=0) * (1 + jnp.sum(_sat(w, self.delta), axis=0))

    # --- the potential ------------------------------------------------------------------------
    def grad_Q(self, theta: Float[Array, " d"]) -> Float[Array, " d"]:
        """The mirror map ∇Q(θ) = Φ(ψ⁻¹(θ))."""
        return self.phi(self.psi_inv(theta))

    def grad_Q_star(self, eta: Float[Array, " d"]) -> Float[Array, " d"]:
        """The inverse mirror map ∇Q*(η) = ψ(Φ⁻¹(η))."""
        return self.psi(self.phi_inv(eta))

    def Q(self, theta: Float[Array, " d"]) -> Scalar:
        """Q(θ) = Σ_i θ_i Φ_i(w_i) − w_i²/2, normalized Q(0) = 0, ∇Q(0) = 0."""
        w = self.psi_inv(theta)
        return jnp.sum(theta * self.phi(w) - 0.5 * w**2)

    def Q_star(self, eta: Float[Array, " d"]) -> Scalar:
        """Q*(η) = Σ_i ½ Φ_i⁻¹(η_i)² (+inf outside the box for L ≥ 3)."""
        return 0.5 * jnp.sum(self.phi_inv(eta) ** 2)

    def hess_Q_diag(self, theta: Float[Array, " d"]) -> Float[Array, " d"]:
        """The diagonal of ∇²Q(θ), 1/g(θ)."""
        return 1 / self.metric(theta)

    def bregman(self, a: Float[Array, " d"], b: Float[Array, " d"]) -> Scalar:
        """D_Q(a, b) = Q(a) − Q(b) − ⟨∇Q(b), a − b⟩ ≥ 0."""
        wa, wb = self.psi_inv(a), self.psi_inv(b)
        # Written as Σ a(Φ(w_a) − Φ(w_b)) − (w_a² − w_b²)/2, which avoids forming Q itself.
        return jnp.sum(a * (self.phi(wa) - self.phi(wb)) - 0.5 * (wa - wb) * (wa + wb))
