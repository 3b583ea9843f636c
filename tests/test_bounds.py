"""Convergence bounds (docs/math.md, "Convergence bounds") held to exact simulations.

The simulations share one configuration with the other theory tests (tests/helpers.py), so
each depth compiles once for the session.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    NT,
    T_LONG,
    B,
    D,
    N,
    band_inits,
    check_grad_fd,
    long_runs,
    problem,
    run,
    tree_allclose,
    vmappable,
)

import ddln_jax as dj
from ddln_jax import bound_report, c0, pl_bound, pl_constant, pl_estimate, sublinear_bound

_metric = jax.jit(lambda u0, theta: dj.Geometry(u0).metric(theta))


@pytest.mark.parametrize("L", [1, 2, 3, 4, 5])
def test_loss_stays_below_both_bounds(L):
    """On 12 random (problem, init) pairs: f(θ(t)) − f* ≤ (f(θ0) − f*)e^{−2μc0t} and
    ≤ D_Q(θ∞, θ0)/t at every save (allowance 1e-9·(f(θ0) − f*)), the bounds not vacuous
    (2μc0 ≥ 1e-3, and within a factor 2 of the excess somewhere). The measured late rate is
    ≥ 2μc0 (a least-squares slope is a positive average of local rates, each ≥ 2μc0; 1e-4 for
    the integration error of slopes near the floor) and close to the linearization's
    2λ_min(X diag g(θ∞) Xᵀ/n): median error ≤ 1e-3, max ≤ 0.1 (when λ₂/λ₁ is near 1 the
    second mode has not died out before f − f* reaches rounding; the exact case is below)."""
    worst, rate_err = 0.0, []
    for X, y, _, u0, tr, lim in long_runs(L):
        loss = dj.LeastSquares(X, y)
        mu = pl_constant(loss)
        np.testing.assert_allclose(mu, np.linalg.eigvalsh(X @ X.T / N)[0], rtol=1e-10)
        for k in range(B):
            # θ* defaults to the implicit-bias limit; passed here to reuse the cached one.
            rep = bound_report(tr[k], loss, u0[k], theta_star=lim.theta[k], allowance=1e-9)
            assert rep.pl_applicable and rep.sublinear_applicable
            assert rep.pl_holds and rep.sublinear_holds, (L, k)
            assert rep.pl_holds_on == rep.sublinear_holds_on == ((0.0, T_LONG),)
            assert rep.bound_rate >= 1e-3
            # At every save after t = 0 (where D/t = ∞) one of the two bounds is the tighter.
            spans = sorted(rep.pl_tighter_on + rep.sublinear_tighter_on)
            assert spans[0][0] == rep.ts[1] and spans[-1][1] == T_LONG
            above = rep.excess[1:] > 1e-12 * rep.excess[0]
            best = np.minimum(rep.pl, rep.sublinear)[1:][above]
            worst = max(worst, float(np.max(rep.excess[1:][above] / best)))
            assert rep.rate_ratio >= 1 - 1e-4  # integration error in the late slopes
            g = _metric(u0[k], lim.theta[k])
            rate = 2 * np.linalg.eigvalsh((X * np.asarray(g)) @ X.T / N)[0]
            rate_err.append(abs(rep.measured_rate / rate - 1))
    assert worst >= 0.5
    assert np.median(rate_err) <= 1e-3 and max(rate_err) <= 0.1, rate_err


def test_pl_bound_is_attained_on_the_slowest_mode():
    """L = 1 (g = 1, c0 = 1) from θ0 = 0 with y along the smallest singular direction of X:
    f − f* = (f(θ0) − f*)e^{−2μt} exactly, so the report measures the rate 2μ and the ratio
    to the PL bound stays 1 (both to 1e-8)."""
    X, _, _ = problem(3)
    U, s, _ = np.linalg.svd(X, full_matrices=False)
    y = U[:, -1] * 3.0
    loss = dj.LeastSquares(X, y)
    u0 = np.zeros((B, 1, D))
    tr = run(loss, u0, np.linspace(0.0, 10.0 / pl_constant(loss), NT))
    rep = bound_report(tr[0], loss, u0[0])
    np.testing.assert_allclose(rep.measured_rate, 2 * pl_constant(loss), rtol=1e-8)
    np.testing.assert_allclose(rep.rate_ratio, 1.0, rtol=1e-8)
    ok = rep.excess > 1e-20 * rep.excess[0]
    np.testing.assert_allclose(rep.excess[ok] / rep.pl[ok], 1.0, rtol=1e-8)


def _logistic_ratio(X, labels, theta):
    """½‖∇f‖²/f for the logistic loss, in NumPy (independent of the library's gradient)."""
    m = labels * (theta @ X.T)
    f = np.mean(np.logaddexp(0.0, -m), axis=-1)
    sig = 0.5 * (1 - np.tanh(m / 2))  # σ(−m), stable
    grad = -(labels * sig) @ X / len(labels)
    return 0.5 * np.sum(grad**2, axis=-1) / f


def test_pl_estimate_and_losses_without_pl_constant():
    """Least squares: ½‖∇f‖²/(f − f*) ≥ μ at every save (to 1e-9 relative). Separable
    logistic: no PL constant (ValueError); the ratio along a run equals an independent NumPy
    computation (1e-10) and decays (last/first ≤ 0.1); `mu` is its minimum; the report marks
    both bounds not applicable instead of giving numbers, and with the run's own μ the PL bound
    holds and is met (to 1e-6) where the ratio is smallest."""
    X, y, _, u0, tr, _ = long_runs(2)[0]
    loss = dj.LeastSquares(X, y)
    est = pl_estimate(loss, tr[0])
    ratio = np.asarray(est.ratio)
    assert np.all(ratio[np.isfinite(ratio)] >= pl_constant(loss) * (1 - 1e-9))
    assert float(est.mu) >= pl_constant(loss) * (1 - 1e-9)

    labels = np.sign(X @ np.linspace(-1, 1, D))
    logistic = dj.Logistic(X, labels)
    assert logistic.separable()
    with pytest.raises(ValueError, match=r"`loss` \(Logistic\) has no known global PL constant"):
        pl_constant(logistic)
    lt = run(logistic, u0, np.linspace(0.0, 200.0, NT), rtol=1e-10)
    est = pl_estimate(logistic, lt[0])
    r = np.asarray(est.ratio)
    indep = _logistic_ratio(X, labels, np.asarray(lt.theta[0]))
    np.testing.assert_allclose(r, indep, rtol=1e-10)
    assert r[-1] <= 0.1 * r[0]
    np.testing.assert_allclose(float(est.mu), indep.min(), rtol=1e-10)
    rep = bound_report(lt[0], logistic, u0[0])
    assert not rep.pl_applicable and "no known global PL constant" in rep.pl_note
    assert np.all(np.isnan(rep.pl))
    assert not rep.sublinear_applicable and "`theta_star` is required" in rep.sublinear_note
    # With the run's own μ and a comparison point, both bounds apply and hold on the window.
    theta_ref = np.asarray(lt.theta_final[0])
    rep = bound_report(lt[0], logistic, u0[0], mu=float(est.mu), theta_star=theta_ref)
    assert rep.pl_holds and rep.sublinear_holds


def test_bounds_under_jit_vmap_grad():
    """c0 = min_i ∏_{j≠m} δ_{j,i} against a direct loop, eagerly, under jit and vmap; its
    gradient against finite differences (1e-6). The bound curves against their closed forms,
    under jit and vmap, with ∂/∂μ of the PL bound = −2c0·t·bound (1e-12) and ∂/∂D of the
    1/t bound = 1/t. `pl_estimate` under jit (f* passed) and vmap over a batch equals the
    eager estimate of each run (1e-12)."""
    u = band_inits(3, 0)
    direct = [min(np.prod(sorted(ui[:, i] ** 2)[1:] - sorted(ui[:, i] ** 2)[0]) for i in range(D))
              for ui in u]
    np.testing.assert_allclose(c0(u), direct, rtol=1e-14)
    np.testing.assert_allclose(jax.jit(jax.vmap(c0))(jnp.asarray(u)), direct, rtol=1e-14)
    assert float(c0(np.ones((1, 4)))) == 1.0 and float(c0(dj.balanced_init(3, 4, 0.5))) == 0.0
    check_grad_fd(c0, u[1])

    ts = jnp.linspace(0, 5, 6)
    np.testing.assert_allclose(jax.jit(pl_bound)(ts, 2.0, 0.3, 0.5), 2 * np.exp(-0.3 * ts), rtol=1e-14)
    mus = jnp.array([0.1, 0.3])
    np.testing.assert_allclose(jax.vmap(pl_bound, (None, None, 0, None))(ts, 2.0, mus, 0.5),
                               2 * np.exp(-np.outer(mus, ts)), rtol=1e-14)
    dmu = jax.grad(lambda m: pl_bound(3.0, 2.0, m, 0.5))(0.3)
    np.testing.assert_allclose(dmu, -2 * 0.5 * 3.0 * 2 * math.exp(-0.9), rtol=1e-12)
    sub = jax.jit(sublinear_bound)(ts, 3.0)
    assert np.isinf(sub[0]) and np.allclose(sub[1:], 3.0 / ts[1:], rtol=1e-14)
    np.testing.assert_allclose(jax.grad(sublinear_bound, 1)(4.0, 3.0), 0.25, rtol=1e-14)

    X, y, _, _, tr, _ = long_runs(2)[0]
    loss = dj.LeastSquares(X, y)
    f_star = loss.minimum()
    eager = [pl_estimate(loss, tr[k]) for k in range(B)]
    jitted = eqx.filter_jit(lambda lo, t, fs: pl_estimate(lo, t, f_star=fs))(loss, tr[1], f_star)
    assert tree_allclose(jitted, eager[1], rtol=1e-12, atol=0, equal_nan=True)
    batched = eqx.filter_jit(jax.vmap(lambda t: pl_estimate(loss, t, f_star=f_star)))(vmappable(tr))
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *eager)
    assert tree_allclose(batched, stacked, rtol=1e-12, atol=0, equal_nan=True)


