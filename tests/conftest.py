import os
import tempfile

# Compiled programs are reused across test processes (the sweep tests start subprocesses that
# compile what the suite compiled already): JIT compilation dominates the suite's time.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "ddln_jax_jit_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import jax  # noqa: E402

# Tolerances of 1e-8 and below need float64 (DESIGN.md). Tests opt in here, never the library.
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

import ddln_jax as dj  # noqa: E402


@pytest.fixture(scope="session")
def lsq_problem():
    """Least squares n = 10, d = 30 whose solution has both signs (so θ changes sign)."""
    kx, _ = jax.random.split(jax.random.PRNGKey(42))
    n, d = 10, 30
    X = jax.random.normal(kx, (n, d))
    theta_star = jnp.zeros(d).at[:4].set(jnp.array([1.5, -2.0, 1.0, -1.2]))
    return dj.LeastSquares(X, X @ theta_star)


@pytest.fixture(scope="session")
def logistic_problem():
    kx, kt = jax.random.split(jax.random.PRNGKey(7))
    n, d = 10, 30
    X = jax.random.normal(kx, (n, d))
    w = jnp.zeros(d).at[:4].set(jnp.array([2.0, -2.0, 1.5, -1.0]))
    return dj.Logistic(X, jnp.sign(X @ w))
