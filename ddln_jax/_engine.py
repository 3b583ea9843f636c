"""The batch engine: many runs of one (depth, problem), with lanes kept busy.

A plain `jax.vmap(diffeqsolve)` steps every lane until the slowest lane is done. Here each of
`lanes` lanes steps its own run with a diffrax solver and the default controller (the same
`solver.step` / `controller.adapt_step_size` that `diffeqsolve` uses), and a lane whose run
ends takes the next run from a queue. Runs are dealt hardest first (longest-processing-time
scheduling), so the lanes run out of work at nearly the same time.

Save times are hit exactly: a step that would pass the next save time is clipped to it (such
steps do not count against `max_steps`, as diffrax's interpolated saves do not). The loss
threshold (`targets`) is located inside the step that crossed it on the solver's dense
interpolation, with the same root finder as `simulate`'s event, and every run's status comes
from the same decision (`_solution.decide_status`); a failed run never stops the others. This
module is a pure-JAX kernel; the host driver (queue order, padding, devices, progress) is
`_batch.py`. The loop runs in rounds of `round_steps` steps so that the host can report
progress; inside a round, an inner loop steps the lanes until some run ends, and the
bookkeeping of ended runs (status, final values, refill) runs once after it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._controller import PredictiveController
from ._flows import AbstractFormulation, ReducedFlow
from ._geometry import Geometry
from ._solution import (
    NONFINITE_STREAK,
    carries_accuracy,
    decide_status,
    finite_tree,
    locate_event,
)
from ._solvers import FlowField, natural_scale

_PENDING = -1  # a job not finished yet / a lane without a job
_UNSTARTED = -2  # a lane before its first job (the first iteration hands them out)


def state_scale(form: AbstractFormulation, geom, u0):
    """The natural scale of a formulation's state (tolerances are relative to it, so accuracy
    does not depend on the init's scale; see `natural_scale`). A signed network's scale is
    that of its two halves, each a product network."""
    if isinstance(geom, Geometry):
        return natural_scale(form, geom, u0)
    d = geom.d
    halves = jnp.concatenate([u0[0], u0[1]], axis=-1)
    s = natural_scale(ReducedFlow(), geom.halves, halves).reshape(2, d)
    y0 = form.initial_state(geom, u0)
    if jnp.shape(y0) == (2, d):  # reduced: one w per half
        out = s
    elif jnp.shape(y0) == u0.shape:  # layers
        out = jnp.maximum(jnp.abs(u0), s[:, None, :])
    else:  # θ or η on ℝ^d: the sum of the halves' images of their scales
        half = natural_scale(form.name, geom.halves, halves)
        out = jnp.abs(half[:d]) + jnp.abs(half[d:])
    return jnp.where((out > 0) & jnp.isfinite(out), out, 1.0).astype(u0.dtype)


class EngineConfig(eqx.Module):
    """Static description of one compiled engine (hashable)."""

    formulation: AbstractFormulation
    solver: dfx.AbstractSolver
    lanes: int
    n_save: int
    stop: bool
    bregman: bool
    round_steps: int


class EngineData(eqx.Module):
    """The runs of one engine call (arrays; one compiled program serves any values)."""

    loss: eqx.Module
    u0: jax.Array  # (J, L, d), in queue order
    targets: jax.Array  # (J,) loss thresholds (unused without `stop`)
    n_jobs: jax.Array  # number of real jobs in the queue (≤ J; the rest is padding)
    ts: jax.Array  # (n_save,)
    t1: jax.Array
    rtol: jax.Array
    atol: jax.Array
    theta_star: jax.Array  # (d,) reference point of the Bregman divergence
    max_steps: jax.Array  # step budget of each run


class Lanes(eqx.Module):
    job: jax.Array
    t: jax.Array
    dt: jax.Array
    y: jax.Array
    solver_state: object
    ctrl_state: object
    k: jax.Array
    steps: jax.Array
    budget: jax.Array  # steps that count against max_steps (not those clipped to a save)
    rejected: jax.Array
    streak: jax.Array  # consecutive non-finite trial steps
    nonfinite: jax.Array  # all non-finite trial steps of the run
    drift: jax.Array
    geom: eqx.Module
    field: FlowField  # the run's vector field in scaled variables: `y` holds z = state / scale


class Outputs(eqx.Module):
    theta: jax.Array  # (J, n_save, d)
    loss: jax.Array  # (J, n_save)
    bregman: jax.Array  # (J, n_save)
    theta_final: jax.Array
    loss_final: jax.Array
    t_final: jax.Array
    status: jax.Array
    steps: jax.Array
    rejected: jax.Array
    drift: jax.Array


class Carry(eqx.Module):
    lanes: Lanes
    out: Outputs
    next_job: jax.Array
    iterations: jax.Array


def _controller(data):
    return PredictiveController(rtol=data.rtol, atol=data.atol)


def _observe(config, data, geom, field, z):
    """θ, f(θ), D_Q(θ*, θ) and the drift of the conserved gaps at a (scaled) state."""
    form = config.formulation
    y = field.to_state(z)
    theta = form.theta(geom, y)
    loss = data.loss(theta)
    if config.bregman:
        breg = geom.bregman(data.theta_star, theta)
    else:
        breg = jnp.zeros((), theta.dtype)
    drift = jnp.max(jnp.abs(geom.gaps(form.layers(geom, y)) - geom.delta_full))
    return theta, loss, breg, drift


def _record(out, jobs, ks, mask, theta, loss, breg):
    """Write the saves of the lanes in `mask` at (job, k); others are dropped."""
    J = out.loss.shape[0]
    rows = jnp.where(mask, jobs, J)
    return eqx.tree_at(
        lambda o: (o.theta, o.loss, o.bregman),
        out,
        (
            out.theta.at[rows, ks].set(theta, mode="drop"),
            out.loss.at[rows, ks].set(loss, mode="drop"),
            out.bregman.at[rows, ks].set(breg, mode="drop"),
        ),
    )


def _start(config, data, job):
    """A lane at the start of run `job`."""
    form = config.formulation
    u0 = data.u0[job]
    geom = form.geometry(u0)
    field = FlowField(form, state_scale(form, geom, u0))
    y0 = field.from_state(form.initial_state(geom, u0))
    args = (data.loss, geom)
    term = dfx.ODETerm(field)
    t0 = jnp.zeros((), data.t1.dtype)
    ctrl = _controller(data)
    err_order = config.solver.error_order(term)
    t_next, ctrl_state = ctrl.init(term, t0, data.t1, y0, None, args, config.solver.func, err_order)
    solver_state = config.solver.init(term, t0, t_next, y0, args)
    _, _, _, drift = _observe(config, data, geom, field, y0)
    zero = jnp.zeros((), jnp.int32)
    return Lanes(
        job=job, t=t0, dt=t_next - t0, y=y0, solver_state=solver_state, ctrl_state=ctrl_state,
        k=zero, steps=zero, budget=zero, rejected=zero, streak=zero, nonfinite=zero, drift=drift,
        geom=geom, field=field,
    )


def _where_lanes(mask, new, old):
    def pick(a, b):
        if not eqx.is_array(a):
            return a
        m = mask.reshape(mask.shape + (1,) * (a.ndim - mask.ndim))
        return jnp.where(m, a, b)

    return jax.tree_util.tree_map(pick, new, old)


def _lazy(pred, fn):
    """`fn()` when `pred`, zeros of the same shapes otherwise. Only lane-sized values pass
    through the branch: the per-job output buffers never do, so they are updated in place."""
    shapes = jax.eval_shape(fn)
    zeros = lambda: jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    return jax.lax.cond(pred, fn, zeros)


def _attempt(config, data, lane: Lanes):
    """One step attempt of one lane; returns the lane after it and what happened."""
    term = dfx.ODETerm(lane.field)
    args = (data.loss, lane.geom)
    n_save = config.n_save
    t_save = jnp.where(lane.k < n_save, data.ts[jnp.minimum(lane.k, n_save - 1)], data.t1)
    t_want = lane.t + lane.dt
    t_end = jnp.minimum(jnp.minimum(t_want, t_save), data.t1)
    clipped = t_end < t_want
    y1, y_err, dense, solver_state1, _ = config.solver.step(
        term, lane.t, t_end, lane.y, args, lane.solver_state, False
    )
    ctrl = _controller(data)
    err_order = config.solver.error_order(term)
    keep, nt0, nt1, _, ctrl_state1, _ = ctrl.adapt_step_size(
        lane.t, t_end, lane.y, y1, args, y_err, err_order, lane.ctrl_state
    )
    finite = finite_tree(y1, y_err)
    keep = keep & finite
    dt = jnp.where(finite, nt1 - nt0, 0.2 * (t_end - lane.t))
    # After a step shortened to hit a save time, do not let the short step shrink the next one.
    dt = jnp.where(keep & clipped, jnp.maximum(dt, lane.dt), dt)
    pick = lambda new, old: _where_lanes(keep, new, old)
    ctrl_state = jax.tree_util.tree_map(
        lambda a, b: jnp.where(finite, a, b) if eqx.is_array(a) else a, ctrl_state1, lane.ctrl_state
    )
    if config.stop:
        # One extra product with X per step: the price of locating the threshold exactly.
        loss1 = data.loss(config.formulation.theta(lane.geom, lane.field.to_state(y1)))
        crossed = keep & (loss1 <= data.targets[lane.job])
    else:
        crossed = jnp.zeros((), bool)
    saved = keep & ~crossed & (t_end == t_save) & (lane.k < n_save)
    new = Lanes(
        job=lane.job,
        t=jnp.where(keep, t_end, lane.t),
        dt=dt,
        y=pick(y1, lane.y),
        solver_state=pick(solver_state1, lane.solver_state),
        ctrl_state=ctrl_state,
        k=lane.k,
        steps=lane.steps + 1,
        budget=lane.budget + (~(keep & clipped)).astype(jnp.int32),
        rejected=lane.rejected + (~keep).astype(jnp.int32),
        streak=jnp.where(finite, 0, lane.streak + 1),
        nonfinite=lane.nonfinite + (~finite).astype(jnp.int32),
        drift=lane.drift,
        geom=lane.geom,
        field=lane.field,
    )
    event = {"t0": lane.t, "t1": t_end, "dense": dense}
    return new, saved, crossed, event


def _locate(config, data, lanes, crossed, event):
    """Times and states where f(θ) crosses the target inside the crossing steps."""
    form = config.formulation
    interp_cls = config.solver.interpolation_cls

    def one(lane, ev):
        interp = interp_cls(t0=ev["t0"], t1=ev["t1"], **ev["dense"])
        target = data.targets[lane.job]
        h = lambda t, z: data.loss(form.theta(lane.geom, lane.field.to_state(z))) - target
        return locate_event(interp, h, ev["t0"], ev["t1"])

    return jax.vmap(one)(lanes, event)


def _advance(config, data, lanes, out):
    """One step attempt of every lane and the saves it reaches; also the dense output of the
    step (to locate a crossing) and which runs it ended: `(lanes, out, event, ends)`."""
    active = lanes.job >= 0
    observe = jax.vmap(lambda g, f, y: _observe(config, data, g, f, y))
    new, saved, crossed, event = jax.vmap(lambda l: _attempt(config, data, l))(lanes)
    # Only what a step changes is selected (the geometry and the job stay as they are).
    moving = lambda l: (
        l.t, l.dt, l.y, l.solver_state, l.ctrl_state, l.steps, l.budget, l.rejected, l.streak,
        l.nonfinite,
    )
    new = eqx.tree_at(moving, lanes, _where_lanes(active, moving(new), moving(lanes)))
    saved, crossed = saved & active, crossed & active

    # Saves are rare next to steps: observe θ, f and the gaps only when some lane saves.
    theta, loss, breg, drift = _lazy(jnp.any(saved), lambda: observe(new.geom, new.field, new.y))
    out = _record(out, new.job, new.k, saved, theta, loss, breg)
    new = eqx.tree_at(
        lambda l: (l.k, l.drift), new,
        (new.k + saved.astype(jnp.int32), jnp.where(saved, jnp.maximum(new.drift, drift), new.drift)),
    )

    success = active & (new.t >= data.t1) & (new.k >= config.n_save)
    max_steps = active & (new.budget >= data.max_steps)
    collapsed = active & (new.streak >= NONFINITE_STREAK)
    done = crossed | success | collapsed | max_steps | (new.job == _UNSTARTED)
    ends = {"crossed": crossed, "success": success, "max_steps": max_steps,
            "collapsed": collapsed, "done": done}
    return new, out, event, ends


def _finish(config, data, next_job, new, out, event, ends):
    """Record the runs that ended (status, final values; the crossing located on the step's
    dense output) and hand their lanes to the next runs of the queue."""
    crossed, success, max_steps = ends["crossed"], ends["success"], ends["max_steps"]
    collapsed, done = ends["collapsed"], ends["done"]
    active = new.job >= 0
    observe = jax.vmap(lambda g, f, y: _observe(config, data, g, f, y))
    if config.stop:
        t_ev, y_ev = _lazy(jnp.any(crossed), lambda: _locate(config, data, new, crossed, event))
    else:
        t_ev, y_ev = new.t, new.y
    t_final = jnp.where(crossed, t_ev, new.t)
    y_final = _where_lanes(crossed, y_ev, new.y)

    # Runs that ended hand their lanes to the next runs of the queue.
    order = jnp.cumsum(done.astype(jnp.int32), dtype=jnp.int32) - 1
    new_job = next_job + order
    valid = done & (new_job < data.n_jobs)
    job = jnp.where(valid, new_job, 0)

    def accurate(geom, field, z, theta, steps):
        # The same decision as `simulate` (see `_solution.carries_accuracy`).
        sens = config.formulation.sensitivity(geom, field.to_state(z))
        return carries_accuracy(sens, theta, steps, data.rtol)

    def ending():
        theta_f, loss_f, _, _ = observe(new.geom, new.field, y_final)
        ok = jax.vmap(accurate)(new.geom, new.field, y_final, theta_f, new.steps)
        fresh = jax.vmap(lambda j: _start(config, data, j))(job)
        lanes = eqx.filter(_where_lanes(valid, fresh, new), eqx.is_array)
        return (theta_f, loss_f, ok, observe(fresh.geom, fresh.field, fresh.y)), lanes

    # When no run ended (a round's step budget ran out) the lanes pass through unchanged:
    # only the small per-lane results are zeros there, not a whole set of fresh lanes.
    unchanged, static = eqx.partition(new, eqx.is_array)
    shapes = jax.eval_shape(lambda: ending()[0])
    (theta_f, loss_f, accurate_f, obs0), lanes = jax.lax.cond(
        jnp.any(done), ending,
        lambda: (jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes), unchanged),
    )
    lanes = eqx.combine(lanes, static)
    finite = jnp.isfinite(loss_f) & jnp.all(jnp.isfinite(theta_f), axis=-1)
    status = decide_status(
        reached_end=success, event=crossed, max_steps=max_steps, failed=collapsed,
        nonfinite_trials=new.nonfinite, final_ok=finite, accurate=accurate_f,
    )
    rows = jnp.where(done & active, new.job, out.loss.shape[0])
    put = lambda arr, val: arr.at[rows].set(val, mode="drop")
    out = Outputs(
        theta=out.theta, loss=out.loss, bregman=out.bregman,
        theta_final=put(out.theta_final, theta_f), loss_final=put(out.loss_final, loss_f),
        t_final=put(out.t_final, t_final), status=put(out.status, status),
        steps=put(out.steps, new.steps), rejected=put(out.rejected, new.rejected),
        drift=put(out.drift, new.drift),
    )
    lanes = eqx.tree_at(lambda l: l.job, lanes, jnp.where(done & ~valid, _PENDING, lanes.job))
    # A save time at t = 0 is recorded when the run starts.
    at_zero = valid & (data.ts[0] == 0)
    out = _record(out, lanes.job, jnp.zeros_like(lanes.k), at_zero, obs0[0], obs0[1], obs0[2])
    lanes = eqx.tree_at(lambda l: l.k, lanes, jnp.where(at_zero, 1, lanes.k))
    next_job = jnp.minimum(next_job + jnp.sum(done, dtype=jnp.int32), data.n_jobs)
    return lanes, out, next_job


def _empty(config, data):
    """The carry before the first iteration: no compiled start-up, only shapes."""
    J, d = data.u0.shape[0], data.u0.shape[-1]
    n = config.n_save
    dtype = data.u0.dtype
    nan = lambda *s: jnp.full(s, jnp.nan, dtype)
    out = Outputs(
        theta=nan(J, n, d), loss=nan(J, n), bregman=nan(J, n), theta_final=nan(J, d),
        loss_final=nan(J), t_final=nan(J), status=jnp.full(J, _PENDING, jnp.int32),
        steps=jnp.zeros(J, jnp.int32), rejected=jnp.zeros(J, jnp.int32), drift=nan(J),
    )
    shapes = jax.eval_shape(lambda: _start(config, data, jnp.zeros((), jnp.int32)))
    lanes = jax.tree_util.tree_map(
        lambda x: jnp.zeros((config.lanes,) + x.shape, x.dtype), shapes
    )
    lanes = eqx.tree_at(lambda l: l.job, lanes, jnp.full(config.lanes, _UNSTARTED, jnp.int32))
    zero = jnp.zeros((), jnp.int32)
    return Carry(lanes, out, zero, zero)


@eqx.filter_jit
def engine_round(config: EngineConfig, data: EngineData, carry: Carry) -> Carry:
    """Up to `round_steps` iterations (fewer if every run ends)."""
    start = carry.iterations
    left = lambda iterations: iterations - start < config.round_steps

    def until_a_run_ends(c):
        # The inner loop only steps (and saves); what happens when a run ends — its status,
        # its final values, a fresh run in its lane — runs once after it, not in every step.
        # (With the pass-through in `_finish`: a 64-lane batch of stiff runs, 1.30 → 1.05 s.)
        def step(s):
            lanes, out, iterations, _, _, _ = s
            lanes, out, event, ends = _advance(config, data, lanes, out)
            return lanes, out, iterations + 1, event, ends, jnp.zeros((), bool)

        shapes = jax.eval_shape(lambda: _advance(config, data, c.lanes, c.out)[2:])
        event, ends = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
        lanes, out, iterations, event, ends, _ = jax.lax.while_loop(
            lambda s: s[5] | (~jnp.any(s[4]["done"]) & left(s[2])),
            step, (c.lanes, c.out, c.iterations, event, ends, jnp.ones((), bool)))
        lanes, out, next_job = _finish(config, data, c.next_job, lanes, out, event, ends)
        return Carry(lanes, out, next_job, iterations)

    def cond(c):
        return jnp.any(c.lanes.job != _PENDING) & left(c.iterations)

    return jax.lax.while_loop(cond, until_a_run_ends, carry)


def _shard_map():
    try:
        from jax import shard_map  # jax ≥ 0.6

        return lambda f, mesh, i, o: shard_map(f, mesh=mesh, in_specs=i, out_specs=o, check_vma=False)
    except ImportError:  # pragma: no cover - older jax
        from jax.experimental.shard_map import shard_map

        return lambda f, mesh, i, o: shard_map(f, mesh, in_specs=i, out_specs=o, check_rep=False)


def _global(x, sharding):
    """A global array from a host array that every process can build (multi-host safe)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


