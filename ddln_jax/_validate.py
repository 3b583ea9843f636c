"""Input checks at the public boundary.

Everything here runs eagerly on concrete values, before anything is traced or
compiled, and raises `ValueError`/`TypeError` naming the argument and the value.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np


def _short(value) -> str:
    """A short description of a value for error messages."""
    if isinstance(value, (np.ndarray, jax.Array)):
        return f"array of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def as_float_array(name: str, value, *, ndim: int | tuple[int, ...] | None = None) -> jax.Array:
    """Convert to a floating JAX array, checking type, rank and finiteness."""
    if isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"`{name}` must be an array of real numbers, got {_short(value)}")
    try:
        arr = np.asarray(value) if not isinstance(value, jax.Array) else value
    except Exception as e:  # pragma: no cover - exotic objects
        raise TypeError(f"`{name}` must be an array of real numbers, got {_short(value)}") from e
    if arr.dtype == object or not (
        jnp.issubdtype(arr.dtype, jnp.floating)
        or jnp.issubdtype(arr.dtype, jnp.integer)
        or jnp.issubdtype(arr.dtype, jnp.bool_)
    ):
        raise TypeError(
            f"`{name}` must be an array of real numbers, got dtype {arr.dtype} ({_short(value)})"
        )
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if arr.ndim not in allowed:
            raise ValueError(
                f"`{name}` must have {' or '.join(map(str, allowed))} dimension(s), "
                f"got shape {tuple(arr.shape)}"
            )
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        arr = arr.astype(jnp.result_type(float))
    out = jnp.asarray(arr)
    if not is_tracer(out) and not bool(jnp.all(jnp.isfinite(out))):
        bad = np.argwhere(~np.isfinite(np.asarray(out)))
        raise ValueError(
            f"`{name}` must be finite, but it has {len(bad)} non-finite entries "
            f"(first at index {tuple(int(i) for i in bad[0])})"
        )
    return out


def positive_scalar(name: str, value, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.ndarray, jax.Array)):
        raise TypeError(f"`{name}` must be a real number, got {_short(value)}")
    if isinstance(value, (np.ndarray, jax.Array)):
        if np.ndim(value) != 0:
            raise ValueError(f"`{name}` must be a scalar, got shape {np.shape(value)}")
        value = float(value)
    value = float(value)
    if not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        cond = "≥ 0" if allow_zero else "> 0"
        raise ValueError(f"`{name}` must be finite and {cond}, got {value!r}")
    return value


def positive_int(name: str, value, *, minimum: int = 1, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"`{name}` must be an integer, got {_short(value)}")
    if int(value) < minimum:
        raise ValueError(f"`{name}` must be an integer ≥ {minimum}, got {int(value)}")
    if maximum is not None and int(value) > maximum:
        raise ValueError(f"`{name}` must be an integer ≤ {maximum}, got {int(value)}")
    return int(value)


def check_tolerance(name: str, value: float, dtype) -> None:
    """Refuse a relative tolerance the working precision cannot deliver."""
    eps = float(jnp.finfo(dtype).eps)
    if value < 10 * eps:
        hint = (
            " Enable float64 with `jax.config.update('jax_enable_x64', True)` and pass "
            "float64 arrays."
            if jnp.dtype(dtype).itemsize < 8
            else ""
        )
        raise ValueError(
            f"`{name}`={value:g} is below what {jnp.dtype(dtype).name} can deliver "
            f"(10·eps = {10 * eps:.2g}).{hint}"
        )
