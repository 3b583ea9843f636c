"""Signed networks θ = θ⁺ − θ⁻ (docs/math.md, "Signed models"): potentials in closed form, the four formulations,
the implicit-bias limit and its small/large-α limits, Azulay's shape result, tied layers."""

import math

import diffrax as dfx
import jax
import jax.numpy as jnp
import mpmath as mp
import numpy as np
import pytest

import ddln_jax as dj
from ddln_jax._flows import ReducedFlow
from ddln_jax._geometry import SignedGeometry
from ddln_jax._implicit_bias import signed_implicit_bias_limit
from ddln_jax._models import (
    SignedModel,
    as_model,
    shape_scale_init,
    signed_escape_time,
    signed_gaussian_init,
    signed_kernel_limit,
    signed_small_init_limit,
    woodworth_init,
)

mp.mp.dps = 40


@pytest.fixture(scope="module")
def data():
    """Interpolating least squares n = 4, d = 8 with a sparse solution of both signs."""
    X = jax.random.normal(jax.random.PRNGKey(3), (4, 8))
    theta_star = jnp.zeros(8).at[:2].set(jnp.array([1.0, -0.7]))
    return X, X @ theta_star


_woodworth_maps = jax.jit(
    lambda g, th: (g.R(th), g.grad_R(th), jnp.diag(jax.hessian(g.R)(th)), jax.grad(g.R)(th),
                   g.grad_R_star(g.grad_R(th)))
)


@pytest.mark.parametrize("alpha", [0.3, 2.0])
def test_woodworth_depth_two_closed_form(alpha):
    """R = (α²/2)Σ q(θ_i/α²), q(z) = 2 − √(4 + z²) + z asinh(z/2); ∇R = ½asinh(z/2);
    ∇²R = 1/(2√(4α⁴ + θ²)) — to ≤ 1e-12 relative (docs/math.md §6, §8)."""
    th = np.array([1e-3, -0.05, 0.7, -3.0, 40.0, -900.0])
    g = SignedGeometry(woodworth_init(2, th.size, alpha))
    R, eta, hess, grad, back = (np.asarray(x) for x in _woodworth_maps(g, jnp.asarray(th)))
    z = th / alpha**2
    # The closed form cancels for small z (q ≈ z²/4): evaluate it with 40 digits.
    q = np.array([float(2 - mp.sqrt(4 + mp.mpf(x) ** 2) + mp.mpf(x) * mp.asinh(mp.mpf(x) / 2)) for x in z])
    ref_R = alpha**2 / 2 * q.sum()
    assert abs(R - ref_R) <= 1e-12 * ref_R
    np.testing.assert_allclose(eta, 0.5 * np.arcsinh(z / 2), rtol=1e-13)
    np.testing.assert_allclose(grad, eta, rtol=1e-12)  # autodiff of R* cancels θ⁺ − θ⁻
    np.testing.assert_allclose(hess, 1 / (2 * np.sqrt(4 * alpha**4 + th**2)), rtol=1e-12)
    np.testing.assert_allclose(back, th, rtol=1e-13)
    # Per coordinate, to ≤ 1e-12 relative, through vmap over one-coordinate geometries.
    per = jax.vmap(lambda t: SignedGeometry(jnp.full((2, 2, 1), alpha)).R(t[None]))(jnp.asarray(th))
    np.testing.assert_allclose(per, alpha**2 / 2 * q, rtol=1e-12)


