"""Discrete training on the layers beside the flow: any optax optimizer, batched over step
sizes, inits and SGD seeds in one compiled `jax.lax.scan`; the per-step drift of the gaps
(docs/math.md, "Related facts"), the effective initialization, and the largest stable step.

Conventions follow [`ddln_jax.Trajectory`][]: leading batch axes first, a per-run `Status`,
saved values after a run stopped (diverged) hold NaN, and the time axis is t = k·η when the
optimizer has a step size η, so that a run of k steps sits beside the flow at time kη.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from ._geometry import Geometry
from ._init import check_init
from ._losses import AbstractLoss, as_loss, check_loss_at
from ._solution import NONFINITE, SUCCESS, Status, status_item, status_names
from ._validate import _short, as_float_array, positive_int, positive_scalar

__all__ = [
    "Training",
    "train",
    "train_runs",
    "gd_drift",
    "effective_init",
    "effective_implicit_bias",
    "sharpness",
    "stable_learning_rate",
]


class Training(eqx.Module):
    """The result of [`ddln_jax.train`][] (and of [`ddln_jax.sgd_sde`][]). Leading batch axes
    come first, in the order (learning rate, seed, init), each present only when batched.

    **Fields:**

    - `ts`: save times t = k·η, shape `(*batch, n)` (the step index k itself when the
      optimizer has no known step size η; for the SDE, its own times).
    - `step`: the saved step indices k, shape `(n,)` (shared by every run).
    - `theta`: θ at the saves, `(*batch, n, d)`; `loss`: the full-batch f(θ), `(*batch, n)`.
    - `conserved`: the gaps (u^j)² − (u^m)² at the saves, `(*batch, n, L, d)`, m the smallest
      layer of u0 per coordinate (constant along the flow, drifting under GD).
    - `u`: the layers at the saves, `(*batch, n, L, d)`, when asked for with `save=("u",)`.
    - `t_final`, `theta_final`, `loss_final`, `u_final`: the last finite state (step
      `steps`, or the step before a divergence).
    - `status`: a [`ddln_jax.Status`][] item per run: `success`, or `nonfinite` when the state
      diverged (η above the stability limit); never a silent NaN.
    - `diverged_step`: the step k whose update first produced a non-finite state (−1 if none).
    - `learning_rate`: η per run, `(*batch,)` (NaN when unknown).
    - `hit_step`, `hit_time`: first step (and time) where f − f* ≤ `stop_ratio`·(f(θ0) − f*)
      (−1 / NaN if never), when `stop_ratio` was given.

    Saves after a divergence hold NaN.
    """

    ts: Float[Array, "*batch n"]
    step: Int[Array, " n"]
    theta: Float[Array, "*batch n d"]
    loss: Float[Array, "*batch n"]
    conserved: Float[Array, "*batch n L d"]
    t_final: Float[Array, "*batch"]
    theta_final: Float[Array, "*batch d"]
    loss_final: Float[Array, "*batch"]
    u_final: Float[Array, "*batch L d"]
    status: Status
    diverged_step: Int[Array, "*batch"]
    learning_rate: Float[Array, "*batch"]
    u: Float[Array, "*batch n L d"] | None = None
    hit_step: Int[Array, "*batch"] | None = None
    hit_time: Float[Array, "*batch"] | None = None
    method: str = eqx.field(static=True, default="optax")

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.t_final.shape)

    def __getitem__(self, k):
        """Run(s) `k` of a batch (any NumPy index on the batch axes), as `Trajectory[k]`; the
        saved step indices, shared by every run, are kept whole."""
        if not self.batch_shape:
            raise IndexError("this Training is a single run; there is no batch axis to index")
        step = self.step
        out = jax.tree_util.tree_map(lambda x: x[k], eqx.tree_at(lambda t: t.step, self, None))
        return eqx.tree_at(lambda t: t.step, out, step, is_leaf=lambda x: x is None)

    @property
    def status_name(self):
        """Status as names (a string, or an array of strings for a batch)."""
        return status_names(self.status)

    @property
    def succeeded(self):
        """True where the run finished all its steps with a finite state."""
        return np.asarray(self.status == Status.success)

    def conservation_drift(self):
        """max over the saves of |gap(t) − gap(0)|, per run (NaN-safe after a divergence)."""
        c = self.conserved
        return jnp.nanmax(jnp.abs(c - c[..., :1, :, :]), axis=(-3, -2, -1))


# ----------------------------------------------------------------------------------------------
# Gradients on the layers
# ----------------------------------------------------------------------------------------------


def _others(u: Float[Array, "L d"]) -> Float[Array, "L d"]:
    """∏_{k≠j} u^k for every j, by prefix/suffix products (never θ/u^j: u^j may be 0)."""
    ones = jnp.ones_like(u[:1])
    prefix = jnp.cumprod(jnp.concatenate([ones, u[:-1]], axis=0), axis=0)
    suffix = jnp.cumprod(jnp.concatenate([ones, u[:0:-1]], axis=0), axis=0)[::-1]
    return prefix * suffix


def layer_grad(loss: AbstractLoss, u: Float[Array, "L d"]) -> Float[Array, "L d"]:
    """∇_u F(u) for F(u) = f(u¹ ⊙ … ⊙ u^L): row j is (∏_{k≠j} u^k) ⊙ ∇f(θ)."""
    return _others(u) * loss.grad(jnp.prod(u, axis=0))[None]


def _layer_objective(loss):
    return lambda u: loss(jnp.prod(u, axis=0))


# ----------------------------------------------------------------------------------------------
# Optimizers
# ----------------------------------------------------------------------------------------------


def _is_transformation(x) -> bool:
    return isinstance(x, optax.GradientTransformation)


def _injected_lr(state):
    """The `learning_rate` of an `optax.inject_hyperparams` state (top level), else None."""
    hp = getattr(state, "hyperparams", None)
    if isinstance(hp, dict) and "learning_rate" in hp:
        return hp["learning_rate"]
    return None


def _set_injected_lr(state, lr):
    return state._replace(hyperparams={**state.hyperparams, "learning_rate": lr})


def _check_optimizer(optimizer, learning_rate_given: bool, u0):
    """Classify the optimizer before compiling: ('transform', gt) or ('factory', fn)."""
    if _is_transformation(optimizer):
        if learning_rate_given:
            state = jax.eval_shape(optimizer.init, jax.ShapeDtypeStruct(u0.shape[-2:], u0.dtype))
            if _injected_lr(state) is None:
                raise TypeError(
                    "`learning_rate` was given, but `optimizer` is a fixed optax transformation "
                    "without an injected learning rate: pass a factory such as `optax.sgd` or "
                    "`optax.adam` (called with the learning rate), or build it with "
                    "`optax.inject_hyperparams(optax.sgd)(learning_rate=...)`"
                )
        return "transform", optimizer
    if callable(optimizer) and not isinstance(optimizer, type):
        try:
            made = optimizer(learning_rate=1.0)
        except Exception as e:
            raise TypeError(
                f"`optimizer` must be an optax GradientTransformation or a factory called as "
                f"`optimizer(learning_rate=η)` that returns one; calling {_short(optimizer)} "
                f"failed: {e}"
            ) from e
        if not _is_transformation(made):
            raise TypeError(
                f"`optimizer` must be an optax GradientTransformation or a factory returning "
                f"one, but {_short(optimizer)}(learning_rate=1.0) returned {type(made).__name__}"
            )
        if not learning_rate_given:
            raise ValueError(
                f"`learning_rate` is required when `optimizer` is a factory ({_short(optimizer)})"
            )
        return "factory", optimizer
    raise TypeError(
        f"`optimizer` must be an optax GradientTransformation (e.g. `optax.sgd(1e-2)`) or a "
        f"factory such as `optax.adam`, got {type(optimizer).__name__} ({_short(optimizer)})"
    )


def _check_learning_rate(learning_rate):
    """A scalar or 1-D array of finite step sizes > 0 (as a float64 NumPy array)."""
    if isinstance(learning_rate, (str, bytes)) or isinstance(learning_rate, bool):
        raise TypeError(f"`learning_rate` must be a positive number or a 1-D array, got "
                        f"{_short(learning_rate)}")
    if isinstance(learning_rate, numbers.Real) or np.ndim(learning_rate) == 0:
        return np.asarray(positive_scalar("learning_rate", learning_rate))
    try:
        lr = np.asarray(learning_rate, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"`learning_rate` must be a positive number or a 1-D array, got "
                        f"{_short(learning_rate)}") from e
    if lr.ndim != 1 or lr.size == 0:
        raise ValueError(f"`learning_rate` must be a scalar or a non-empty 1-D array, got shape "
                         f"{lr.shape}")
    bad = np.flatnonzero(~np.isfinite(lr) | (lr <= 0))
    if bad.size:
        raise ValueError(f"`learning_rate` must be finite and > 0, got {float(lr[bad[0]])!r} at index "
                         f"{int(bad[0])}")
    return lr


def _check_key(key):
    """(keys, batched): a single PRNG key or a 1-D batch of keys (typed or raw uint32)."""
    if key is None:
        return None, False
    if not isinstance(key, (jax.Array, np.ndarray)):
        raise TypeError(f"`key` must be a JAX PRNG key (`jax.random.key(0)`) or a batch of keys, "
                        f"got {_short(key)}")
    key = jnp.asarray(key)
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.ndim > 1:
            raise ValueError(f"`key` must be one key or a 1-D batch of keys, got shape {key.shape}")
        return key, key.ndim == 1
    if key.dtype == jnp.uint32 and key.ndim in (1, 2) and key.shape[-1] == 2:
        return jax.random.wrap_key_data(key), key.ndim == 2
    raise TypeError(f"`key` must be a JAX PRNG key (`jax.random.key(0)`) or a batch of keys, got "
                    f"{_short(key)}")


def _check_saves(steps, save_every, saves):
    if save_every is not None and saves is not None:
        raise ValueError("pass either `save_every` or `saves`, not both")
    if saves is not None:
        arr = np.asarray(saves)
        if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"`saves` must be a non-empty 1-D array of step indices, got "
                             f"{_short(saves)}")
        if np.any(np.diff(arr) <= 0) or arr[0] < 0 or arr[-1] > steps:
            raise ValueError(f"`saves` must be strictly increasing step indices in [0, {steps}], "
                             f"got {_short(saves)}")
        return arr.astype(np.int64)
    if save_every is None:
        save_every = max(1, steps // 100)
    save_every = positive_int("save_every", save_every)
    arr = np.arange(0, steps + 1, save_every)
    if arr[-1] != steps:
        arr = np.append(arr, steps)
    return arr


# ----------------------------------------------------------------------------------------------
# The compiled run
# ----------------------------------------------------------------------------------------------


def _tree_where(pred, new, old):
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), new, old)


def _minibatch(loss, key, k, batch_size, replace):
    """The loss on the minibatch of step k: rows drawn from `fold_in(key, k)`."""
    n = loss.X.shape[0]
    sub = jax.random.fold_in(key, k)
    if replace:
        idx = jax.random.randint(sub, (batch_size,), 0, n)
    else:
        idx = jax.random.permutation(sub, n)[:batch_size]
    return eqx.tree_at(lambda l: (l.X, l.y), loss, (loss.X[idx], loss.y[idx]))


@functools.partial(
    jax.jit,
    static_argnames=("kind", "optimizer", "batch_size", "replace", "axes", "save_u", "has_stop"),
)
def _train_compiled(loss, u0, lrs, keys, seg, tail, levels, steps, *, kind, optimizer,
                    batch_size, replace, axes, save_u, has_stop):
    # `steps` and the segment lengths are traced: one program serves every run length with
    # the same number of saves.
    dtype = u0.dtype

    def lane(u0, stop_level, lr, key):
        if kind == "factory":
            opt = optax.inject_hyperparams(optimizer, hyperparam_dtype=dtype)(learning_rate=lr)
            state0 = opt.init(u0)
        else:
            opt = optimizer
            state0 = opt.init(u0)
            if lr is not None:
                state0 = _set_injected_lr(state0, jnp.asarray(lr, _injected_lr(state0).dtype))
        m = jnp.argmin(u0**2, axis=0)
        nan = jnp.asarray(jnp.nan, dtype)

        def gaps(u):
            sq = u**2
            return sq - jnp.take_along_axis(sq, m[None], axis=0)

        def full_loss(u):
            return loss(jnp.prod(u, axis=0))

        def step(carry):
            u, s, k, dead, div, hit = carry
            lossk = loss if batch_size is None else _minibatch(loss, key, k, batch_size, replace)
            g = layer_grad(lossk, u)
            upd, s_new = opt.update(g, s, u)
            u_new = optax.apply_updates(u, upd)
            # θ too: a product of finite layers can overflow, and its gradient with it.
            finite = jnp.all(jnp.isfinite(u_new)) & jnp.all(jnp.isfinite(jnp.prod(u_new, 0)))
            if has_stop:
                f_new = full_loss(u_new)
                finite = finite & jnp.isfinite(f_new)
            go = ~dead & finite
            newly = ~dead & ~finite
            div = jnp.where(newly, k + 1, div)
            dead = dead | ~finite
            if has_stop:
                hit = jnp.where(go & (hit < 0) & (f_new <= stop_level), k + 1, hit)
            u = jnp.where(go, u_new, u)
            s = _tree_where(go, s_new, s)
            return u, s, k + 1, dead, div, hit

        def run_for(carry, length):
            return jax.lax.fori_loop(0, length, lambda _, c: step(c), carry)

        def record(carry):
            u, _, _, dead, _, _ = carry
            theta = jnp.prod(u, axis=0)
            rec = (jnp.where(dead, nan, theta), jnp.where(dead, nan, full_loss(u)),
                   jnp.where(dead, nan, gaps(u)))
            if save_u:
                rec = rec + (jnp.where(dead, nan, u),)
            return rec

        def segment(carry, length):
            carry = run_for(carry, length)
            return carry, record(carry)

        hit0 = jnp.where(full_loss(u0) <= stop_level, 0, -1) if has_stop else jnp.asarray(-1)
        carry = (u0, state0, jnp.asarray(0), jnp.asarray(False), jnp.asarray(-1), hit0)
        carry, recs = jax.lax.scan(segment, carry, seg)
        carry = run_for(carry, tail)
        u, _, k, dead, div, hit = carry
        # A diverged lane stopped updating at step div − 1: its last finite state.
        k_final = jnp.where(dead, div - 1, steps)
        f_final = full_loss(u)
        bad_final = ~jnp.isfinite(f_final) & ~dead
        div = jnp.where(bad_final, steps, div)
        status = jnp.where(dead | bad_final, NONFINITE, SUCCESS).astype(jnp.int32)
        return recs, u, k_final, f_final, status, div, hit

    f = lane
    # Innermost init, then seed, then learning rate: output axes (lr, seed, init).
    if axes[2]:
        f = jax.vmap(f, in_axes=(0, 0, None, None))
    if axes[1]:
        f = jax.vmap(f, in_axes=(None, None, None, 0))
    if axes[0]:
        f = jax.vmap(f, in_axes=(None, None, 0, None))
    return f(u0, levels, lrs, keys)


def train(
    loss,
    u0,
    optimizer,
    *,
    steps: int,
    learning_rate=None,
    save_every: int | None = None,
    saves=None,
    batch_size: int | None = None,
    key=None,
    replace: bool = True,
    save=(),
    stop_ratio: float | None = None,
    f_star: float | None = None,
) -> Training:
    """Train the layers of a deep diagonal linear network with an optax optimizer.

    The whole run (every step, every learning rate, seed and init) is one `jax.lax.scan`
    inside one `jax.jit`. Each run keeps its own status: a step that makes the state
    non-finite (η above the stability limit) freezes that run at its last finite state and
    sets `status = Status.nonfinite` and `diverged_step`; the other runs are unaffected.

    **Arguments:**

    - `loss`: a loss module ([`ddln_jax.LeastSquares`][], [`ddln_jax.Logistic`][], ...) or a
      jittable callable f(θ) → scalar (full batch only).
    - `u0`: the layers at step 0, shape `(L, d)`, or `(B, L, d)` for a batch of inits.
    - `optimizer`: an `optax.GradientTransformation` (e.g. `optax.sgd(1e-2, momentum=0.9)`),
      or a factory called as `optimizer(learning_rate=η)` (e.g. `optax.sgd`, `optax.adam`,
      `functools.partial(optax.sgd, momentum=0.9, nesterov=True)`); a factory is wrapped in
      `optax.inject_hyperparams`, so a batch of learning rates compiles once.
    - `steps`: number of optimizer steps (≥ 1).
    - `learning_rate`: η, a number or a 1-D array of step sizes (a leading batch axis).
      Required with a factory; with a transformation built by `optax.inject_hyperparams` it
      overrides the injected value.
    - `save_every`: save every this many steps (default `steps // 100`); the last step is
      always saved. Or `saves`: increasing step indices in [0, steps].
    - `batch_size`: minibatch size for SGD (losses with data `X`, `y`); `None` is full batch.
    - `key`: a PRNG key (or a 1-D batch of keys: a seed axis) that draws the minibatches;
      required with `batch_size`. Step k uses `jax.random.fold_in(key, k)`.
    - `replace`: `True` draws each minibatch's rows independently with replacement; `False`
      draws `batch_size` distinct rows (fresh every step).
    - `save`: `("u",)` also saves the layers at the save steps.
    - `stop_ratio`: ε in (0, 1): record the first step where f − f* ≤ ε·(f(θ0) − f*)
      (`hit_step`, `hit_time`; the run continues). `f_star` defaults to `loss.minimum()`.

    **Returns:** a [`ddln_jax.Training`][] with axes (learning rate, seed, init), each present
    only when batched.
    """
    loss = as_loss(loss)
    u0 = as_float_array("u0", u0, ndim=(2, 3))
    for i, ui in enumerate(u0 if u0.ndim == 3 else [u0]):
        check_init(ui, f"u0[{i}]" if u0.ndim == 3 else "u0")
    check_loss_at(loss, u0[..., 0, :] if u0.ndim == 2 else u0[0, 0])
    steps = positive_int("steps", steps)
    lr_given = learning_rate is not None
    lr = _check_learning_rate(learning_rate) if lr_given else None
    kind, optimizer = _check_optimizer(optimizer, lr_given, u0)
    saves_arr = _check_saves(steps, save_every, saves)
    save = (save,) if isinstance(save, str) else tuple(save)
    for s in save:
        if s != "u":
            raise ValueError(f"`save` may only contain 'u', got {s!r}")

    if batch_size is not None:
        if not (hasattr(loss, "X") and hasattr(loss, "y")):
            raise TypeError(f"`batch_size` needs a loss with data `X` and `y` (LeastSquares, "
                            f"Logistic), got {type(loss).__name__}")
        n = loss.X.shape[0]
        if isinstance(batch_size, bool) or not isinstance(batch_size, (numbers.Integral,
                                                                         np.integer)):
            raise TypeError(f"`batch_size` must be an integer, got {_short(batch_size)}")
        if not 1 <= int(batch_size) <= n:
            raise ValueError(f"`batch_size` must be an integer in [1, n = {n}] (the number of "
                             f"samples), got {int(batch_size)}")
        batch_size = int(batch_size)
        if key is None:
            raise ValueError(f"`key` is required for minibatch SGD (batch_size={batch_size}): "
                             "pass `key=jax.random.key(seed)` or a batch of keys")
    elif key is not None:
        raise ValueError("`key` is only used to draw minibatches: pass `batch_size` too, or drop "
                         "`key` for full-batch training")
    keys, seed_batched = _check_key(key)
    if not isinstance(replace, bool):
        raise TypeError(f"`replace` must be True or False, got {_short(replace)}")

    has_stop = stop_ratio is not None
    if has_stop:
        if not 0 < float(stop_ratio) < 1:
            raise ValueError(f"`stop_ratio` must lie in (0, 1), got {stop_ratio!r}")
        if f_star is None:
            f_star = loss.minimum()
            if f_star is None:
                raise ValueError("`stop_ratio` needs `f_star` for this loss (it has no known "
                                 "minimum)")

    # The step size η of the time axis: given, or read from an injected learning rate.
    if lr is None and kind == "transform":
        state = optimizer.init(u0 if u0.ndim == 2 else u0[0])
        injected = _injected_lr(state)
        eta = np.asarray(float(injected)) if injected is not None else np.asarray(np.nan)
    else:
        eta = lr
    lr_batched = lr is not None and lr.ndim == 1
    init_batched = u0.ndim == 3
    axes = (lr_batched, seed_batched, init_batched)

    seg = np.diff(np.concatenate([[0], saves_arr]))
    tail = steps - int(saves_arr[-1])
    lrs = None if lr is None else jnp.asarray(lr, u0.dtype)

    if has_stop:
        theta0 = jnp.prod(u0, axis=-2)
        f0 = jax.vmap(loss)(theta0) if init_batched else loss(theta0)
        level = f_star + float(stop_ratio) * (f0 - f_star)
    else:
        level = jnp.full(u0.shape[:-2], -jnp.inf, u0.dtype)

    recs, u_final, k_final, f_final, status, div, hit = _train_compiled(
        loss, u0, lrs, keys, jnp.asarray(seg), jnp.asarray(tail), level, jnp.asarray(steps),
        kind=kind, optimizer=optimizer, batch_size=batch_size, replace=replace, axes=axes,
        save_u="u" in save, has_stop=has_stop,
    )
    theta, floss, conserved = recs[:3]
    u_saved = recs[3] if "u" in save else None
    batch_shape = f_final.shape
    eta_b = np.broadcast_to(eta if eta.ndim == 0 else eta.reshape(
        eta.shape + (1,) * (len(batch_shape) - 1)), batch_shape)
    eta_b = jnp.asarray(eta_b, u0.dtype)
    step_f = jnp.asarray(saves_arr, u0.dtype)
    has_eta = bool(np.all(np.isfinite(eta)))
    ts = eta_b[..., None] * step_f[(None,) * eta_b.ndim] if has_eta else jnp.broadcast_to(step_f, (*batch_shape,
                                                                             len(saves_arr)))
    t_final = eta_b * k_final if has_eta else k_final.astype(u0.dtype)
    out = Training(
        ts=ts, step=jnp.asarray(saves_arr), theta=theta, loss=floss, conserved=conserved,
        t_final=t_final, theta_final=jnp.prod(u_final, axis=-2), loss_final=f_final,
        u_final=u_final, status=status_item(status), diverged_step=div, learning_rate=eta_b,
        u=u_saved,
        hit_step=hit if has_stop else None,
        hit_time=(jnp.where(hit >= 0, (eta_b if has_eta else 1.0) * hit, jnp.nan)
                  if has_stop else None),
        method=_describe(optimizer, batch_size),
    )
    return out


def _describe(optimizer, batch_size) -> str:
    name = getattr(optimizer, "__name__", None) or getattr(getattr(optimizer, "func", None),
                                                          "__name__", None)
    base = name if name else "optax transformation"
    return base + (" (full batch)" if batch_size is None else f" (minibatch {batch_size})")


# ----------------------------------------------------------------------------------------------
# The drift of the gaps, the effective initialization
# ----------------------------------------------------------------------------------------------


def gd_drift(loss, u, learning_rate) -> tuple[Float[Array, "L d"], Float[Array, "L d"]]:
    """The exact per-step drift of the gaps under one gradient-descent step (docs/math.md, "Related facts").

    One step u⁺ = u − η ∇_u F(u) changes every gap by, exactly,
    Δ((u^j)² − (u^m)²) = η² (∂f)² [(∏_{l≠j} u^l)² − (∏_{l≠m} u^l)²], m the smallest layer of
    `u` per coordinate (so the gaps only shrink: the effective scale decreases).

    **Arguments:**

    - `loss`: the loss (module or callable f(θ)).
    - `u`: the layers before the step, shape `(L, d)`.
    - `learning_rate`: the step size η.

    **Returns:** `(predicted, actual)`, each of shape `(L, d)`: the identity's right-hand
    side, and the change of the gaps between the two float64 states, computed as
    (u⁺ − u)(u⁺ + u) per layer to avoid the cancellation of squaring first.
    """
    loss = as_loss(loss)
    u = jnp.asarray(u)
    m = jnp.argmin(u**2, axis=0)
    P = _others(u)
    g = loss.grad(jnp.prod(u, axis=0))
    u_new = u - learning_rate * (P * g[None])
    pick = lambda a: jnp.take_along_axis(a, m[None], axis=0)
    pred = learning_rate**2 * g[None] ** 2 * (P**2 - pick(P) ** 2)
    dsq = (u_new - u) * (u_new + u)
    actual = dsq - pick(dsq)
    return pred, actual


def _effective_one(u0, u_end):
    geo = Geometry(u_end, require_assumption_a=False)
    w = geo.psi_inv(jnp.prod(u0, axis=0))
    return geo.layers(w)


def effective_init(u0, u_final) -> Float[Array, "*batch L d"]:
    """The effective initialization of a discrete run: the init whose gradient flow has the
    gaps the run ended with, and starts from the same θ0.

    Its layers keep the sign and smallest-layer convention of docs/math.md §2 read at the end of
    the run: with m the smallest layer of `u_final`, δ_j = u_final^j² − u_final^m² and
    σ = sign ∏_{j≠m} u_final^j, the smallest layer is w = ψ_δ⁻¹(θ0) (so ∏ u_eff = θ0) and
    u_eff^j = sign(u_final^j)·√(w² + δ_j). The flow from it has the mirror potential Q_δ of the
    run's end; Even et al.: large steps shrink δ, hence a smaller effective scale.

    **Arguments:**

    - `u0`: the layers the run started from, `(L, d)` or `(B, L, d)`.
    - `u_final`: the layers where it ended (`Training.u_final`), same shape or with extra
      leading batch axes (learning rates, seeds) broadcast against `u0`.

    **Returns:** the effective init, shaped like `u_final`.
    """
    u0 = as_float_array("u0", u0)
    u_final = as_float_array("u_final", u_final)
    if u0.ndim < 2 or u_final.ndim < 2 or u0.shape[-2:] != u_final.shape[-2:]:
        raise ValueError(f"`u0` and `u_final` must both have layers of shape (L, d) last, got "
                         f"{u0.shape} and {u_final.shape}")
    shape = jnp.broadcast_shapes(u0.shape, u_final.shape)
    a = jnp.broadcast_to(u0, shape).reshape(-1, *shape[-2:])
    b = jnp.broadcast_to(u_final, shape).reshape(-1, *shape[-2:])
    return jax.vmap(_effective_one)(a, b).reshape(shape)


def effective_implicit_bias(X, y, u0, u_final):
    """The implicit-bias limit of the flow from the effective init of a discrete run
    (`implicit_bias_limit(X, y, effective_init(u0, u_final))`), to compare with where the
    run ended. **Returns:** an [`ddln_jax.ImplicitBias`][]."""
    from ._implicit_bias import implicit_bias_limit

    return implicit_bias_limit(X, y, effective_init(u0, u_final))


# ----------------------------------------------------------------------------------------------
# Stability: the sharpness and the largest stable step
# ----------------------------------------------------------------------------------------------


def _power(hvp, v0, num_iter, shift):
    def body(_, v):
        w = hvp(v) + shift * v
        return w / jnp.linalg.norm(w)

    v = jax.lax.fori_loop(0, num_iter, body, v0 / jnp.linalg.norm(v0))
    return jnp.vdot(v, hvp(v)) + shift * jnp.vdot(v, v)


@functools.partial(jax.jit, static_argnames=("num_iter",))
def _sharpness(loss, u, key, num_iter):
    F = _layer_objective(loss)
    hvp = lambda v: jax.jvp(jax.grad(F), (u,), (v,))[1]
    v0 = jax.random.normal(key, u.shape, u.dtype)
    lam_abs = _power(hvp, v0, num_iter, 0.0)
    # When the largest |λ| is negative, the top of the spectrum is found on H + |λ|·I ⪰ 0.
    shift = jnp.maximum(-lam_abs, 0.0)
    lam = _power(hvp, v0, num_iter, shift) - shift
    return jnp.where(lam_abs >= 0, lam_abs, lam)


def sharpness(loss, u, *, num_iter: int = 200, key=None) -> Float[Array, "*batch"]:
    """λ_max of the Hessian of F(u) = f(∏_j u^j) on the layers, by power iteration on
    Hessian-vector products (`jax.jvp` of `jax.grad`); the matrix is never formed.

    **Arguments:** `loss`; `u` of shape `(L, d)` or `(B, L, d)`; `num_iter` power iterations;
    `key` for the start vector (default `jax.random.key(0)`).

    **Returns:** the largest eigenvalue, shape `()` or `(B,)`.
    """
    loss = as_loss(loss)
    u = as_float_array("u", u, ndim=(2, 3))
    num_iter = positive_int("num_iter", num_iter)
    key = jax.random.key(0) if key is None else key
    if u.ndim == 3:
        return jax.vmap(lambda ui: _sharpness(loss, ui, key, num_iter))(u)
    return _sharpness(loss, u, key, num_iter)


def stable_learning_rate(loss, u0, *, num_iter: int = 200, key=None) -> Float[Array, "*batch"]:
    """The largest stable gradient-descent step at `u0` from the local smoothness:
    η_max = 2/λ_max(∇²F(u0)). Steps above it make GD oscillate out of the basin and, on
    these polynomial models, blow up; `train` reports such runs as `Status.nonfinite`.

    Local: on a small init the sharpness grows as training proceeds, so η_max(u0) is an upper
    estimate there; evaluate it at later states (e.g. `Training.u_final`) to follow it.

    **Returns:** η_max, shape `()` or `(B,)`.
    """
    return 2.0 / sharpness(loss, u0, num_iter=num_iter, key=key)


# ----------------------------------------------------------------------------------------------
# Batched runs for sweeps
# ----------------------------------------------------------------------------------------------

_METHODS: dict[str, Callable] = {
    "gd": optax.sgd,
    "momentum": functools.partial(optax.sgd, momentum=0.9),
    "nesterov": functools.partial(optax.sgd, momentum=0.9, nesterov=True),
    "adam": optax.adam,
}


def train_runs(
    loss,
    U,
    learning_rates,
    steps: int,
    save_steps,
    *,
    method: str | Callable = "gd",
    batch_size: int | None = None,
    key=None,
    replace: bool = True,
) -> dict[str, np.ndarray]:
    """Discrete runs for a sweep: every learning rate × every init in one compiled call,
    returned as plain NumPy arrays with a learning-rate dimension first.

    **Arguments:**

    - `loss`: the loss; `U`: inits, shape `(B, L, d)`; `learning_rates`: shape `(R,)`.
    - `steps`: steps per run; `save_steps`: increasing step indices in [0, steps].
    - `method`: `"gd"`, `"momentum"`, `"nesterov"` (momentum 0.9), `"adam"`, or any optax
      factory `fn(learning_rate=η)`; `batch_size`, `key`, `replace`: minibatch SGD as in
      [`ddln_jax.train`][] (`key` one key: one seed).

    **Returns:** dict of arrays: `t` `(R, S)` (t = kη), `step` `(S,)`, `theta` `(R, B, S, d)`,
    `loss` `(R, B, S)`, `theta_final` `(R, B, d)`, `loss_final` `(R, B)`, `status` `(R, B)`
    (integer `Status` codes), `diverged_step` `(R, B)`, `stable_learning_rate` `(B,)`
    (2/λ_max at each init), `learning_rate` `(R,)`.
    """
    if isinstance(method, str):
        if method not in _METHODS:
            raise ValueError(f"`method` must be one of {sorted(_METHODS)} or an optax factory, "
                             f"got {method!r}")
        factory = _METHODS[method]
    else:
        factory = method
    U = as_float_array("U", U, ndim=3)
    lr = _check_learning_rate(learning_rates)
    lr = np.atleast_1d(lr)
    res = train(loss, U, factory, steps=steps, learning_rate=lr, saves=save_steps,
                batch_size=batch_size, key=key, replace=replace)
    return {
        "t": np.asarray(res.ts[:, 0]),
        "step": np.asarray(res.step),
        "theta": np.asarray(res.theta),
        "loss": np.asarray(res.loss),
        "theta_final": np.asarray(res.theta_final),
        "loss_final": np.asarray(res.loss_final),
        "status": np.asarray(res.status._value),
        "diverged_step": np.asarray(res.diverged_step),
        "stable_learning_rate": np.asarray(stable_learning_rate(loss, U)),
        "learning_rate": lr,
    }
