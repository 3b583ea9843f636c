"""Losses (values, gradients, theory constants) and initialization schemes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

import ddln_jax as dj


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(6, 9)), rng.normal(size=6)


def test_least_squares(data):
    X, y = data
    loss = dj.LeastSquares(X, y)
    th = np.linspace(-1, 1, 9)
    np.testing.assert_allclose(loss(th), 0.5 * np.mean((X @ th - y) ** 2), rtol=1e-14)
    np.testing.assert_allclose(loss.grad(th), jax.grad(loss.__call__)(th), rtol=1e-13)
    eig = np.linalg.eigvalsh(X.T @ X / 6)
    np.testing.assert_allclose(loss.smoothness(), eig[-1], rtol=1e-12)
    np.testing.assert_allclose(loss.pl_constant(), np.linalg.eigvalsh(X @ X.T / 6)[0], rtol=1e-10)
    assert loss.minimum() <= 1e-25 and loss.interpolates()
    # Overdetermined and noisy: f* > 0 is the least-squares residual, PL = λ_min(XᵀX/n).
    tall = dj.LeastSquares(X.T, np.arange(9.0))
    sol = np.linalg.lstsq(X.T, np.arange(9.0), rcond=None)[0]
    np.testing.assert_allclose(tall.minimum(), tall(sol), rtol=1e-12)
    assert not tall.interpolates()
    np.testing.assert_allclose(tall.pl_constant(), np.linalg.eigvalsh(X @ X.T / 9)[0], rtol=1e-10)


def test_logistic(data):
    X, _ = data
    labels = np.array([1.0, -1, 1, 1, -1, -1])
    loss = dj.Logistic(X, labels)
    th = np.linspace(-1, 1, 9)
    np.testing.assert_allclose(loss(th), np.mean(np.log1p(np.exp(-labels * (X @ th)))), rtol=1e-14)
    np.testing.assert_allclose(loss.grad(th), jax.grad(loss.__call__)(th), rtol=1e-13)
    np.testing.assert_allclose(loss.smoothness(), np.linalg.norm(X, 2) ** 2 / 24, rtol=1e-12)
    assert loss.separable() and loss.minimum() == 0.0 and loss.pl_constant() is None
    # Not separable (duplicated point with both labels): the minimum is attained.
    Xn = np.vstack([X[:, :2], X[:1, :2]])
    yn = np.append(labels, -labels[0])
    bad = dj.Logistic(Xn, yn)
    assert not bad.separable()
    ref = minimize(lambda t: float(bad(t)), np.zeros(2), method="BFGS", options={"gtol": 1e-10})
    np.testing.assert_allclose(bad.minimum(), ref.fun, rtol=1e-9)


def test_callable_loss_is_differentiated():
    loss = dj.CallableLoss(lambda th: jnp.sum(jnp.cosh(th)))
    th = jnp.array([0.3, -1.0])
    np.testing.assert_allclose(loss.grad(th), jnp.sinh(th), rtol=1e-14)


def test_inits():
    key = jax.random.PRNGKey(0)
    u = dj.gaussian_init(key, 3, 20000, 0.5)
    assert u.shape == (3, 20000) and abs(float(jnp.std(u)) - 0.5) < 0.01
    z = dj.zero_first_init(4, 3, 0.2)
    np.testing.assert_array_equal(z[0], 0.0)
    np.testing.assert_array_equal(z[1:], 0.2)
    b = dj.balanced_init(2, 3, 0.7)
    np.testing.assert_array_equal(b, 0.7)
    layered = dj.layered_init([0.1, 1.0, 2.0], 4)
    np.testing.assert_array_equal(layered[:, 0], [0.1, 1.0, 2.0])
    noisy = dj.layered_init([0.1, 1.0], 50000, key=key)
    np.testing.assert_allclose(jnp.std(noisy, axis=1), [0.1, 1.0], rtol=0.02)
