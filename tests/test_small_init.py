"""Small initializations (docs/math.md, "Small initializations and escape times"):
Φ(∞), the escape from the saddle at 0, and the scalar problem's hitting time, held to closed
forms, an independent ODE solver and exact simulations."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    NT,
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
from scipy.integrate import quad, solve_ivp

import ddln_jax as dj
from ddln_jax import (
    measure_escape_time,
    phi_inf,
    phi_inf_constant,
    predict_escape_time,
    scalar_hitting_time,
)


def test_phi_inf_and_c_L():
    """Φ(∞) = c_L α^{−(L−2)} for the zero-first init (1e-13), c_L against closed values and a
    quadrature of ∫(1 + r²)^{−(L−1)/2}; +inf for L = 2. Under jit and vmap Φ(∞) is the eager
    value (1e-14); its gradient in the layers matches finite differences (1e-6), and along the
    zero-first ray gives the closed form d/dα Σ_i c_3/α = −d·c_3/α² (1e-10)."""
    for L, value in [(3, math.pi / 2), (4, 1.0), (5, math.pi / 4), (6, 2 / 3)]:
        assert math.isclose(phi_inf_constant(L), value, rel_tol=1e-14)
        ref = quad(lambda r: (1 + r * r) ** (-(L - 1) / 2), 0, np.inf, epsabs=0, epsrel=1e-13)[0]
        assert math.isclose(phi_inf_constant(L), ref, rel_tol=1e-11)
        for alpha in [0.3, 0.01]:
            np.testing.assert_allclose(phi_inf(dj.zero_first_init(L, 3, alpha)),
                                       value * alpha ** (2 - L), rtol=1e-13)
    assert np.all(np.isinf(phi_inf(dj.zero_first_init(2, 3, 0.1))))

    # One shape, (3, 3), for every compiled variant.
    u = jnp.stack([jnp.asarray(dj.gaussian_init(k, 3, 3, 0.5)) for k in jax.random.split(jax.random.PRNGKey(3), 3)])
    eager = np.stack([np.asarray(phi_inf(ui)) for ui in u])
    np.testing.assert_allclose(jax.jit(jax.vmap(phi_inf))(u), eager, rtol=1e-14)
    total = lambda v: jnp.sum(phi_inf(v))
    grad = jax.jit(jax.grad(total))
    check_grad_fd(total, u[0], grad=grad)
    # d/dα along the zero-first ray α·(0, 1, 1): the layer gradient dotted with the direction.
    ray = np.asarray(dj.zero_first_init(3, 3, 1.0))
    dalpha = float(jnp.sum(grad(0.3 * ray) * ray))
    np.testing.assert_allclose(dalpha, -3 * math.pi / 2 * 0.3**-2, rtol=1e-10)


# Save grids around the predicted escapes: 0, then 50 saves in [lo, hi]·T around each of the
# four predicted times.
def _escape_grid(times, lo=0.9, hi=1.05):
    grid = np.concatenate([[0.0], *[np.linspace(lo * t, hi * t, 50) for t in times]])
    grid = np.sort(grid)
    grid[1:] += np.arange(1, NT) * 1e-9 * grid[-1]  # separates coincident saves, if any
    return grid


@pytest.mark.parametrize("L", [3, 4])
def test_escape_time_from_the_saddle(L):
    """Zero-first and three random inits at α = 0.01 and 0.004: the first time ‖θ − θ0‖∞
    reaches 0.1 is within 5% of `predict_escape_time`; for the zero-first init it is
    c_L α^{−(L−2)}/‖∇f(0)‖∞ (1e-12) and its error shrinks as α does; for random inits the
    correction by ∇Q(θ0) is needed (without it the error exceeds 5% in some run). The
    prediction under jit and vmap equals the eager one (1e-13)."""
    X, y, _ = problem(2)
    loss = dj.LeastSquares(X, y)
    errors = {}
    for alpha in [0.01, 0.004]:
        keys = jax.random.split(jax.random.PRNGKey(L), 3)
        u0 = np.stack([np.asarray(dj.zero_first_init(L, D, alpha))]
                      + [np.asarray(dj.gaussian_init(k, L, D, alpha)) for k in keys])
        pred = [predict_escape_time(loss, u) for u in u0]
        times = np.array([float(p.first) for p in pred])
        tr = run(loss, u0, _escape_grid(times), rtol=1e-10)
        measured = np.asarray(measure_escape_time(tr, 0.1))
        rel = measured / times - 1
        assert np.all(np.abs(rel) <= 0.05), (alpha, rel)
        errors[alpha] = rel
        g0 = np.abs(np.asarray(loss.grad(jnp.zeros(D))))
        np.testing.assert_allclose(times[0], phi_inf_constant(L) * alpha ** (2 - L) / g0.max(), rtol=1e-12)
        # The first notes' formula Φ_i(∞)/|∂_i f(θ0)|, without the ∇Q(θ0) term, on the random inits.
        naive = [float(np.min(np.asarray(phi_inf(u)) / np.abs(np.asarray(loss.grad(jnp.prod(u, 0)))))) for u in u0[1:]]
        errors[("naive", alpha)] = measured[1:] / np.array(naive) - 1
        if alpha == 0.01:
            batched = jax.jit(jax.vmap(predict_escape_time, (None, 0)))(loss, jnp.asarray(u0))
            stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *pred)
            assert tree_allclose(batched, stacked, rtol=1e-13, atol=0)
    if L == 3:  # O(α^{L−2}); for L = 4 both errors are already at the 1e-4 level of the grid
        assert abs(errors[0.004][0]) < abs(errors[0.01][0])
    assert max(np.max(np.abs(errors[("naive", a)])) for a in [0.01, 0.004]) > 0.05


def test_escape_prediction_and_measurement_gradients():
    """The gradient of a random init's first escape time in its layers and the data X against
    finite differences (1e-6); along the zero-first ray, d/dα of c_3/(α‖∇f(0)‖∞) is −1/α
    times it (1e-10). `measure_escape_time` under jit and vmap equals the eager value
    (1e-14), and its derivative in the threshold is that of the log-linear interpolation
    between the bracketing saves, (t₁ − t₀)/(threshold·log(d₁/d₀)) (1e-10)."""
    X, y, _ = problem(2)
    first = lambda args: predict_escape_time(dj.LeastSquares(args[1], y), args[0]).first
    grad = jax.jit(jax.grad(first))
    u = jnp.asarray(dj.gaussian_init(jax.random.PRNGKey(5), 3, D, 0.01))
    check_grad_fd(first, (u, jnp.asarray(X)), grad=grad)
    # d/dα along the zero-first ray α·(0, 1, 1): the layer gradient dotted with the direction.
    ray = np.asarray(dj.zero_first_init(3, D, 1.0))
    g_u, _ = grad((0.01 * ray, jnp.asarray(X)))
    np.testing.assert_allclose(float(jnp.sum(g_u * ray)), -first((0.01 * ray, X)) / 0.01, rtol=1e-10)

    tr = long_runs(3)[0][4]
    eager = measure_escape_time(tr, 0.5)
    np.testing.assert_allclose(jax.jit(measure_escape_time)(tr, 0.5), eager, rtol=1e-14)
    np.testing.assert_allclose(jax.jit(jax.vmap(measure_escape_time, (0, None)))(vmappable(tr), 0.5), eager, rtol=1e-14)
    one = tr[0]
    dev = np.max(np.abs(np.asarray(one.theta) - np.asarray(one.theta[0])), axis=-1)
    k = int(np.argmax(dev >= 0.5))
    ts = np.asarray(one.ts)
    slope = (ts[k] - ts[k - 1]) / (0.5 * math.log(dev[k] / dev[k - 1]))
    np.testing.assert_allclose(jax.grad(measure_escape_time, 1)(one, 0.5), slope, rtol=1e-10)


def test_escape_time_depth_two_is_logarithmic():
    """L = 2, zero-first: the prediction is log(1/α)/‖∇f(0)‖∞ (1e-12) and the measured escape
    (‖θ‖∞ = 0.1) approaches it only at rate 1/log(1/α): the relative error times log(1/α) is
    the same constant (within 2%) for α = 1e-2 … 1e-16, near ½·log(1/(4·0.1)) = 0.46, the
    θ_i ≈ (α²/4)e^{2η_i} correction for the threshold 0.1."""
    X, y, _ = problem(2)
    loss = dj.LeastSquares(X, y)
    alphas = [1e-2, 1e-4, 1e-8, 1e-16]
    u0 = np.stack([np.asarray(dj.zero_first_init(2, D, a)) for a in alphas])
    g0 = np.abs(np.asarray(loss.grad(jnp.zeros(D)))).max()
    times = np.array([float(predict_escape_time(loss, u).first) for u in u0])
    np.testing.assert_allclose(times, np.log(1 / np.array(alphas)) / g0, rtol=1e-12)
    # w starts at 0 and grows from the scale α: atol must be below it.
    tr = run(loss, u0, _escape_grid(times, 0.5, 1.2), rtol=1e-10, atol=1e-14 * min(alphas))
    rel = np.abs(np.asarray(measure_escape_time(tr, 0.1)) / times - 1)
    assert np.all(np.diff(rel) < 0)
    scaled = rel * np.log(1 / np.array(alphas))
    assert np.ptp(scaled) <= 0.02 * np.mean(scaled) and 0.3 < np.mean(scaled) < 0.6, scaled


def _layer_ode_time(u0, target=0.5):
    """Independent check: the layer ODE for f = ½(θ − 1)² in NumPy, DOP853 with an event."""

    def rhs(t, u):
        return np.array([np.prod(np.delete(u, j)) for j in range(len(u))]) * (1 - np.prod(u))

    event = lambda t, u: np.prod(u) - target
    event.terminal = True
    sol = solve_ivp(rhs, (0, 1e9), np.array(u0, float), method="DOP853", rtol=1e-13,
                    atol=1e-16, events=event)
    return float(sol.t_events[0][0])


def test_scalar_hitting_time():
    """Time for θ to reach ½ on f = ½(θ − 1)², by quadrature, against: closed forms (L = 1,
    L = 2 balanced; 1e-13), an independent DOP853 integration of the layer ODE (L = 2…5,
    zero-first and balanced, α ∈ {0.5, 0.1}; 1e-10), `simulate` (L = 3; θ(T) = ½ to 1e-9), and
    the small-α asymptotics T ≈ c_L α^{−(L−2)} (zero-first), α^{−(L−2)}/(L−2) (balanced)."""
    np.testing.assert_allclose(scalar_hitting_time(np.array([0.2])), math.log(0.8 / 0.5), rtol=1e-14)
    F = lambda w: math.log(w) - 0.5 * math.log(1 - w * w)
    np.testing.assert_allclose(scalar_hitting_time(np.full(2, 0.1)), F(math.sqrt(0.5)) - F(0.1), rtol=1e-13)
    for L in [2, 3, 4, 5]:
        for alpha in [0.5, 0.1]:
            for u in [np.asarray(dj.zero_first_init(L, 1, alpha))[:, 0], np.full(L, alpha)]:
                if np.prod(u) >= 0.5:
                    continue
                np.testing.assert_allclose(scalar_hitting_time(u), _layer_ode_time(u), rtol=1e-10)
        if L >= 3:
            a = 1e-3
            zf = float(scalar_hitting_time(np.asarray(dj.zero_first_init(L, 1, a))[:, 0]))
            bal = float(scalar_hitting_time(np.full(L, a)))
            assert abs(zf * a ** (L - 2) / phi_inf_constant(L) - 1) <= 0.01
            assert abs(bal * a ** (L - 2) * (L - 2) - 1) <= 0.01
    # Against simulate: the scalar problem is coordinate 0 of a d = 15 least squares
    # (f = (1/12)(√6 θ0 − √6)²), so it shares the theory tests' compiled program.
    X = np.zeros((N, D))
    X[0, 0] = math.sqrt(N)
    yv = np.zeros(N)
    yv[0] = math.sqrt(N)
    inits = [dj.zero_first_init(3, 1, 0.1), dj.zero_first_init(3, 1, 0.3),
             jnp.full((3, 1), 0.1), jnp.full((3, 1), 0.3)]
    T = np.array([float(scalar_hitting_time(u)) for u in inits])
    u0 = np.stack([np.concatenate([np.asarray(u), np.full((3, D - 1), 0.5)], axis=1) for u in inits])
    ts = np.sort(np.concatenate([np.linspace(0.0, 1.2 * T.max(), NT - 4), T]))
    tr = run(dj.LeastSquares(X, yv), u0, ts, rtol=1e-12)
    at = [float(tr.theta[k, np.searchsorted(ts, T[k]), 0]) for k in range(B)]
    np.testing.assert_allclose(at, 0.5, rtol=1e-9)


def test_scalar_hitting_time_under_jit_vmap_grad():
    """Under jit and vmap the eager values (1e-14); ∂T/∂(target) = 1/θ̇ at the target =
    1/(g(target)(1 − target)) with g the metric of `Geometry` (1e-10), for a gapped and a tied
    init; the gradient in the layers against finite differences (1e-6)."""
    batch = jnp.array([[0.0, 0.1, 0.1], [0.1, 0.1, 0.1], [0.05, 0.2, 0.3]])
    np.testing.assert_allclose(jax.jit(jax.vmap(scalar_hitting_time))(batch),
                               [scalar_hitting_time(b) for b in np.asarray(batch)], rtol=1e-14)
    grad = jax.jit(jax.grad(lambda args: scalar_hitting_time(*args)))
    for u in batch[1:]:
        g = dj.Geometry(u[:, None], require_assumption_a=False).metric(jnp.array([0.4]))[0]
        np.testing.assert_allclose(grad((u, 0.4))[1], 1 / (g * 0.6), rtol=1e-10)
    check_grad_fd(lambda args: scalar_hitting_time(*args), (batch[2], 0.4), grad=grad)


def test_bad_input_is_refused():
    X, y, _ = problem(0)
    loss = dj.LeastSquares(X, y)
    with pytest.raises(ValueError, match=r"L = 1 is plain gradient flow"):
        predict_escape_time(loss, np.ones((1, D)))
    with pytest.raises(ValueError, match=r"`u0` violates Assumption A"):
        predict_escape_time(loss, dj.balanced_init(3, D, 0.01))
    with pytest.raises(ValueError, match=r"`u0` violates Assumption A"):
        phi_inf(dj.balanced_init(3, D, 0.01))
    with pytest.raises(RuntimeError, match=r"`u0` violates Assumption A"):  # traced: error_if
        eqx.filter_jit(phi_inf)(dj.balanced_init(3, D, 0.01))
    with pytest.raises(ValueError, match=r"`L` must be ≥ 3"):
        phi_inf_constant(2)
    with pytest.raises(TypeError, match=r"`L` must be an integer"):
        phi_inf_constant(3.0)
    with pytest.raises(ValueError, match=r"`target` must lie in \(θ0, 1\)"):
        scalar_hitting_time(np.full(3, 0.1), target=1.5)
    with pytest.raises(ValueError, match=r"`u0` must have shape \(L,\) or \(L, 1\)"):
        scalar_hitting_time(np.full((3, 2), 0.1))
    with pytest.raises(ValueError, match=r"`threshold` must be finite and > 0"):
        measure_escape_time(run(loss, band_inits(2, 0), np.linspace(0.0, 1.0, NT)), -1.0)
    # A tie at θ0 = 0 never leaves the saddle: +inf, not a number.
    assert np.isinf(scalar_hitting_time(np.zeros(3)))