_SHARDED_PROGRAMS: dict = {}


def _sharded_programs(config, static, spec_shared, devices):
    """The jitted, sharded start and round of one engine (built once per configuration)."""
    key = (config, static, tuple(devices))
    try:
        return _SHARDED_PROGRAMS[key]
    except TypeError:  # something unhashable in the loss: no caching
        key = None
    except KeyError:
        pass
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.asarray(devices), ("dev",))
    smap = _shard_map()
    squeeze = lambda t: jax.tree_util.tree_map(lambda x: x[0], t)
    expand = lambda t: jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], t)

    def with_data(local, dyn):
        local = squeeze(local)
        shared = eqx.combine(dyn, static)
        return eqx.tree_at(
            lambda d: (d.u0, d.targets, d.n_jobs), shared,
            (local["u0"], local["targets"], local["n_jobs"]),
            is_leaf=lambda x: x is None,
        )

    def start(local, dyn):
        return expand(_empty(config, with_data(local, dyn)))

    def round_(local, dyn, carry):
        return expand(engine_round(config, with_data(local, dyn), squeeze(carry)))

    programs = (
        jax.jit(smap(start, mesh, (P("dev"), spec_shared), P("dev"))),
        jax.jit(smap(round_, mesh, (P("dev"), spec_shared, P("dev")), P("dev"))),
    )
    if key is not None:
        _SHARDED_PROGRAMS[key] = programs
    return programs


