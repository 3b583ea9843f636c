"""The mirror geometry: closed forms, an independent quadrature, Legendre identities."""

import math

import jax
import jax.numpy as jnp
import mpmath as mp
import numpy as np
import pytest
from helpers import geometry_with_gaps

import ddln_jax as dj

mp.mp.dps = 40

_maps = jax.jit(
    lambda g, th: {
        "w": g.psi_inv(th),
        "psi": g.psi(g.psi_inv(th)),
        "eta": g.grad_Q(th),
        "metric": g.metric(th),
    }
)
_phi = jax.jit(lambda g, w: g.phi(w))
_phi_inv = jax.jit(lambda g, eta: g.phi_inv(eta))


def _phi_mp(w, deltas):
    f = lambda r: 1 / mp.fprod([mp.sqrt(r * r + dl) for dl in deltas])
    pts = sorted({mp.mpf(0), abs(w), *[mp.sqrt(dl) for dl in deltas if mp.sqrt(dl) < abs(w)]})
    return mp.sign(w) * mp.quad(f, pts)


@pytest.mark.parametrize("L", [3, 4, 5, 6])
def test_phi_matches_high_precision_quadrature(L):
    """Φ and Φ(∞) to ≤ 1e-12 relative against 40-digit quadrature, δ from 1e-12 to 1e4."""
    rng = np.random.default_rng(L)
    ws = np.array([1e-8, 1e-3, 0.7, -3.0, 1e3, 1e8])
    for low in [1e-12, 1e-5, 1.0, 1e4]:
        deltas = np.minimum(np.sort(low * 10 ** rng.uniform(0, 4, size=L - 1)), 1e4)
        g = geometry_with_gaps(deltas, len(ws))
        got = np.asarray(_phi(g, jnp.asarray(ws)))
        exact = [mp.mpf(float(x)) for x in np.asarray(g.delta[:, 0])]
        for w, value in zip(ws, got):
            ref = _phi_mp(mp.mpf(w), exact)
            assert abs((value - ref) / ref) <= 1e-12, (L, deltas, w)
        f = lambda r: 1 / mp.fprod([mp.sqrt(r * r + dl) for dl in exact])
        ref_inf = mp.quad(f, [0] + [mp.sqrt(x) for x in exact] + [mp.inf])
        assert abs((float(g.phi_inf[0]) - ref_inf) / ref_inf) <= 1e-12


def test_depth_two_is_the_hyperbolic_entropy():
    rng = np.random.default_rng(0)
    u0 = rng.normal(size=(2, 8))
    g = dj.Geometry(u0)
    delta = np.abs(u0[0] ** 2 - u0[1] ** 2)
    th = np.array([0.0, 1e-9, -0.3, 2.0, -7.5, 40.0, 1e4, -1e8])
    q_closed = 0.5 * (th * np.arcsinh(2 * th / delta) - np.sqrt(th**2 + delta**2 / 4)) + delta / 4
    np.testing.assert_allclose(g.grad_Q(th), 0.5 * np.arcsinh(2 * th / delta), rtol=1e-13)
    np.testing.assert_allclose(g.metric(th), np.sqrt(delta**2 + 4 * th**2), rtol=1e-13)
    per_coord = jax.vmap(lambda t, dl: dj.Geometry(jnp.stack([jnp.sqrt(dl) * jnp.ones(1), jnp.zeros(1)])).Q(t[None]))
    # The closed form cancels catastrophically for tiny θ (Q ≈ θ²/(2δ) there), hence atol.
    np.testing.assert_allclose(per_coord(th, delta), q_closed, rtol=1e-11, atol=1e-15)


def test_depth_three_is_an_elliptic_integral():
    """Φ(w) = F(arctan(w/b) | 1 − b²/a²)/a for gaps b² < a² (docs/math.md, "Mirror flow and potential")."""
    a, b = 1.7, 0.4
    g = geometry_with_gaps([b**2, a**2], 5)
    ws = np.array([1e-6, 0.1, 1.0, 25.0, -400.0])
    got = np.asarray(g.phi(ws))
    m = 1 - b**2 / a**2
    for w, value in zip(ws, got):
        ref = mp.ellipf(mp.atan(mp.mpf(w) / b), m) / a
        assert abs((value - ref) / ref) <= 1e-12
    assert abs(float(g.phi_inf[0]) - float(mp.ellipk(m) / a)) <= 1e-12 * float(mp.ellipk(m) / a)


