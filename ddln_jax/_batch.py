"""Many runs of one problem on the lane-refill engine: queue order, padding, devices.

`run_queue` is what `simulate(..., lanes=N)` and `sweep` call: it deals the runs hardest
first, pads the queue to a fixed size (so that one compiled engine serves every chunk of a
sweep), splits it round-robin over devices, and returns the outputs in the input order.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ._engine import EngineConfig, EngineData, run_engine


def _device_arrays(tree):
    """JAX arrays for the array leaves (a loss may also hold plain functions)."""
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(x) if isinstance(x, (np.ndarray, np.generic, jax.Array)) else x, tree
    )


def difficulty(u0: np.ndarray) -> np.ndarray:
    """A cheap proxy for how many steps a run needs: the init's scale (stiffness grows with
    it). Runs are dealt in decreasing order (longest processing time first), so that the
    lanes run out of work at nearly the same time."""
    u0 = np.asarray(u0)
    return np.sqrt(np.mean(u0.reshape(u0.shape[0], -1) ** 2, axis=1))


def lanes_for(requested: int, jobs: int, devices: int) -> int:
    """Lanes per device: as asked, but at most a quarter of each device's queue, so that
    finished lanes have runs to refill from (with as many lanes as runs, no lane is ever
    refilled and the batch waits for its slowest run)."""
    return max(1, min(requested, math.ceil(jobs / (4 * devices))))


def run_queue(
    config: EngineConfig,
    loss,
    u0: np.ndarray,
    targets: np.ndarray,
    *,
    ts,
    t1: float,
    rtol: float,
    atol: float,
    max_steps: int,
    theta_star=None,
    devices=None,
    size: int | None = None,
    on_jobs=None,
    tangent: tuple | None = None,
):
    """Run every init of `u0` (B, L, d) to its end on the engine; outputs in input order.

    `targets` are the loss thresholds (used when `config.stop`); `size` pads the queue to a
    fixed length (default: B); `on_jobs(n)` is told how many runs have ended. With
    `tangent = (du0, dtargets)` (arrays shaped like `u0` and `targets`) the engine runs in
    forward mode and returns `(outputs, d_outputs, stats)`.
    """
    u0 = np.asarray(u0)
    dtype = u0.dtype if np.issubdtype(u0.dtype, np.floating) else np.float64
    u0 = u0.astype(dtype)
    targets = np.asarray(targets, dtype)
    J = u0.shape[0]
    devices = list(devices) if devices is not None else jax.devices()[:1]
    D = len(devices)
    size = max(J, size or J)
    order = np.argsort(-difficulty(u0), kind="stable")
    Jd = math.ceil(size / D)
    slots = Jd * D
    pad = lambda x: np.concatenate([x, np.repeat(x[-1:], slots - J, 0)]) if slots > J else x
    u0p, tgp = pad(u0[order]), pad(targets[order])
    d = u0.shape[-1]
    theta_star = np.zeros(d, dtype) if theta_star is None else np.asarray(theta_star, dtype)
    common = (np.asarray(ts, dtype), np.asarray(t1, dtype), np.asarray(rtol, dtype),
              np.asarray(atol, dtype), theta_star, np.asarray(max_steps, np.int32))
    if tangent is not None:
        if D != 1:
            raise ValueError("forward-mode sensitivities run on one device")
        du0, dtg = (np.asarray(t, dtype) for t in tangent)
        dtangent = (jnp.asarray(pad(du0[order])), jnp.asarray(pad(np.broadcast_to(dtg, (J,))[order])))
        data = EngineData(loss, u0p, tgp, np.asarray(J, np.int32), *common)
        data = _device_arrays(data)
        out, dout, stats = run_engine(config, data, on_round=on_jobs, tangent=dtangent)
        inverse = np.empty(J, int)
        inverse[order] = np.arange(J)
        back = lambda t: jax.tree_util.tree_map(
            lambda x: x[:J][inverse] if x.dtype != jax.dtypes.float0 else x[:J], t)
        return back(out), back(dout), stats
    if D == 1:
        data = EngineData(loss, u0p, tgp, np.asarray(J, np.int32), *common)
        data = _device_arrays(data)
        out, stats = run_engine(config, data, on_round=on_jobs)
        queue_out = jax.tree_util.tree_map(lambda x: x[:J], out)
    else:
        # Deal the queue round-robin so that every device gets easy and hard runs alike.
        slot = np.arange(slots).reshape(Jd, D).T  # device r takes positions r, r+D, ...
        n_jobs = np.array([(slot[r] < J).sum() for r in range(D)], np.int32)
        data = EngineData(loss, u0p[slot], tgp[slot], n_jobs, *common)
        out, stats = run_engine(config, data, devices=devices, on_round=on_jobs)
        back = np.empty(J, int)
        flat = slot.reshape(-1)
        keep = flat < J
        back[flat[keep]] = np.flatnonzero(keep)
        queue_out = jax.tree_util.tree_map(lambda x: x.reshape((slots,) + x.shape[2:])[back], out)
    inverse = np.empty(J, int)
    inverse[order] = np.arange(J)
    return jax.tree_util.tree_map(lambda x: x[inverse], queue_out), stats