@pytest.mark.parametrize("L", [3, 4, 5])
def test_woodworth_deeper_is_h_L(L):
    """θ/α^L = h_L(s), s = (L − 2)α^{L−2}η, h_L(s) = (1 − s)^{−L/(L−2)} − (1 + s)^{−L/(L−2)},
    and R = α²/(L − 2)∫_0^z h_L⁻¹ = α²/(L − 2)[zs − (L−2)/2((1−s)^{−2/(L−2)} + (1+s)^{−2/(L−2)} − 2)],
    against a 40-digit root of h_L(s) = z, to ≤ 1e-12."""
    alpha, p = 0.8, L - 2
    th = np.array([2e-3, -0.4, 1.5, -12.0, 300.0])
    g = SignedGeometry(woodworth_init(L, th.size, alpha))
    R, eta, hess, grad, back = (np.asarray(x) for x in _woodworth_maps(g, jnp.asarray(th)))
    h = lambda s: (1 - s) ** (-mp.mpf(L) / p) - (1 + s) ** (-mp.mpf(L) / p)
    total = mp.mpf(0)
    for i, t in enumerate(th):
        z = mp.mpf(t) / mp.mpf(alpha) ** L
        a, b = mp.mpf(-1), mp.mpf(1)  # h is increasing on (−1, 1): bisect to 40 digits
        for _ in range(140):
            mid = (a + b) / 2
            a, b = (mid, b) if h(mid) < z else (a, mid)
        s = (a + b) / 2
        e = s / (p * mp.mpf(alpha) ** p)
        assert abs(eta[i] - float(e)) <= 1e-12 * abs(float(e))
        rr = mp.mpf(alpha) ** 2 / p * (z * s - mp.mpf(p) / 2 * ((1 - s) ** (-mp.mpf(2) / p) + (1 + s) ** (-mp.mpf(2) / p) - 2))
        total += rr
    assert abs(R - float(total)) <= 1e-12 * float(total)
    np.testing.assert_allclose(grad, eta, rtol=1e-12)
    np.testing.assert_allclose(back, th, rtol=1e-12)
    # ∇²R = 1/(g⁺ + g⁻), g± = L|θ±|^{2−2/L}.
    plus = alpha**L * (1 - p * alpha**p * eta) ** (-L / p)
    minus = plus - th
    np.testing.assert_allclose(hess, 1 / (L * (plus ** (2 - 2 / L) + minus ** (2 - 2 / L))), rtol=1e-11)
    # The box: η ∈ (−1, 1)/((L − 2)α^{L−2}).
    lo, hi = g.eta_bounds
    np.testing.assert_allclose(hi, 1 / (p * alpha**p), rtol=1e-15)
    np.testing.assert_allclose(lo, -1 / (p * alpha**p), rtol=1e-15)


# ---------------------------------------------------------------------------------------------
# The four formulations give one trajectory.




import equinox as eqx  # noqa: E402


class _Blend(eqx.Module):
    """a·least squares + b·logistic with traced (a, b): one compiled program per formulation
    serves both losses (a vmapped lane each)."""

    ls: dj.LeastSquares
    lg: dj.Logistic
    ab: jax.Array

    def __call__(self, theta):
        return self.ab[0] * self.ls(theta) + self.ab[1] * self.lg(theta)

    def grad(self, theta):
        return self.ab[0] * self.ls.grad(theta) + self.ab[1] * self.lg.grad(theta)


_TS = jnp.linspace(0.0, 4.0, 5)


def _solve(form, u0, loss, t1=4.0, ts=_TS, rtol=1e-12):
    geom = form.geometry(u0)
    y0 = form.initial_state(geom, u0)
    sol = dfx.diffeqsolve(
        dfx.ODETerm(form.vector_field), dfx.Tsit5(), 0.0, t1, None, y0, args=(loss, geom),
        stepsize_controller=dfx.PIDController(rtol=rtol, atol=1e-14),
        saveat=dfx.SaveAt(ts=ts), max_steps=200_000,
    )
    return jax.vmap(lambda y: form.theta(geom, y))(sol.ys)


@eqx.filter_jit
def _all_runs(form, inits, losses):
    """θ(t) for every (init, loss) pair: inits (I, 2, L, d), losses stacked (2 lanes)."""
    per_init = lambda u: jax.vmap(lambda lo: _solve(form, u, lo))(losses)
    return jax.vmap(per_init)(inits)


