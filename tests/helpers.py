"""Tree comparisons for tests (after diffrax's test/helpers.py)."""

import jax
import jax.numpy as jnp
import numpy as np


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8, equal_nan=False):
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
