import gc
import os

# No persistent compilation cache: on the CPU backend, loading XLA executables that other
# processes wrote has aborted the interpreter (CI, and pytest-xdist workers sharing a cache).
# Implicit rank promotion is an error, in this process and in the CLI processes tests start:
# the library broadcasts explicitly, so a user who sets "raise" can use it.
os.environ["JAX_NUMPY_RANK_PROMOTION"] = "raise"

import jax  # noqa: E402

# Tolerances of 1e-8 and below need float64 (DESIGN.md). Tests opt in here, never the library.
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

import ddln_jax as dj  # noqa: E402


@pytest.fixture(autouse=True)
def _release_compiled_code():
    """Drop the compiled programs a worker holds when they near the kernel's mapping limit.

    Every XLA CPU executable holds memory mappings; a pytest worker that keeps the thousands it
    compiles over the suite approaches the kernel's limit (vm.max_map_count, 65530), where XLA
    crashes inside a later compile (seen: a segfault in backend_compile_and_load). Past a
    threshold, after a test, the caches are cleared (programs are recompiled if used again).
    """
    yield
    if _map_count() > _MAPS_BEFORE_RELEASE:
        jax.clear_caches()
        gc.collect()


# One test adds at most a few thousand mappings (a whole module ~12k); the count is read in a
# few ms, and the threshold is rarely crossed, so programs are shared across tests as before.
_MAPS_BEFORE_RELEASE = 30_000


def _map_count() -> int:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux: no such limit to watch
        return 0


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