@pytest.fixture(scope="module")
def two_losses():
    X = jax.random.normal(jax.random.PRNGKey(11), (3, 5))
    ls = dj.LeastSquares(X, X @ jnp.array([1.0, -0.6, 0.0, 0.0, 0.0]))
    lg = dj.Logistic(X, jnp.sign(X @ jnp.array([1.0, -1.0, 0.5, 0.0, 0.0])))
    ab = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    return jax.vmap(lambda w: _Blend(ls, lg, w))(ab)


@pytest.mark.parametrize("L", [1, 2, 3, 5])  # L = 4 takes no path that 3 and 5 do not
def test_four_formulations_agree(L, two_losses):
    """Layer, reduced, mirror, dual: one θ(t) to ≤ 1e-8 relative, on least squares and logistic,
    for Woodworth's (balanced halves), the shape–scale and a random init."""
    d = 5
    inits = jnp.stack([
        woodworth_init(L, d, 0.7),
        shape_scale_init(L, d, 0.7, 0.5),
        signed_gaussian_init(jax.random.PRNGKey(L), L, d, 0.7),
    ])
    model = SignedModel()
    ref = _all_runs(model.formulation("layer"), inits, two_losses)
    assert bool(jnp.all(jnp.isfinite(ref)))
    moved = jnp.max(jnp.abs(ref[..., -1, :] - ref[..., 0, :]))
    assert moved > 0.1  # the runs go somewhere
    # The mirror flow's root find (θ → θ±, nested in Φ⁻¹'s Newton for L ≥ 3) is slow to run
    # vmapped: it gets the whole grid for L ≤ 2 and its own test for L = 3.
    for name in ("reduced", "dual") + (("mirror",) if L <= 2 else ()):
        got = _all_runs(model.formulation(name), inits, two_losses)
        err = jnp.max(jnp.abs(got - ref), axis=(-2, -1)) / jnp.max(jnp.abs(ref), axis=(-2, -1))
        assert float(jnp.max(err)) <= 1e-8, (name, err)


def test_mirror_formulation_depth_three(two_losses):
    """The signed mirror flow (θ± recovered from θ at every step) against the layer flow, L = 3,
    Woodworth's and a random init, least squares and logistic, to ≤ 1e-8 relative."""
    L, d = 3, 5
    ts = jnp.linspace(0.0, 2.0, 3)
    model = SignedModel()
    for u0 in (woodworth_init(L, d, 0.7), signed_gaussian_init(jax.random.PRNGKey(L), L, d, 0.7)):
        for k in range(2):
            loss = jax.tree_util.tree_map(lambda x: x[k], two_losses)
            ref = _solve(model.formulation("layer"), u0, loss, t1=2.0, ts=ts)
            got = _solve(model.formulation("mirror"), u0, loss, t1=2.0, ts=ts)
            assert float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref))) <= 1e-8


# ---------------------------------------------------------------------------------------------
# Where the flow ends.


@eqx.filter_jit
def _final_theta(form, u0, loss, t1):
    return _solve(form, u0, loss, t1=t1, ts=jnp.array([t1]))[-1]


@pytest.mark.parametrize("L", [2, 3])
def test_limit_matches_long_simulation(L, data):
    """argmin {D_R(θ, θ0) : Xθ = y} against the reduced flow run until θ stops moving, to ≤ 1e-9,
    for Woodworth's, the shape–scale and a random init."""
    X, y = data
    d = X.shape[1]
    inits = jnp.stack([woodworth_init(L, d, 0.6), shape_scale_init(L, d, 0.6, 0.5),
                       signed_gaussian_init(jax.random.PRNGKey(5), L, d, 0.6)])
    limit = signed_implicit_bias_limit(X, y, inits)
    assert bool(np.all(limit.converged)), limit.status
    assert float(jnp.max(limit.residual)) <= 1e-12
    form = SignedModel().formulation("reduced")
    loss = dj.LeastSquares(X, y)
    theta = jax.vmap(lambda u: _final_theta(form, u, loss, 3000.0))(inits)
    err = jnp.linalg.norm(theta - limit.theta, axis=-1) / jnp.linalg.norm(limit.theta, axis=-1)
    assert float(jnp.max(err)) <= 1e-9, err
    # The reported D_R(θ∞, θ0) (the stacked problem's D_Q) against SignedGeometry.bregman.
    for k, u in enumerate(inits):
        g = SignedGeometry(u)
        np.testing.assert_allclose(limit.bregman[k], g.bregman(limit.theta[k], g.theta0()), rtol=1e-10)


