"""Every public numerical function composes with jax.jit, jax.vmap and jax.grad.

Gradients are held to central finite differences (≤ 1e-6 relative); jitted and vmapped calls to
the eager ones (≤ 1e-12); `simulate` on the engine and vmapped returns the same tree.
"""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tree_allclose

import ddln_jax as dj

KEY = jax.random.PRNGKey(11)
N, D, L = 5, 8, 3
T1 = 4.0
TOL = dict(rtol=1e-12, atol=1e-14)


def _central(f, x, h):
    return (f(x + h) - f(x - h)) / (2 * h)


@pytest.fixture(scope="module")
def data():
    kx, kt = jax.random.split(KEY)
    X = jax.random.normal(kx, (N, D))
    y = X @ jnp.zeros(D).at[:2].set(jnp.array([1.0, -1.5]))
    return X, y


@pytest.fixture(scope="module")
def final_loss(data):
    """α ↦ f(θ(T)) from a Gaussian init direction of scale α, one compiled program."""
    X, y = data
    v = jax.random.normal(jax.random.PRNGKey(3), (L, D))

    @jax.jit
    def f(alpha, X):
        return dj.simulate(dj.LeastSquares(X, y), alpha * v, t1=T1, **TOL).loss_final

    return f


def test_simulate_under_jit_matches_eager(data):
    X, y = data
    u0 = dj.gaussian_init(KEY, L, D, 0.7)
    eager = dj.simulate(dj.LeastSquares(X, y), u0, t1=T1)
    jitted = eqx.filter_jit(lambda loss, u: dj.simulate(loss, u, t1=T1))(dj.LeastSquares(X, y), u0)
    assert tree_allclose(eager, jitted, rtol=1e-12, atol=1e-14)
    # A loss that is a user's eqx.Module with arrays stays a pytree (traced, not static).
    class Quadratic(eqx.Module):
        A: jax.Array

        def __call__(self, th):
            return 0.5 * jnp.sum((self.A * th - 1.0) ** 2)

    quad = Quadratic(jnp.linspace(0.5, 1.5, D))
    tr = eqx.filter_jit(lambda q: dj.simulate(q, u0, t1=T1))(quad)
    ref = dj.simulate(lambda th: quad(th), u0, t1=T1)
    np.testing.assert_allclose(tr.theta_final, ref.theta_final, rtol=1e-12)


def test_simulate_gradients_against_finite_differences(data, final_loss):
    """d f(θ(T))/dα and d f(θ(T))/dX: reverse mode through diffrax's checkpointed adjoint."""
    X, _ = data
    alpha = 0.6
    g = jax.grad(final_loss)(alpha, X)
    fd = _central(lambda a: final_loss(a, X), alpha, 1e-4)
    assert abs(g - fd) <= 1e-6 * abs(fd)
    gX = jax.grad(final_loss, argnums=1)(alpha, X)
    E = jax.random.normal(jax.random.PRNGKey(5), X.shape)
    fdX = _central(lambda s: final_loss(alpha, X + s * E), 0.0, 1e-5)
    assert abs(jnp.sum(gX * E) - fdX) <= 1e-6 * abs(fdX)


def test_simulate_vmap_over_alpha_equals_a_batch(data, final_loss):
    X, _ = data
    alphas = jnp.array([0.4, 0.7, 1.0])
    vm = jax.vmap(final_loss, in_axes=(0, None))(alphas, X)
    one = jnp.array([final_loss(a, X) for a in alphas])
    np.testing.assert_allclose(vm, one, rtol=1e-12)


def test_engine_and_vmap_return_the_same_tree(data):
    X, y = data
    loss = dj.LeastSquares(X, y)
    U = jnp.stack([dj.gaussian_init(k, L, D, a) for k, a in
                   zip(jax.random.split(KEY, 5), [0.3, 0.5, 0.7, 0.9, 1.1])])
    ts = jnp.linspace(0.0, T1, 7)
    a = dj.simulate(loss, U, t1=T1, ts=ts, stop_ratio=1e-3, rtol=1e-10, atol=1e-12)
    b = dj.simulate(loss, U, t1=T1, ts=ts, stop_ratio=1e-3, rtol=1e-10, atol=1e-12, lanes=2)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, z in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.shape == z.shape and x.dtype == z.dtype
    np.testing.assert_array_equal(a.status_name, b.status_name)
    np.testing.assert_allclose(a.theta_final, b.theta_final, rtol=1e-8)
    np.testing.assert_allclose(a.t_final, b.t_final, rtol=1e-8)
    # traj[k] is run k, on both.
    one = dj.simulate(loss, U[3], t1=T1, ts=ts, stop_ratio=1e-3, rtol=1e-10, atol=1e-12)
    drop = lambda t: eqx.tree_at(lambda t: t.stats, t, {})
    assert tree_allclose(drop(a[3]), drop(one), rtol=1e-12, atol=0, equal_nan=True)
    # A vmapped batch steps every run until the slowest ends: its efficiency is Σ steps / (B max).
    steps = np.asarray(a.num_steps, float)
    np.testing.assert_allclose(a.stats["lane_efficiency"], steps.sum() / (5 * steps.max()))
    # A batch is a pytree whose leaves all carry the batch axis: it vmaps as an input.
    finals = jax.vmap(lambda t: t.theta_final)(b)
    np.testing.assert_array_equal(finals, b.theta_final)


