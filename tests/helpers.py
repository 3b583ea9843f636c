"""Shared test helpers: tree comparisons (after diffrax's test/helpers.py), finite
differences, and the one simulation workload of the theory tests."""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8, equal_nan=False):
    """Same tree structure and every leaf allclose (NaN equal to NaN when `equal_nan`)."""
    same = jax.tree_util.tree_structure(x) == jax.tree_util.tree_structure(y)
    return same and all(
        np.allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol, equal_nan=equal_nan)
        for a, b in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y))
    )


def max_rel_err(a, b, axis=-1):
    """max over rows of ‖a − b‖ / ‖b‖ along `axis`."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    return float(jnp.max(jnp.linalg.norm(a - b, axis=axis) / jnp.linalg.norm(b, axis=axis)))


def geometry_with_gaps(deltas, d):
    """A Geometry whose every coordinate has smallest layer 0 and gaps exactly `deltas`."""
    import ddln_jax as dj

    deltas = np.asarray(deltas, dtype=np.float64)
    u0 = np.zeros((len(deltas) + 1, d))
    u0[1:] = np.sqrt(deltas)[:, None]
    return dj.Geometry(u0)


def vmappable(traj):
    """A batch of runs without its batch-level `stats` (scalars that `jax.vmap` cannot split
    along the batch axis), ready for `jax.vmap(f)(traj)`."""
    import equinox as eqx

    return eqx.tree_at(lambda t: t.stats, traj, {}) if getattr(traj, "stats", None) else traj


def check_grad_fd(f, x, *, grad=None, rel=1e-6, step=1e-6, seed=0):
    """The gradient of the scalar function `f` at `x` (an array or a tuple of arrays) against
    a central finite difference along a random direction v (step `step`·max(‖x‖∞, 1) per
    leaf): |⟨∇f, v⟩ − FD| ≤ `rel`·|FD|. `grad` is ∇f (default `jax.grad(f)`; pass a jitted
    one to reuse its compilation). Returns ∇f(x)."""
    x = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), x)
    leaves, tree = jax.tree_util.tree_flatten(x)
    rng = np.random.default_rng(seed)
    v = [jnp.asarray(h * rng.standard_normal(a.shape)) for a in leaves
         for h in [step * max(float(jnp.max(jnp.abs(a))), 1.0)]]
    shift = lambda s: jax.tree_util.tree_unflatten(tree, [a + s * va for a, va in zip(leaves, v)])
    fd = (float(f(shift(1.0))) - float(f(shift(-1.0)))) / 2
    g = (jax.grad(f) if grad is None else grad)(x)
    ad = float(sum(jnp.sum(ga * va) for ga, va in zip(jax.tree_util.tree_leaves(g), v)))
    assert np.isfinite(ad) and abs(ad - fd) <= rel * abs(fd), (ad, fd)
    return g


# ---------------------------------------------------------------------------------------------
# The theory tests' workload: one `simulate` configuration (reduced flow, no extra saves, B = 4
# inits, NT = 201 save times, one step budget) on problems with d = 15, so each depth compiles
# once for all theory test modules; rtol, t1 and the save times are traced and vary freely.

N, D, B, NT = 6, 15, 4, 201
ALPHAS = (0.7, 0.85, 1.0, 1.2)  # scales of the band inits
T_LONG = 800.0
N_PROBLEMS = 3  # × B inits = 12 (problem, init) pairs per depth
# Log-spaced saves: the fastest runs reach the rounding floor of f − f* within t ≈ 5, the
# slowest need t ≈ 600.
TS_LONG = np.concatenate([[0.0], np.geomspace(0.02, T_LONG, NT - 1)])


def run(loss, u0, ts, rtol=1e-12, atol=None):
    """The one simulate configuration of the theory tests (atol: w starts at the scale of the
    init, so small-α runs pass one below it)."""
    import ddln_jax as dj

    ts = np.asarray(ts, np.float64)
    assert ts.shape == (NT,) and np.all(np.diff(ts) > 0)
    atol = rtol * 1e-2 if atol is None else atol
    return dj.simulate(loss, u0, t1=float(ts[-1]), ts=ts, rtol=rtol, atol=atol, max_steps=200_000)


def problem(seed):
    """Least squares n = 6 < d = 15 with a planted 3-sparse solution: (X, y, θ*)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, D))
    theta = np.zeros(D)
    theta[rng.choice(D, 3, replace=False)] = 1.5 * rng.normal(size=3)
    return X, X @ theta, theta


def band_inits(L, seed):
    """B inits α·u with |u^j_i| in disjoint bands around 1 (shuffled over layers, random signs).

    The bands keep every gap δ away from 0, so c0 is not negligible and the PL bound is not
    vacuous; the random signs make θ change sign along the flow.
    """
    rng = np.random.default_rng(1000 + seed)
    centers = np.exp(np.linspace(-0.4, 0.4, L)) if L > 1 else np.ones(1)
    mags = centers[:, None] * (1 + 0.1 * (rng.random((L, D)) - 0.5))
    mags = np.take_along_axis(mags, np.argsort(rng.random((L, D)), axis=0), axis=0)
    signs = rng.choice([-1.0, 1.0], size=(L, D))
    return np.stack([a * signs * mags for a in ALPHAS])


@functools.cache
def long_runs(L):
    """N_PROBLEMS (problem, B inits) run to convergence, with their implicit-bias limits:
    [(X, y, θ*, u0 (B, L, d), Trajectory, ImplicitBias)] (cached for the whole session)."""
    import ddln_jax as dj

    out = []
    for p in range(N_PROBLEMS):
        X, y, theta = problem(p)
        u0 = band_inits(L, p)
        tr = run(dj.LeastSquares(X, y), u0, TS_LONG)
        assert list(tr.status_name) == ["success"] * B
        out.append((X, y, theta, u0, tr, dj.implicit_bias_limit(X, y, u0)))
    return out