def test_small_alpha_tends_to_l1(data):
    """Woodworth's init: ‖θ∞(α) − θ_ℓ1‖ = O(α^L) for L ≥ 3 (the LP vertex is kept; the
    coordinates off its support leak |θ_i| = α^L h_L(s_i) with |s_i| < 1): a decade of α
    divides the distance by 10^L (slope within 0.05). For L = 2 only like 1/log(1/α)."""
    X, y = data
    d = X.shape[1]
    l1 = signed_small_init_limit(X, y, woodworth_init(3, d, 1.0))
    # θ_ℓ1 is the minimum-ℓ1 interpolator: checked against the product model's LP on [X, −X].
    ref = dj.weighted_l1_interpolator(X, y)
    np.testing.assert_allclose(l1, ref, atol=1e-12)
    # Measured slopes per decade: L = 3: 2.998 (α = 1e-3 → 1e-4), L = 4: 4.000 (1e-2 → 1e-3),
    # L = 5: 4.975 (1e-1 → 1e-2); below, the distance reaches rounding (1e-15).
    for L, alphas in ((3, (1e-3, 1e-4)), (4, (1e-2, 1e-3)), (5, (1e-1, 1e-2))):
        dist = []
        for alpha in alphas:
            lim = signed_implicit_bias_limit(X, y, woodworth_init(L, d, alpha))
            assert lim.status_name == "success" and float(lim.residual) <= 1e-13
            dist.append(float(jnp.linalg.norm(lim.theta - l1)))
        rate = math.log10(dist[0] / dist[1])
        assert abs(rate - L) <= 0.05, (L, dist, rate)
    # L = 2: the distance falls, slowly (1/log(1/α)).
    d2 = [float(jnp.linalg.norm(signed_implicit_bias_limit(X, y, woodworth_init(2, d, a)).theta - l1))
          for a in (1e-1, 1e-3)]
    assert d2[1] < 0.6 * d2[0] and d2[1] > 1e-3


def test_large_alpha_tends_to_l2(data):
    """Woodworth's init: ‖θ∞(α) − X⁺y‖ = O(α^{−2L}) (R = Σθ²/(2g0)·(1 + O(θ²/α^{2L}))): doubling α
    divides the distance by ≈ 2^{2L}; the kernel limit is X⁺y exactly."""
    X, y = data
    d = X.shape[1]
    l2 = np.linalg.pinv(np.asarray(X)) @ np.asarray(y)
    np.testing.assert_allclose(signed_kernel_limit(X, y, woodworth_init(3, d, 5.0)), l2, atol=1e-12)
    for L, alphas in ((2, (4.0, 8.0)), (3, (3.0, 6.0))):
        dist = [float(jnp.linalg.norm(signed_implicit_bias_limit(X, y, woodworth_init(L, d, a)).theta - l2))
                for a in alphas]
        rate = math.log2(dist[0] / dist[1])
        assert abs(rate - 2 * L) <= 0.3, (L, dist, rate)