class _Sharded:
    """The engine on several devices: each device runs its own lanes on its own share of
    the queue (no communication), and the host loops until every device is done."""

    def __init__(self, config, data, devices):
        from jax.sharding import Mesh, NamedSharding
        from jax.sharding import PartitionSpec as P

        mesh = Mesh(np.asarray(devices), ("dev",))
        split, whole = NamedSharding(mesh, P("dev")), NamedSharding(mesh, P())
        local = {"u0": data.u0, "targets": data.targets, "n_jobs": data.n_jobs}
        self.local = {k: _global(v, split) for k, v in local.items()}
        shared = eqx.tree_at(lambda d: (d.u0, d.targets, d.n_jobs), data, (None, None, None))
        shared = jax.tree_util.tree_map(lambda x: _global(x, whole) if eqx.is_array(x) else x, shared)
        self._dyn = eqx.filter(shared, eqx.is_array)
        static = eqx.filter(shared, eqx.is_array, inverse=True)
        spec_shared = jax.tree_util.tree_map(lambda _: P(), self._dyn)
        self._start, self._round = _sharded_programs(config, static, spec_shared, devices)

    def start(self):
        return self._start(self.local, self._dyn)

    def round(self, carry):
        return self._round(self.local, self._dyn, carry)


def _zero_tangent(tree):
    """Zero tangents of a pytree's arrays (float0 for integer arrays, as `jax.jvp` wants)."""

    def zero(x):
        if not eqx.is_array(x):
            return x
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return jnp.zeros_like(x)
        return np.zeros(x.shape, jax.dtypes.float0)

    return jax.tree_util.tree_map(zero, tree)