@pytest.mark.parametrize("L", [3, 4, 5, 6])
def test_zero_first_closed_forms(L):
    alpha = 0.3
    g = dj.Geometry(dj.zero_first_init(L, 4, alpha))
    c_L = math.sqrt(math.pi) / 2 * math.gamma((L - 2) / 2) / math.gamma((L - 1) / 2)
    np.testing.assert_allclose(g.phi_inf, c_L * alpha ** (-(L - 2)), rtol=1e-13)
    w = np.array([0.01, 0.3, 2.0, -5.0])
    if L == 3:
        np.testing.assert_allclose(g.phi(w), np.arctan(w / alpha) / alpha, rtol=1e-13)
    if L == 4:
        np.testing.assert_allclose(g.phi(w), w / (alpha**2 * np.sqrt(w**2 + alpha**2)), rtol=1e-13)


@jax.jit
def _identities(g, th):
    eta = g.grad_Q(th)
    w = g.psi_inv(th)
    b = th[::-1]
    return {
        "eta": eta,
        "back": g.grad_Q_star(eta),
        "Q": g.Q(th),
        "Q_star": g.Q_star(eta),
        "grad_Q": jax.grad(g.Q)(th),
        "grad_Q_star": jax.grad(g.Q_star)(eta),
        "hessian": jax.hessian(g.Q)(th),
        "hess_diag": g.hess_Q_diag(th),
        "metric": g.metric(th),
        "dw": jax.jvp(g.psi_inv, (th,), (jnp.ones_like(th),))[1],
        "prod": jnp.prod(jnp.sqrt(w[None] ** 2 + g.delta), axis=0),
        "bregman": g.bregman(th, b),
        "bregman_direct": g.Q(th) - g.Q(b) - g.grad_Q(b) @ (th - b),
        "bregman_self": g.bregman(th, th),
        "Q_batched": jax.vmap(g.Q)(jnp.stack([th, b])),
        "Q_b": g.Q(b),
        "Q_zero": g.Q(jnp.zeros_like(th)),
    }