def test_azulay_shape_result(data):
    """L = 2, u⁺ = u⁻ = u₀, v⁺ = v⁻ = v₀: the limit depends on u₀² + v₀² only, and the whole
    trajectory is the product model's from u¹(0) = √(2(u₀² + v₀²)), u²(0) = 0 (docs/math.md, "Signed models")."""
    X, y = data
    d = X.shape[1]
    scale2 = 0.5  # u₀² + v₀² = α²(1 + shape²)
    inits = [shape_scale_init(2, d, math.sqrt(scale2 / (1 + s**2)), s) for s in (0.2, 0.6, 1.0, 1.7)]
    lims = [signed_implicit_bias_limit(X, y, u).theta for u in inits]
    for lim in lims[1:]:
        np.testing.assert_allclose(lim, lims[0], rtol=0, atol=1e-12)
    other = signed_implicit_bias_limit(X, y, shape_scale_init(2, d, math.sqrt(0.1), 1.0)).theta
    assert float(jnp.max(jnp.abs(other - lims[0]))) > 1e-3
    # Along the trajectory: signed reduced flow vs the product model's reduced flow.
    loss = dj.LeastSquares(X, y)
    ts = jnp.linspace(0.0, 6.0, 7)
    signed = _solve(SignedModel().formulation("reduced"), inits[1], loss, t1=6.0, ts=ts)
    u_prod = jnp.stack([jnp.full(d, math.sqrt(2 * scale2)), jnp.zeros(d)])
    product = _solve(ReducedFlow(), u_prod, loss, t1=6.0, ts=ts)
    np.testing.assert_allclose(signed, product, rtol=0, atol=1e-10 * float(jnp.max(jnp.abs(product))))


def test_tied_layers_run_L_times_faster(data):
    """θ_tied(t) = θ_untied(L t) (ẇ = −L w^{L−1}∇f against u̇ = −u^{L−1}∇f), for the layer
    flow and the reduced flow."""
    X, y = data
    loss = dj.LeastSquares(X, y)
    L, d = 3, X.shape[1]
    u0 = woodworth_init(L, d, 0.5)
    ts = jnp.linspace(0.0, 2.0, 5)
    for name in ("layer", "reduced"):
        tied = _solve(as_model("signed_tied").formulation(name), u0, loss, t1=2.0, ts=ts)
        untied = _solve(as_model("signed").formulation(name), u0, loss, t1=L * 2.0, ts=L * ts)
        np.testing.assert_allclose(tied, untied, rtol=0, atol=1e-9 * float(jnp.max(jnp.abs(untied))))
    assert as_model("signed_tied").time_factor(u0) == L and as_model("signed").time_factor(u0) == 1
    # A tied model refuses unequal layers.
    with pytest.raises(ValueError, match="equal layers in each half"):
        as_model("signed_tied").check_init(signed_gaussian_init(jax.random.PRNGKey(0), L, d, 0.5))


def test_escape_time_of_a_small_init(data):
    """Woodworth L = 3, α = 1e-3: the predicted escape (η reaching the box face under the frozen
    gradient) against the reduced flow's, relative error O(α^{L−2}) (here ≤ 5%)."""
    X, y = data
    loss = dj.LeastSquares(X, y)
    u0 = woodworth_init(3, X.shape[1], 1e-3)
    pred = signed_escape_time(loss, u0)
    # Near the escape θ_i leaves the α^L scale; record θ densely around the prediction.
    T = float(pred.first)
    ts = jnp.linspace(0.5 * T, 1.5 * T, 201)
    theta = _solve(SignedModel().formulation("reduced"), u0, loss, t1=1.5 * T, ts=ts, rtol=1e-10)
    k = int(pred.coordinate)
    hit = np.argmax(np.abs(np.asarray(theta[:, k])) >= 0.05)
    measured = float(ts[hit])
    assert abs(measured - T) <= 0.05 * T, (measured, T)