def test_engine_saves_do_not_spend_the_step_budget(data):
    """Many save times (each a clipped step on the engine) with a budget the run itself fits in."""
    X, y = data
    loss = dj.LeastSquares(X, y)
    u0 = dj.gaussian_init(KEY, L, D, 0.8)[None]
    free = dj.simulate(loss, u0, t1=T1, ts=jnp.linspace(0, T1, 3), lanes=1)
    budget = int(free.num_steps[0]) + 5
    many = dj.simulate(loss, u0, t1=T1, ts=jnp.linspace(0, T1, 4 * budget), lanes=1,
                       max_steps=budget)
    assert many.status_name[0] == "success"
    np.testing.assert_allclose(many.theta_final, free.theta_final, rtol=1e-6)


def test_implicit_solver_through_simulate(data):
    """An implicit diffrax solver works through the non-finite guard and gets its tolerances."""
    X, y = data
    loss = dj.LeastSquares(X, y)
    u0 = dj.gaussian_init(KEY, L, D, 0.7)
    ref = dj.simulate(loss, u0, t1=T1, **TOL)
    tr = dj.simulate(loss, u0, t1=T1, solver=dfx.Kvaerno5(), rtol=1e-10, atol=1e-12)
    assert tr.status_name == "success"
    assert float(jnp.linalg.norm(tr.theta_final - ref.theta_final)) <= 1e-7 * float(
        jnp.linalg.norm(ref.theta_final))


def test_inits_under_jit_vmap_and_grad():
    alphas = jnp.array([0.1, 0.5, 2.0])
    for make in (lambda a: dj.gaussian_init(KEY, L, D, a), lambda a: dj.zero_first_init(L, D, a),
                 lambda a: dj.balanced_init(L, D, a)):
        vm = jax.vmap(make)(alphas)
        np.testing.assert_allclose(vm, jnp.stack([make(float(a)) for a in alphas]), rtol=1e-15)
        np.testing.assert_allclose(jax.jit(make)(0.5), make(0.5), rtol=1e-15)
        # θ0 = ∏ u^j is homogeneous of degree L in α: d‖θ0‖²/dα = 2L‖θ0‖²/α.
        sq = lambda a: jnp.sum(jnp.prod(make(a), axis=0) ** 2)
        np.testing.assert_allclose(jax.grad(sq)(0.5), 2 * L * sq(0.5) / 0.5, rtol=1e-12, atol=1e-300)
    with pytest.raises(Exception, match="`alpha` must be finite and > 0"):
        jax.jit(lambda a: dj.gaussian_init(KEY, L, D, a))(-1.0).block_until_ready()


@pytest.mark.parametrize("make", ["lsq", "logistic"])
def test_losses_under_jit_vmap_and_grad(data, make):
    X, y = data
    cls = dj.LeastSquares if make == "lsq" else dj.Logistic
    y = y if make == "lsq" else jnp.sign(y + 1e-3)
    th = jax.random.normal(jax.random.PRNGKey(8), (D,))
    f = lambda X_, t: cls(X_, y)(t)
    # ∇f against FD, and the closed-form gradient against autodiff.
    e = jax.random.normal(jax.random.PRNGKey(9), (D,))
    fd = _central(lambda s: f(X, th + s * e), 0.0, 1e-5)
    assert abs(jnp.dot(cls(X, y).grad(th), e) - fd) <= 1e-6 * abs(fd)
    np.testing.assert_allclose(cls(X, y).grad(th), jax.grad(lambda t: f(X, t))(th), rtol=1e-12)
    # Through the data, jitted and vmapped over a batch of designs.
    gX = jax.jit(jax.grad(f))(X, th)
    E = jax.random.normal(jax.random.PRNGKey(10), X.shape)
    fdX = _central(lambda s: f(X + s * E, th), 0.0, 1e-5)
    assert abs(jnp.sum(gX * E) - fdX) <= 1e-6 * abs(fdX)
    Xs = jnp.stack([X, 2 * X])
    np.testing.assert_allclose(jax.vmap(f, (0, None))(Xs, th), jnp.array([f(X, th), f(2 * X, th)]),
                               rtol=1e-14)


def test_geometry_under_jit_vmap_and_grad():
    U = jnp.stack([dj.gaussian_init(k, 4, D, 0.8) for k in jax.random.split(KEY, 3)])
    th = jnp.linspace(-1.0, 1.0, D)

    def grad_Q(u, t):
        return dj.Geometry(u).grad_Q(t)

    vm = jax.jit(jax.vmap(grad_Q, (0, None)))(U, th)
    np.testing.assert_allclose(vm, jnp.stack([grad_Q(u, th) for u in U]), rtol=1e-13)
    # ∇Q is the gradient of Q, and dQ/du0 (through the implicit inverses) matches FD.
    Qsum = lambda u, t: dj.Geometry(u).Q(t)
    np.testing.assert_allclose(jax.grad(Qsum, argnums=1)(U[0], th), grad_Q(U[0], th), rtol=1e-10)
    E = jax.random.normal(jax.random.PRNGKey(12), U[0].shape)
    g = jnp.sum(jax.grad(Qsum)(U[0], th) * E)
    fd = _central(lambda s: Qsum(U[0] + s * E, th), 0.0, 1e-6)
    assert abs(g - fd) <= 1e-6 * abs(fd)


def test_traced_bad_input_raises_inside_the_program(data):
    """Checks that need values become runtime errors when the values are traced."""
    X, y = data
    loss = dj.LeastSquares(X, y)
    u0 = dj.gaussian_init(KEY, L, D, 0.7)
    run = jax.jit(lambda t1: dj.simulate(loss, u0, t1=t1).loss_final)
    assert np.isfinite(run(1.0))
    with pytest.raises(Exception, match="`t1` must be finite and > 0"):
        run(-1.0).block_until_ready()
    with pytest.raises(Exception, match="`ts` must be increasing"):
        jax.jit(lambda ts: dj.simulate(loss, u0, t1=1.0, ts=ts).loss_final)(
            jnp.array([0.0, 0.5, 0.2])).block_until_ready()
