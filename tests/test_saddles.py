"""Saddle-to-saddle dynamics at depth 2 (docs/math.md, "Saddle to saddle") held to
exact simulations at α down to 1e-24."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import NT, B, D, band_inits, check_grad_fd, problem, run

import ddln_jax as dj
from ddln_jax import detect_saddles, predict_first_jump, rescaled_time


def test_saddle_to_saddle_depth_two():
    """L = 2, zero-first and three random inits at α ∈ {1e-6, 1e-12, 1e-24}: the first jump in
    rescaled time is within 5% of 1/‖∇f(0)‖∞ for α ≤ 1e-12, and the zero-first error decays
    like 1/log(1/α) (error·log(1/α) constant within 30%); the second plateau sits at the
    saddle min_c f(c e_i) of the first coordinate (1e-9 relative for α ≤ 1e-12); at least three
    plateaus are found."""
    X, y, _ = problem(44)  # |∂f(0)| has a clear largest coordinate (2.5× the next)
    loss = dj.LeastSquares(X, y)
    g0 = np.abs(np.asarray(loss.grad(jnp.zeros(D))))
    i1 = int(np.argmax(g0))
    c = X[:, i1] @ y / (X[:, i1] @ X[:, i1])
    saddle = 0.5 * np.mean((c * X[:, i1] - y) ** 2)
    pred = float(predict_first_jump(loss))
    np.testing.assert_allclose(pred, 1 / g0.max(), rtol=1e-14)
    # Rescaled save times: dense around the first jump, then out to three more saddles.
    tt = np.concatenate([np.linspace(0, 1.5 * pred, 121)[:-1], np.linspace(1.5 * pred, 8 * pred, NT - 120)])
    zero_err = []
    for alpha in [1e-6, 1e-12, 1e-24]:
        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        u0 = np.stack([np.asarray(dj.zero_first_init(2, D, alpha))]
                      + [np.asarray(dj.gaussian_init(k, 2, D, alpha)) for k in keys])
        # w starts at the scale α: atol must be below it.
        tr = run(loss, u0, tt * math.log(1 / alpha), rtol=1e-10, atol=1e-14 * alpha)
        np.testing.assert_allclose(rescaled_time(tr.ts[0], alpha), tt, rtol=1e-13, atol=1e-15)
        found = [detect_saddles(tr[k], alpha) for k in range(B)]
        rel = np.array([s.first_jump / pred - 1 for s in found])
        zero_err.append(abs(rel[0]) * math.log(1 / alpha))
        assert all(len(s.plateaus) >= 3 for s in found)
        if alpha <= 1e-12:
            assert np.all(np.abs(rel) <= 0.05), (alpha, rel)
            np.testing.assert_allclose([s.plateau_levels[1] for s in found], saddle, rtol=1e-9)
    assert max(zero_err) <= 1.3 * min(zero_err), zero_err


def test_saddle_predictions_under_jit_vmap_grad():
    """`rescaled_time`: jit and vmap over α give t/log(1/α) (1e-14), and ∂/∂α is the closed
    form t/(α log²(1/α)) (1e-12). `predict_first_jump`: jit and vmap over θ0 equal the eager
    values (1e-14); its gradient in θ0 and in the data X against finite differences (1e-6)."""
    ts = jnp.linspace(0.0, 3.0, 4)
    alphas = jnp.array([1e-3, 1e-6])
    want = np.asarray(ts)[None] / np.log(1 / np.asarray(alphas))[:, None]
    np.testing.assert_allclose(jax.jit(jax.vmap(rescaled_time, (None, 0)))(ts, alphas), want, rtol=1e-14)
    d = jax.grad(lambda a: rescaled_time(2.0, a))(1e-3)
    np.testing.assert_allclose(d, 2.0 / (1e-3 * math.log(1e3) ** 2), rtol=1e-12)

    X, y, _ = problem(44)
    loss = dj.LeastSquares(X, y)
    th = jnp.asarray(np.random.default_rng(1).normal(size=(3, D)) * 0.1)
    eager = [float(predict_first_jump(loss, t)) for t in th]
    np.testing.assert_allclose(jax.jit(jax.vmap(predict_first_jump, (None, 0)))(loss, th), eager, rtol=1e-14)
    f = lambda args: predict_first_jump(dj.LeastSquares(args[1], y), args[0])
    check_grad_fd(f, (th[0], jnp.asarray(X)), grad=jax.jit(jax.grad(f)))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"`alpha` must be in \(0, 1\)"):
        rescaled_time(np.ones(3), 2.0)
    with pytest.raises(ValueError, match=r"`alpha` must be finite and > 0"):
        rescaled_time(np.ones(3), -1.0)
    with pytest.raises(RuntimeError, match=r"`alpha` must be in \(0, 1\)"):  # traced: error_if
        eqx.filter_jit(rescaled_time)(jnp.ones(3), jnp.asarray(2.0))
    X, y, _ = problem(0)
    batch = run(dj.LeastSquares(X, y), band_inits(2, 0), np.linspace(0.0, 1.0, NT))
    with pytest.raises(ValueError, match=r"`trajectory` must be a single run"):
        detect_saddles(batch, 1e-3)
    with pytest.raises(ValueError, match=r"fewer than 3 usable saves"):
        detect_saddles(batch[0], 1e-3, floor=0.99)
    with pytest.raises(ValueError, match=r"`theta0` is required"):
        predict_first_jump(dj.CallableLoss(lambda th: jnp.sum(th**2)))
