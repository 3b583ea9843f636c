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
    # NumPy for the check: inside a trace even jnp ops on concrete arrays give tracers.
    if not is_tracer(arr) and not np.all(np.isfinite(np.asarray(arr))):
        bad = np.argwhere(~np.isfinite(np.asarray(arr)))
        raise ValueError(
            f"`{name}` must be finite, but it has {len(bad)} non-finite entries "
            f"(first at index {tuple(int(i) for i in bad[0])})"
        )
    return jnp.asarray(arr)


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


def check_traced(x, bad, message: str):
    """Raise `ValueError(message)` when `bad` holds: eagerly for concrete values, through
    `eqx.error_if` (a runtime error of the compiled program) when traced."""
    import equinox as eqx

    if is_tracer(bad):
        return eqx.error_if(x, bad, message)
    if bool(bad):
        raise ValueError(message)
    return x


def real_scalar(name: str, value, dtype, *, positive: bool = False):
    """A finite real scalar (positive if asked) as a 0-d array of `dtype`; traced values are
    checked inside the compiled program."""
    if isinstance(value, (str, bytes, bool)) or value is None or not (
        isinstance(value, (numbers.Real, np.ndarray, np.generic, jax.Array))
    ):
        raise TypeError(f"`{name}` must be a real number, got {_short(value)}")
    if np.ndim(value) != 0:
        raise ValueError(f"`{name}` must be a scalar, got shape {np.shape(value)}")
    if jnp.issubdtype(jnp.result_type(value), jnp.complexfloating):
        raise TypeError(f"`{name}` must be a real number, got {_short(value)}")
    x = jnp.asarray(value, dtype)
    bad = ~jnp.isfinite(x) | ((x <= 0) if positive else False)
    cond = "finite and > 0" if positive else "finite"
    shown = value if is_tracer(value) else float(value)
    return check_traced(x, bad, f"`{name}` must be {cond}, got {shown!r}")


def check_tolerances(rtol, atol, dtype, *, prefix: str = ""):
    """Relative/absolute tolerances: 10·eps ≤ rtol < 1 and 0 ≤ atol < 1 (a typo such as 1e8 for
    1e-8 would otherwise give a confident wrong answer)."""
    out = []
    for name, value, lo in (("rtol", rtol, None), ("atol", atol, 0.0)):
        full = prefix + name
        if is_tracer(value):
            x = jnp.asarray(value, dtype)
            out.append(check_traced(x, ~jnp.isfinite(x) | (x < 0) | (x >= 1),
                                    f"`{full}` must be in [0, 1)"))
            continue
        v = positive_scalar(full, value, allow_zero=lo is not None)
        if v >= 1:
            raise ValueError(f"`{full}` must be < 1 (a tolerance of 100% or more checks nothing), got {v!r}")
        if lo is None:
            check_tolerance(full, v, dtype)
        out.append(jnp.asarray(v, dtype))
    return tuple(out)


# Beyond this, the saved arrays of one call would not fit in a laptop's memory: refuse with
# the size instead of hanging in an allocation.
MAX_SAVED_BYTES = 8 * 2**30


def check_size(batch: int, n_save: int, L: int, d: int, save, dtype) -> None:
    """Refuse, before allocating, a call whose saved arrays would exceed MAX_SAVED_BYTES."""
    per_save = d + 1 + sum({"u": L * d, "conserved": L * d, "grad_Q": d, "bregman": 1,
                            "grad_integral": d}[s] for s in save)
    size = batch * n_save * per_save * jnp.dtype(dtype).itemsize
    if size > MAX_SAVED_BYTES:
        raise ValueError(
            f"the saved trajectory would take {size / 2**30:.1f} GiB ({batch} runs × {n_save} save "
            f"times × {per_save} numbers), over the {MAX_SAVED_BYTES / 2**30:.0f} GiB limit: save "
            "fewer times (`ts`), fewer quantities, or split the batch"
        )