def test_bad_input_is_refused_before_compiling():
    with pytest.raises(ValueError, match="`model` must be one of"):
        as_model("sigend")
    with pytest.raises(ValueError, match=r"shape \(2, L, d\) or \(B, 2, L, d\)"):
        SignedModel().check_init(np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"shape \(2, L, d\) or \(B, 2, L, d\)"):
        SignedModel().check_init(np.ones((3, 2, 4)))
    with pytest.raises(ValueError, match="must be finite"):
        SignedModel().check_init(np.full((2, 2, 3), np.nan))
    with pytest.raises(ValueError, match="`formulation` must be one of"):
        SignedModel().formulation("euler")
    with pytest.raises(ValueError, match=r"shape \(2, L, d\)"):
        SignedGeometry(np.ones((2, 3)))
    g = SignedGeometry(woodworth_init(2, 3, 1.0))
    with pytest.raises(ValueError, match=r"`theta` must have shape \(3,\)"):
        g.grad_R(jnp.ones(4))
    with pytest.raises(ValueError, match=r"`u` must have shape \(2, 2, 3\)"):
        g.reduce(jnp.ones((2, 3)))
    # Half-coordinates without a computable potential: partial ties (L ≥ 3), underflow.
    with pytest.raises(ValueError, match=r"tie while another layer is larger .*\[1\]"):
        SignedGeometry(shape_scale_init(3, 2, 0.5, 0.5).at[1, :, 1].set(jnp.array([0.3, 0.3, 0.9])))
    with pytest.raises(ValueError, match="subnormal"):
        signed_implicit_bias_limit(np.eye(2), np.ones(2), np.array([1e-160, 2e-160])[None, :, None] * np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match="d = 3 coordinates but `X` has 2"):
        signed_implicit_bias_limit(np.eye(2), np.ones(2), woodworth_init(2, 3, 1.0))


def test_every_kind_of_half_converges_at_any_scale(data):
    """Gaussian (untied), Woodworth's (balanced) and the shape–scale halves, L = 2, 3, 4, at
    α = 1e-8 and 1e-16: `success` with the residual at rounding (the accuracy itself is
    checked against an 80-digit solve in tests/test_implicit_bias.py)."""
    X, y = data
    d = X.shape[1]
    for L in (2, 3, 4):
        inits = jnp.stack([make(a) for a in (1e-8, 1e-16) for make in (
            lambda a: signed_gaussian_init(jax.random.PRNGKey(1), L, d, a),
            lambda a: woodworth_init(L, d, a), lambda a: shape_scale_init(L, d, a, 0.5 * a))])
        lim = signed_implicit_bias_limit(X, y, inits)
        assert list(lim.status_name) == ["success"] * len(inits), (L, lim.status_name)
        assert float(jnp.max(lim.residual)) <= 1e-12, L


def test_limit_under_jit_and_grad(data):
    """Under `jax.jit` the same limit (bit for bit); `jax.grad` of Σθ∞² in y (implicit function
    theorem) against central differences, ≤ 1e-7 relative, for Woodworth's init (L = 3, α = 0.5)."""
    X, y = data
    u = woodworth_init(3, X.shape[1], 0.5)
    eager = signed_implicit_bias_limit(X, y, u)
    jitted = jax.jit(signed_implicit_bias_limit)(X, y, u)
    assert jitted.status_name == "success"
    np.testing.assert_array_equal(np.asarray(jitted.theta), np.asarray(eager.theta))
    f = jax.jit(lambda y_: jnp.sum(signed_implicit_bias_limit(X, y_, u, rtol=1e-14).theta ** 2))
    v = jnp.linspace(-1.0, 1.0, y.shape[0])
    h = 1e-6
    fd = float((f(y + h * v) - f(y - h * v)) / (2 * h))
    assert abs(float(jax.grad(f)(y) @ v) - fd) <= 1e-7 * abs(fd)


def test_woodworth_depth_two_converges_at_tiny_scales(data):
    """Balanced halves, L = 2 (hyperbolic entropy), α = 1e-4 down to 1e-16: the residual at
    rounding and the limit still moving toward the minimum-ℓ1 interpolator (like 1/log(1/α))."""
    X, y = data
    d = X.shape[1]
    l1 = np.asarray(dj.weighted_l1_interpolator(X, y))
    dist = []
    for alpha in (1e-4, 1e-8, 1e-16):
        lim = signed_implicit_bias_limit(X, y, woodworth_init(2, d, alpha))
        assert lim.status_name == "success" and float(lim.residual) <= 1e-12, alpha
        dist.append(float(np.linalg.norm(np.asarray(lim.theta) - l1)))
    assert dist[0] > dist[1] > dist[2] > 0, dist