def test_bounds_without_assumption_a_or_pl():
    """The balanced init (no Assumption A): the 1/t bound is marked not applicable (NaN curve),
    c0 = 0 and the PL curve is the constant f(θ0) − f* (computed here in NumPy, 1e-12); the
    loss it is compared with is non-increasing along the run (ḟ = −Σ g(∂f)² ≤ 0, to 1e-12 of
    f(θ0)) and ends below f(θ0) by at least a half, so the vacuous bound is never the tighter
    statement. Bad arguments are refused by name."""
    X, y, _ = problem(0)
    loss = dj.LeastSquares(X, y)
    bal = np.asarray(dj.balanced_init(2, D, 0.5))
    tr = run(loss, np.stack([bal] * B), np.linspace(0.0, 5.0, NT))
    rep = bound_report(tr[0], loss, bal)
    assert not rep.sublinear_applicable and "violates Assumption A" in rep.sublinear_note
    assert np.all(np.isnan(rep.sublinear)) and rep.c0 == 0 and "vacuous" in rep.pl_note
    theta0 = np.prod(bal, axis=0)
    lsq = np.linalg.lstsq(X, y, rcond=None)[0]
    excess0 = 0.5 * np.mean((X @ theta0 - y) ** 2) - 0.5 * np.mean((X @ lsq - y) ** 2)
    np.testing.assert_allclose(rep.pl, excess0, rtol=1e-12)
    assert np.all(np.diff(rep.excess) <= 1e-12 * excess0)
    assert rep.excess[-1] <= 0.5 * excess0
    with pytest.raises(ValueError, match=r"`trajectory` must be a single run"):
        bound_report(tr, loss, bal)
    with pytest.raises(TypeError, match=r"`trajectory` must be a ddln_jax.Trajectory"):
        pl_estimate(loss, {"ts": 1})
    with pytest.raises(ValueError, match=r"`mu` must be finite and > 0"):
        bound_report(tr[0], loss, bal, mu=-1.0)
    with pytest.raises(ValueError, match=r"`u0` must have shape \(..., L, d\)"):
        c0(np.ones(3))
    with pytest.raises(ValueError, match=r"`f_star` is required"):
        pl_estimate(dj.CallableLoss(lambda th: jnp.sum(th**2)), tr[0])
