"""Constant-step runs of the layer flow converge at the solver's order (as diffrax tests do)."""

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddln_jax as dj


@pytest.fixture(scope="module")
def order_problem():
    X = jax.random.normal(jax.random.PRNGKey(1), (4, 6))
    loss = dj.LeastSquares(X, X @ jnp.array([1.0, -1.0, 0.5, 0.0, 0.0, 0.3]))
    u0 = dj.gaussian_init(jax.random.PRNGKey(2), 3, 6, 0.8)
    ref = dj.simulate(loss, u0, t1=1.0, ts=jnp.array([1.0]), formulation="layer",
                      solver=dfx.Dopri8(), rtol=1e-13, atol=1e-15)
    return loss, u0, ref.theta_final


@pytest.mark.parametrize(
    "solver, steps",
    [
        (dfx.Euler(), [64, 128, 256, 512]),
        (dfx.Heun(), [16, 32, 64, 128]),
        (dfx.Bosh3(), [8, 16, 32, 64]),
        (dfx.Tsit5(), [8, 12, 16, 24]),
    ],
)
def test_layer_flow_converges_at_solver_order(order_problem, solver, steps):
    loss, u0, exact = order_problem
    errors = []
    for n in steps:
        tr = dj.simulate(loss, u0, t1=1.0, ts=jnp.array([1.0]), formulation="layer",
                         solver=solver, stepsize_controller=dfx.ConstantStepSize(), dt0=1.0 / n)
        errors.append(float(jnp.max(jnp.abs(tr.theta_final - exact))))
    slope = np.polyfit(np.log(1.0 / np.array(steps)), np.log(errors), 1)[0]
    order = solver.order(dfx.ODETerm(lambda t, y, a: y))
    assert abs(slope - order) <= 0.3, (errors, slope, order)
