"""The implicit-bias limit (docs/math.md, "Implicit bias") and its α → 0 (weighted
ℓ1) and α → ∞ (kernel) limits, held to exact simulations run to convergence, to the KKT
conditions and to closed forms. The simulations share one configuration with the other theory
tests (tests/helpers.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import NT, B, D, N, band_inits, long_runs, problem, run

import ddln_jax as dj
from ddln_jax import (
    implicit_bias_limit,
    kernel_limit,
    small_init_limit,
    weighted_l1_interpolator,
)


@jax.jit
@jax.vmap
def _kkt_pieces(u0, theta, theta_star):
    g = dj.Geometry(u0)
    theta0 = jnp.prod(u0, axis=0)
    return g.grad_Q(theta0), g.grad_Q(theta), g.bregman(theta, theta0), g.bregman(theta_star, theta0)


@pytest.mark.parametrize("L", [1, 2, 3, 4, 5])
def test_implicit_bias_limit_is_the_limit_of_long_simulations(L):
    """On 12 (problem, init) pairs: ‖θ(T) − θ∞‖/‖θ∞‖ ≤ 1e-8; the KKT conditions hold
    (‖Xθ∞ − y‖ ≤ 1e-12‖y‖, ∇Q(θ∞) − ∇Q(θ0) = Xᵀλ to 1e-10); D_Q(θ∞, θ0) ≤ D_Q(θ*, θ0) for the
    planted interpolator θ*; for L = 1 the closed form θ0 + X⁺(y − Xθ0) (also the kernel
    limit, exact there) to 1e-12."""
    worst = 0.0
    for X, y, theta_star, u0, tr, lim in long_runs(L):
        assert list(lim.status_name) == ["success"] * B
        err = np.linalg.norm(tr.theta_final - lim.theta, axis=1) / np.linalg.norm(lim.theta, axis=1)
        worst = max(worst, float(err.max()))
        assert np.all(lim.residual <= 1e-12)
        eta0, eta_lim, d_lim, d_star = _kkt_pieces(u0, lim.theta, jnp.broadcast_to(theta_star, lim.theta.shape))
        np.testing.assert_allclose(lim.eta, eta_lim, rtol=1e-12, atol=1e-12)
        kkt = lim.eta - eta0 - lim.multiplier @ X
        scale = jnp.max(jnp.abs(lim.eta), axis=1, keepdims=True) + 1
        assert float(jnp.max(jnp.abs(kkt) / scale)) <= 1e-10
        np.testing.assert_allclose(lim.bregman, d_lim, rtol=1e-12)
        assert bool(jnp.all(lim.bregman <= d_star))
        if L == 1:
            closed = u0[:, 0] + (y - u0[:, 0] @ X.T) @ np.linalg.pinv(X).T
            np.testing.assert_allclose(lim.theta, closed, rtol=1e-12, atol=1e-12)
            for k in range(B):
                np.testing.assert_allclose(kernel_limit(X, y, u0[k]), closed[k], rtol=1e-12, atol=1e-12)
    assert worst <= 1e-8, worst


def test_implicit_bias_rank_deficient_and_jittable_pieces():
    """A repeated row (rank X < n) gives the same limit as the deduplicated data (1e-12)."""
    X, y, _ = problem(1)
    u0 = band_inits(3, 1)[1]
    a = implicit_bias_limit(X, y, u0)
    b = implicit_bias_limit(np.vstack([X, X[:2]]), np.concatenate([y, y[:2]]), u0)
    assert a.status_name == b.status_name == "success"
    np.testing.assert_allclose(b.theta, a.theta, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(jax.jit(kernel_limit)(X, y, u0), kernel_limit(X, y, u0), rtol=1e-12)


# Per depth: α of the simulated limits, of the asymptotic check, and of the random direction,
# and the time the smallest simulated α needs to pass its last saddle. The local slope reaches
# L − 1 only below a problem-dependent α (for problem 0 of this module it dips to 0.25 around
# α = 0.05, L = 3); problem 1 is past L − 1 from α ≈ 0.1 (L = 3) and 0.2 (L = 4).
_SMALL = {
    3: ([0.1, 0.07, 0.05, 0.035], [0.01, 0.005, 0.0025], [0.02, 0.01, 0.005], 30_000.0),
    4: ([0.2, 0.15, 0.12, 0.1], [0.035, 0.02, 0.01], [0.035, 0.02, 0.01], 60_000.0),
}


@pytest.mark.parametrize("L", [3, 4])
def test_small_init_limit_approaches_the_l1_interpolator(L):
    """Zero-first inits: simulated limits (4 values of α, each within 1e-8 of
    `implicit_bias_limit`) approach the minimum-ℓ1 interpolator with log–log slopes ≥ L − 1;
    further down the slope is L (±0.1): ‖θ∞(α) − θ_ℓ1‖₁ = O(α^L), the true order (see
    `small_init_limit`). A random direction's limit approaches its weighted LP (weights
    Φ(∞) ∓ ∇Q(θ0)) at the same order, and stays away from the plain ℓ1 interpolator."""
    sim_alphas, asym_alphas, dir_alphas, t1 = (np.array(a) if i < 3 else a for i, a in enumerate(_SMALL[L]))
    X, y, _ = problem(1)
    l1 = weighted_l1_interpolator(X, y)
    # The LP is polished: X θ_ℓ1 = y to rounding.
    assert np.linalg.norm(X @ l1 - y) <= 1e-13 * np.linalg.norm(y)
    np.testing.assert_allclose(small_init_limit(X, y, dj.zero_first_init(L, D, 0.1)), l1, rtol=1e-12, atol=1e-14)
    u0 = np.stack([np.asarray(dj.zero_first_init(L, D, a)) for a in sim_alphas])
    tr = run(dj.LeastSquares(X, y), u0, np.geomspace(1.0, t1 + 1, NT) - 1, rtol=1e-12)
    assert list(tr.status_name) == ["success"] * B
    lim = implicit_bias_limit(X, y, u0)
    assert list(lim.status_name) == ["success"] * B
    err = np.linalg.norm(tr.theta_final - lim.theta, axis=1) / np.linalg.norm(lim.theta, axis=1)
    assert err.max() <= 1e-8, err
    dist = np.abs(np.asarray(tr.theta_final) - l1).sum(axis=1)
    slopes = np.diff(np.log(dist)) / np.diff(np.log(sim_alphas))
    assert np.all(slopes >= L - 1), slopes
    # Deeper in the asymptotic range (the solver alone, validated above): slope L.
    lim_s = implicit_bias_limit(X, y, np.stack([np.asarray(dj.zero_first_init(L, D, a)) for a in asym_alphas]),
                                rtol=1e-10)
    assert np.all(lim_s.converged)
    d_s = np.abs(np.asarray(lim_s.theta) - l1).sum(axis=1)
    np.testing.assert_allclose(np.diff(np.log(d_s)) / np.diff(np.log(asym_alphas)), L, atol=0.1)
    # A random direction v: the limit of α·v goes to the weighted LP, not to θ_ℓ1.
    v = np.asarray(dj.gaussian_init(jax.random.PRNGKey(6), L, D, 1.0))
    target = small_init_limit(X, y, v)
    assert np.abs(target - l1).sum() > 1.0
    lim_v = implicit_bias_limit(X, y, np.stack([a * v for a in dir_alphas]), rtol=1e-10)
    assert np.all(lim_v.converged)
    d_v = np.abs(np.asarray(lim_v.theta) - target).sum(axis=1)
    np.testing.assert_allclose(np.diff(np.log(d_v)) / np.diff(np.log(dir_alphas)), L, atol=0.25)
    assert np.all(np.abs(np.asarray(lim_v.theta) - l1).sum(axis=1) > 1.0)


def test_kernel_regime_for_large_scales():
    """Zero-first inits (θ0 = 0): the limit tends to the minimum-ℓ2 interpolator X⁺y as α → ∞,
    at distance ∝ α^{−2L} (log–log slope −2L ± 0.1), and `kernel_limit` is X⁺y there."""
    X, y, _ = problem(0)
    l2 = np.linalg.pinv(X) @ y
    alphas = np.array([2.0, 4.0, 8.0])
    for L in [2, 3]:
        u0 = np.stack([np.asarray(dj.zero_first_init(L, D, a)) for a in alphas])
        np.testing.assert_allclose(kernel_limit(X, y, u0[0]), l2, rtol=1e-12, atol=1e-13)
        lim = implicit_bias_limit(X, y, u0)
        assert np.all(lim.converged)
        dist = np.linalg.norm(np.asarray(lim.theta) - l2, axis=1) / np.linalg.norm(l2)
        np.testing.assert_allclose(np.diff(np.log(dist)) / np.diff(np.log(alphas)), -2 * L, atol=0.1)



def test_bad_input_is_refused_or_marked():
    X, y, _ = problem(0)
    u0 = band_inits(3, 0)[0]
    with pytest.raises(ValueError, match=r"no θ satisfies Xθ = y"):
        implicit_bias_limit(X.T, np.arange(D, dtype=float), band_inits(3, 0)[0][:, :N])
    with pytest.raises(ValueError, match=r"no θ satisfies Xθ = y"):
        weighted_l1_interpolator(np.vstack([X, X[:1]]), np.concatenate([y, [y[0] + 1]]))
    partial = np.stack([0.5 * np.ones(D), 0.5 * np.ones(D), np.ones(D)])  # a partial tie
    with pytest.raises(ValueError, match=r"`u0\[1\]` violates Assumption A"):
        implicit_bias_limit(X, y, np.stack([u0, partial]))
    with pytest.raises(ValueError, match=r"`rtol`=1e-12 is below what float32"):
        implicit_bias_limit(X.astype(np.float32), y.astype(np.float32), u0.astype(np.float32))
    with pytest.raises(ValueError, match=r"`u0` has d = 4 coordinates but `X` has 15"):
        implicit_bias_limit(X, y, u0[:, :4])
    with pytest.raises(ValueError, match=r"`weights` must be > 0"):
        weighted_l1_interpolator(X, y, weights=-np.ones(D))
    with pytest.raises(ValueError, match=r"`u0` violates Assumption A"):
        small_init_limit(X, y, dj.balanced_init(3, D, 0.1))
    # An unfinished solve says so in its status (statuses at tiny scales: test_implicit_bias).
    short = implicit_bias_limit(X, y, dj.zero_first_init(3, D, 0.05), max_iter=2)
    assert short.status_name == "max_steps" and not short.converged