@eqx.filter_jit
def engine_round_jvp(config: EngineConfig, data: EngineData, carry: Carry, ddata, dcarry):
    """`engine_round` in forward mode: the while loop carries the tangents along every lane
    (run refills, clipped saves and the located event time included)."""
    return jax.jvp(lambda d, c: engine_round(config, d, c), (data, carry), (ddata, dcarry))


def run_engine(
    config: EngineConfig,
    data: EngineData,
    *,
    devices=None,
    on_round: Callable[[int], None] | None = None,
    tangent: tuple | None = None,
) -> tuple[Outputs, dict] | tuple[Outputs, Outputs, dict]:
    """Run every job of `data` to its end; returns per-job outputs and engine statistics.

    With several `devices`, `data.u0`, `data.targets` and `data.n_jobs` carry a leading device
    axis (one queue per device) and so do the outputs; `config.lanes` is per device.

    With `tangent = (du0, dtargets)` (one device), the engine runs in forward mode and also
    returns the outputs' tangents: `(outputs, d_outputs, stats)`.
    """
    dcarry = None
    if tangent is not None:
        if devices is not None and len(devices) > 1:
            raise ValueError("forward-mode sensitivities run on one device")
        carry = _empty(config, data)
        ddata = eqx.tree_at(lambda d: (d.u0, d.targets), _zero_tangent(data), tangent)
        dcarry = _zero_tangent(carry)

        def step(c):
            nonlocal dcarry
            c, dcarry = engine_round_jvp(config, data, c, ddata, dcarry)
            return c
    elif devices is not None and len(devices) > 1:
        engine = _Sharded(config, data, devices)
        carry = engine.start()
        step = engine.round
    else:
        carry = _empty(config, data)
        step = lambda c: engine_round(config, data, c)
    n_jobs = np.asarray(data.n_jobs)
    while True:
        carry = step(carry)
        status = np.asarray(carry.out.status)
        if on_round is not None:
            on_round(int(np.sum(status != _PENDING)))
        if not bool(np.any(np.asarray(carry.lanes.job) != _PENDING)):
            break
    iterations = int(np.max(np.asarray(carry.iterations)))
    # Lane-steps of the wall-clock: devices that finished early count as idle lanes.
    executed = iterations * config.lanes * (1 if devices is None else len(devices))
    useful = int(np.sum(np.asarray(carry.out.steps)))
    stats = {
        "iterations": iterations,
        "lanes": config.lanes * (1 if devices is None else len(devices)),
        "lane_steps_executed": executed,
        "lane_steps_useful": useful,
        "lane_efficiency": useful / executed if executed else math.nan,
        "jobs": int(np.sum(n_jobs)),
    }
    out = jax.tree_util.tree_map(np.asarray, carry.out)
    if tangent is not None:
        return out, jax.tree_util.tree_map(np.asarray, dcarry.out), stats
    return out, stats