@pytest.mark.parametrize("L", [1, 2, 3, 4, 5, 6])
def test_legendre_identities_and_derivatives(L):
    u0 = dj.gaussian_init(jax.random.PRNGKey(L), L, 6, 0.8)
    th = jnp.array([0.0, -0.3, 1e-3, 2.0, -7.0, 0.05])
    r = _identities(dj.Geometry(u0), th)
    np.testing.assert_allclose(r["back"], th, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(r["Q"] + r["Q_star"], th @ r["eta"], rtol=1e-12)
    np.testing.assert_allclose(r["grad_Q"], r["eta"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(r["grad_Q_star"], th, rtol=1e-11, atol=1e-15)
    np.testing.assert_allclose(r["hessian"], jnp.diag(1 / r["metric"]), rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(r["hess_diag"], 1 / r["metric"], rtol=1e-14)
    # ψ' = g/∏√(w² + δ), checked through the custom JVP of ψ⁻¹.
    np.testing.assert_allclose(r["dw"], r["prod"] / r["metric"], rtol=1e-12)
    # Bregman divergence: definition, positivity, zero on the diagonal.
    np.testing.assert_allclose(r["bregman"], r["bregman_direct"], rtol=1e-10, atol=1e-13)
    assert r["bregman"] > 0 and abs(r["bregman_self"]) <= 1e-15
    np.testing.assert_allclose(r["Q_batched"], jnp.stack([r["Q"], r["Q_b"]]), rtol=1e-14)
    assert r["Q_zero"] == 0


def test_gradient_through_the_initialization():
    """d/dα of ∇Q(θ) through δ(α) matches a central finite difference."""
    th = jnp.array([0.2, -1.0, 3.0])
    f = jax.jit(lambda a: jnp.sum(dj.Geometry(dj.zero_first_init(4, 3, 1.0) * a).grad_Q(th)))
    fd = (f(0.7 + 1e-5) - f(0.7 - 1e-5)) / 2e-5
    np.testing.assert_allclose(jax.jit(jax.grad(f))(0.7), fd, rtol=1e-7)


@pytest.mark.parametrize("L", [2, 3, 4, 5, 6])
def test_inverses_are_robust(L):
    """|θ| from 0 to 1e8, δ from 1e-12 to 1e4: no NaN, round trips at rounding level."""
    th = np.array([0.0, 1e-200, 1e-12, 1e-6, -0.3, 1.0, 7.0, -1e3, 1e8, -1e8])
    for low in [1e-12, 1e-6, 1e-3, 1.0, 1e4]:
        deltas = low * np.linspace(1, 3, L - 1)
        g = geometry_with_gaps(deltas, th.size)
        out = {k: np.asarray(v) for k, v in _maps(g, jnp.asarray(th)).items()}
        for k, v in out.items():
            assert np.all(np.isfinite(v)), (k, low)
        # ψ(ψ⁻¹(θ)) = θ wherever w does not underflow.
        ok = np.abs(out["w"]) > 1e-290
        np.testing.assert_allclose(out["psi"][ok], th[ok], rtol=1e-13)
        # Φ⁻¹ is backward stable: Φ(Φ⁻¹(η)) = η (η near the box face carries little about w).
        inside = np.abs(out["eta"]) < np.asarray(g.phi_inf)
        eta = np.where(inside, out["eta"], 0.0)
        w2 = np.asarray(_phi_inv(g, jnp.asarray(eta)))
        assert np.all(np.isfinite(w2))
        np.testing.assert_allclose(np.asarray(_phi(g, jnp.asarray(w2))), eta, rtol=1e-13)
        # Where the dual is well conditioned, w is recovered exactly too.
        cond = inside & (np.abs(eta) < 0.5 * np.asarray(g.phi_inf))
        np.testing.assert_allclose(w2[cond], out["w"][cond], rtol=1e-12)
        # Past the middle of the box w lives in the gap Φ(∞) − |η| (rounded to ~eps·Φ(∞)):
        # w is recovered to that conditioning, |dw/w| ≈ |d gap/gap|/(L−2), not worse.
        if L >= 3:
            box = np.asarray(g.phi_inf)
            tail = inside & ~cond & (out["w"] != 0)
            bound = 8 * np.finfo(float).eps * box / (box - np.abs(eta)) + 1e-12
            rel = np.abs(w2 - out["w"]) / np.where(tail, np.abs(out["w"]), 1.0)
            assert np.all(rel[tail] <= bound[tail]), (low, rel[tail], bound[tail])


def test_outside_the_box_is_infinite_not_nan():
    g = geometry_with_gaps([0.5, 2.0], 3)
    eta = jnp.array([1.0, -1.0, 0.5]) * g.phi_inf * jnp.array([1.0, 2.0, 0.5])
    w = g.phi_inv(eta)
    assert np.isinf(w[0]) and np.isinf(w[1]) and np.isfinite(w[2])
    assert float(g.phi(jnp.array([jnp.inf, 0, 0]))[0]) == float(g.phi_inf[0])


def test_partial_tie_gets_a_clear_error():
    """Two smallest layers tie while a third is larger (L = 3): no potential implemented."""
    u0 = np.array([[0.5, 1.0], [0.5, 2.0], [1.0, 0.3]])
    with pytest.raises(ValueError, match=r"tie while another layer is larger .* \[0\]"):
        dj.Geometry(u0)
    # The layer maps stay valid without it.
    g = dj.Geometry(u0, require_assumption_a=False)
    np.testing.assert_allclose(g.layers(g.reduce(jnp.asarray(u0))), u0, rtol=1e-15)


# ---------------------------------------------------------------------------------------------
# Half-line geometry of balanced coordinates (docs/math.md, "Assumption A and the balanced (half-line) geometry"), frozen coordinates, and inits
# the geometry cannot represent (issue 9, item 9).


def _half_line_closed_forms(L, th0, th):
    """∇Q = ∫_{θ0}^θ ds/(L|s|^{2−2/L}), Q = ∫_{θ0}^θ ∇Q, on the half-line of sign(θ0)."""
    s = np.sign(th0)
    a0, a = np.abs(th0), np.abs(th)
    if L == 2:
        eta = 0.5 * np.log(a / a0)
        Q = 0.5 * (a * np.log(a / a0) - a + a0)
    else:
        p = L - 2
        eta = (a0 ** (-p / L) - a ** (-p / L)) / p
        Q = (a0 ** (-p / L) * (a - a0) - (a ** (2 / L) - a0 ** (2 / L)) * L / 2) / p
    return s * eta, Q


@jax.jit
def _half_line_maps(u0, th):
    g = dj.Geometry(u0)
    eta = g.grad_Q(th)
    return {
        "eta": eta, "back": g.grad_Q_star(eta), "metric": g.metric(th), "Q_all": g.Q(th),
        # Q per coordinate, from one-coordinate geometries.
        "Q": jax.vmap(lambda u, t: dj.Geometry(u[:, None]).Q(t[None]))(u0.T, th),
        "Q_star": g.Q_star(eta), "grad_Q": jax.grad(g.Q)(th), "hess": jnp.diag(jax.hessian(g.Q)(th)),
        "theta_Q_star": jax.grad(g.Q_star)(eta),
    }


@pytest.mark.parametrize("L", [2, 3, 4, 5])
def test_half_line_geometry_closed_forms(L):
    """Balanced coordinates (every |u^j(0)| equal) of either sign, next to an untied and a frozen
    coordinate: ∇Q, Q, g = L|θ|^{2−2/L}, the face (α^{-(L-2)}/(L−2)) against closed forms,
    Legendre identities and derivatives; the untied coordinate is unchanged by its neighbours."""
    a = np.array([0.7, 1.3, 0.4, 2.0])
    u0 = np.tile(a, (L, 1))
    u0[0, 1] = -1.3  # θ0 < 0 on coordinate 1
    extra = np.stack([np.linspace(0.3, 1.1, L), np.r_[0.0, 0.0, np.ones(L - 2)] if L > 2 else np.zeros(2)], 1)
    u0 = np.concatenate([u0, extra], axis=1)  # coordinate 4 untied, 5 frozen (two zero layers)
    g = dj.Geometry(u0)
    assert np.asarray(g.tied).tolist() == [True] * 4 + [False, True]
    assert np.asarray(g.frozen).tolist() == [False] * 5 + [True]
    th0 = np.prod(u0, axis=0)
    th = th0 * np.array([1.7, 0.3, 1.01, 25.0, 1.0, 1.0])
    th[4], th[5] = -0.8, 0.0
    r = {k: np.asarray(v) for k, v in _half_line_maps(jnp.asarray(u0), jnp.asarray(th)).items()}
    eta, Q = _half_line_closed_forms(L, th0[:4], th[:4])
    np.testing.assert_allclose(r["eta"][:4], eta, rtol=1e-12)
    np.testing.assert_allclose(r["Q"][:4], Q, rtol=1e-9 if L > 2 else 1e-11)  # Q ≈ (θ−θ0)²/2g cancels
    np.testing.assert_allclose(r["metric"][:4], L * np.abs(th[:4]) ** (2 - 2 / L), rtol=1e-13)
    np.testing.assert_allclose(r["back"], th, rtol=1e-13, atol=1e-300)
    np.testing.assert_allclose(r["grad_Q"][:5], r["eta"][:5], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(r["theta_Q_star"][:5], th[:5], rtol=1e-12)
    np.testing.assert_allclose(r["hess"][:5], 1 / r["metric"][:5], rtol=1e-11)
    # Legendre: Q(θ) + Q*(∇Q(θ)) = ⟨θ, ∇Q(θ)⟩, and Q is separable.
    np.testing.assert_allclose(r["Q_all"] + r["Q_star"], th @ r["eta"], rtol=1e-12)
    np.testing.assert_allclose(r["Q_all"], r["Q"].sum(), rtol=1e-13)
    # The untied coordinate: the same as in a geometry of its own.
    alone = dj.Geometry(u0[:, 4:5])
    np.testing.assert_allclose(r["eta"][4], alone.grad_Q(jnp.asarray(th[4:5]))[0], rtol=1e-14)
    # Frozen: θ ≡ 0, g = 0, ∇Q* ≡ 0.
    assert r["metric"][5] == 0 and r["back"][5] == 0
    # The box: on the growing side of a half-line, |η| < α^{-(L-2)}/(L-2); the other side is open.
    lo, hi = (np.asarray(x) for x in g.eta_bounds)
    if L >= 3:
        np.testing.assert_allclose(hi[[0, 2, 3]], a[[0, 2, 3]] ** (-(L - 2)) / (L - 2), rtol=1e-14)
        np.testing.assert_allclose(lo[1], -(a[1] ** (-(L - 2))) / (L - 2), rtol=1e-14)
        assert np.all(np.isinf(lo[[0, 2, 3]])) and np.isinf(hi[1])
    # Off the half-line Q is +inf and the maps saturate at the ends, never NaN.
    assert float(g.Q(jnp.asarray(np.where(np.arange(6) == 0, -0.5, th)))) == np.inf
    w = np.asarray(g.phi(jnp.asarray(np.r_[0.0, 0.0, 1.0, 1.0, 1.0, 0.0])))
    assert w[0] == -np.inf and w[1] == np.inf


def test_half_line_is_accepted_by_the_dual_map():
    """A balanced init is accepted (it was refused before): the dual state moves η0 = 0 − t∇f and
    θ = ∇Q*(η) stays on the half-line."""
    g = dj.Geometry(dj.balanced_init(3, 4, 0.5))
    eta = jnp.array([-3.0, -1e3, 1.0, 1.99])  # the face: α^{-(L-2)}/(L-2) = 2
    th = np.asarray(g.grad_Q_star(eta))
    assert np.all(th > 0)
    np.testing.assert_allclose(g.grad_Q(jnp.asarray(th)), eta, rtol=1e-12)
    assert np.isinf(np.asarray(g.grad_Q_star(jnp.full(4, 2.0)))).all()  # at the face


def test_wrong_shapes_give_clear_errors():
    g = dj.Geometry(dj.gaussian_init(jax.random.PRNGKey(0), 3, 4, 0.5))
    for method in ("grad_Q", "grad_Q_star", "psi", "psi_inv", "phi", "phi_inv", "metric", "Q", "Q_star"):
        with pytest.raises(ValueError, match=r"must have shape \(4,\)"):
            getattr(g, method)(jnp.ones(5))
        with pytest.raises(ValueError, match=r"must have shape \(4,\)"):
            getattr(g, method)(jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"`b` must have shape|`theta` must have shape"):
        g.bregman(jnp.ones(4), jnp.ones(3))
    with pytest.raises(ValueError, match=r"`u` must have shape \(3, 4\)"):
        g.reduce(jnp.ones((2, 4)))


_round_trip = jax.jit(lambda g, th: (g.grad_Q(th), g.grad_Q_star(g.grad_Q(th))))


@pytest.mark.parametrize("L", [2, 3, 4, 5])
def test_underflowing_inits_are_refused_or_exact(L):
    """Issue 9: gaps that underflow (u ≈ 1e-160, δ subnormal), gaps so small that η would
    overflow, or θ0 = α^L underflowing on a half-line are refused with a message; every other
    init over 1e-170…1e60 gives finite maps with exact round trips (never a silent inf/NaN)."""
    u = np.array([[1e-160, 1.0], [2e-160, 1.0]] + [[3e-160, 1.0]] * (L - 2))
    with pytest.raises(ValueError, match="subnormal"):
        dj.Geometry(u)
    with pytest.raises(ValueError, match="underflows"):
        dj.Geometry(np.full((L, 2), 1e-160 if L == 2 else 1e-110))
    if L >= 4:
        with pytest.raises(ValueError, match="would\\s+exceed 1e250"):
            dj.Geometry(np.array([[0.0], [1e-150], [2e-150]] + [[1.0]] * (L - 3)))
    rng = np.random.default_rng(L)
    refused = accepted = 0
    for trial in range(40):
        scale = 10.0 ** rng.uniform(-170, 60)
        u0 = scale * rng.normal(size=(L, 6)) * 10 ** rng.uniform(-3, 3, size=(L, 6))
        u0[:, :2] = scale * np.sign(rng.normal(size=(L, 2)))  # balanced coordinates
        try:
            g = dj.Geometry(u0)
        except ValueError as e:
            assert "no computable mirror geometry" in str(e)
            refused += 1
            continue
        accepted += 1
        th = jnp.asarray(np.prod(u0, 0) * np.array([1.0, 1.5, 0.5, 2.0, -1.0, 3.0]))
        r = {k: np.asarray(v) for k, v in _maps(g, th).items()}
        eta, back = (np.asarray(x) for x in _round_trip(g, th))
        assert all(np.all(np.isfinite(v)) for v in (*r.values(), eta, back)), (trial, scale)
        np.testing.assert_allclose(back, th, rtol=1e-10, atol=1e-290)
    assert refused > 0 and accepted > 0
