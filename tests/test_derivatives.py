"""Exact derivatives of outcomes (issue: derivatives): reverse mode through `simulate` for every
formulation, forward mode through the lane engine, the derivative of the time to ε.

Every derivative is held to central finite differences (≤ 1e-6 relative, step chosen per
case), and forward mode on the engine to forward mode through `simulate` run by run (≤ 1e-10).
"""

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddln_jax as dj

N, D = 4, 6
T1 = 3.0
TOL = dict(rtol=1e-12, atol=1e-14)


def _central(f, x, h):
    return (f(x + h) - f(x - h)) / (2 * h)


def _problem(kind):
    X = jax.random.normal(jax.random.PRNGKey(21), (N, D))
    w = jnp.zeros(D).at[:2].set(jnp.array([1.2, -0.8]))
    return dj.LeastSquares(X, X @ w) if kind == "lsq" else dj.Logistic(X, jnp.sign(X @ w + 1e-3))


def _direction(L):
    v = jax.random.normal(jax.random.PRNGKey(30 + L), (L, D))
    return v * jnp.linspace(1.0, 1.3, L)[:, None]  # distinct layer sizes: Assumption A


@pytest.mark.parametrize(
    "kind, L, formulation",
    [("lsq", 2, "reduced"), ("lsq", 3, "reduced"), ("lsq", 4, "reduced"),
     ("logistic", 2, "reduced"), ("logistic", 3, "reduced"),
     ("lsq", 3, "layer"), ("lsq", 3, "mirror"), ("lsq", 3, "dual")],
)
def test_reverse_mode_through_simulate(kind, L, formulation):
    """d f(θ(T))/dα by diffrax's checkpointed adjoint against central differences; through
    the default solver (Auto) at L = 3, through Tsit5 elsewhere (half the compile time)."""
    loss, v = _problem(kind), _direction(L)
    solver = None if (L, formulation) == (3, "reduced") else dfx.Tsit5()

    @jax.jit
    def final_loss(alpha):
        return dj.simulate(loss, alpha * v, t1=T1, formulation=formulation, solver=solver,
                           **TOL).loss_final

    alpha = 0.8
    g = jax.grad(final_loss)(alpha)
    fd = _central(final_loss, alpha, 1e-4)
    assert abs(g - fd) <= 1e-6 * abs(fd), (g, fd)


@pytest.mark.parametrize("formulation", ["reduced", "dual"])
def test_reverse_mode_through_the_signed_model(formulation):
    """The signed network θ = θ⁺ − θ⁻: d f(θ(T))/dα against central differences."""
    loss = _problem("lsq")
    v = dj.signed_gaussian_init(jax.random.PRNGKey(4), 2, D, 1.0)

    @jax.jit
    def final_loss(alpha):
        return dj.simulate(loss, alpha * v, t1=T1, model="signed", formulation=formulation,
                           solver=dfx.Tsit5(), **TOL).loss_final

    g = jax.grad(final_loss)(0.8)
    fd = _central(final_loss, 0.8, 1e-4)
    assert abs(g - fd) <= 1e-6 * abs(fd), (g, fd)


def test_memory_bounded_adjoint_gives_the_same_gradient():
    loss, v = _problem("lsq"), _direction(3)

    def final_loss(alpha, adjoint):
        return dj.simulate(loss, alpha * v, t1=T1, adjoint=adjoint, solver=dfx.Tsit5(),
                           **TOL).loss_final

    a = jax.grad(final_loss)(0.8, dfx.RecursiveCheckpointAdjoint())
    b = jax.grad(final_loss)(0.8, dfx.RecursiveCheckpointAdjoint(checkpoints=16))
    np.testing.assert_allclose(a, b, rtol=1e-10)


@pytest.fixture(scope="module")
def batch():
    L = 3
    loss = _problem("lsq")
    alphas = jnp.array([0.6, 0.8, 1.0, 1.2, 1.4])
    U = alphas[:, None, None] * _direction(L)[None]
    return loss, U, alphas


def test_forward_mode_engine_equals_simulate(batch):
    """θ(t), θ_final and the time to ε, differentiated in α on the engine and through simulate."""
    loss, U, alphas = batch
    dU = U / alphas[:, None, None]
    scale = lambda x: float(jnp.nanmax(jnp.abs(x)))
    # The two loops take slightly different step sequences (counts differ by ≤ 0.2%), and the
    # derivative of a discrete solution feels that at the tolerance's level. Measured, max over
    # runs of ‖a − b‖∞/‖a‖∞ for θ_final: 8e-10 at rtol 1e-12, 1.2e-10 at 1e-13, 5e-12 at 1e-14.
    kw = dict(t1=40.0, ts=jnp.array([0.0, 40.0]), stop_ratio=1e-4, rtol=1e-14, atol=1e-16)
    tr, dtr = dj.simulate_jvp(loss, U, dU, **kw)
    te, dte = dj.simulate_jvp(loss, U, dU, lanes=2, **kw)
    assert list(tr.status_name) == list(te.status_name)
    assert list(tr.status_name).count("event") >= 3  # most runs stop at the threshold
    for name in ("theta_final", "t_final", "loss_final"):
        a, b = getattr(dtr, name), getattr(dte, name)
        assert scale(a - b) <= 1e-10 * scale(a), name
    # Save times clip the engine's steps (diffrax interpolates instead): different discrete
    # solutions, which agree run by run (measured: 1e-14 for θ(t), 4e-11 for θ_final).
    kw["ts"] = jnp.linspace(0, 40.0, 9)
    _, dtr = dj.simulate_jvp(loss, U, dU, **kw)
    _, dte = dj.simulate_jvp(loss, U, dU, lanes=2, **kw)
    ok = jnp.isfinite(dtr.theta)
    assert scale(jnp.where(ok, dtr.theta - dte.theta, 0)) <= 1e-10 * scale(jnp.where(ok, dtr.theta, 0))
    assert scale(dtr.theta_final - dte.theta_final) <= 1e-10 * scale(dtr.theta_final)


def test_time_to_eps_derivative_against_finite_differences(batch):
    """d t_ε / dα by the implicit function theorem at the event, against central differences
    of the located event time (which moves with the threshold ε f(θ0) too)."""
    loss, U, alphas = batch
    kw = dict(t1=40.0, stop_ratio=1e-4, **TOL)
    v, alphas = U[-1] / alphas[-1], alphas[-1:]  # the largest init: the fastest to reach ε
    t_eps = jax.jit(lambda a: dj.simulate(loss, a * v, **kw).t_final)
    tr, dtr = dj.simulate_jvp(loss, alphas[0] * v, v, **kw)
    _, dte = dj.simulate_jvp(loss, alphas[0] * v[None], v[None], lanes=1, **kw)
    assert tr.status_name == "event"
    fd = _central(t_eps, float(alphas[0]), 1e-5)
    assert abs(dtr.t_final - fd) <= 1e-6 * abs(fd)
    assert abs(dte.t_final[0] - fd) <= 1e-6 * abs(fd)


def test_simulate_jvp_bad_direction(batch):
    loss, U, _ = batch
    with pytest.raises(ValueError, match="`du0` must have the shape of `u0`"):
        dj.simulate_jvp(loss, U, U[0], t1=1.0)
