"""Sweeps: initializations × depths × problems as a labeled dataset, chunk by chunk.

Host-side driver (files, progress, processes) around the lane engine (`_batch.run_queue`).
The inits of each depth are built once by the `ddln_jax._init` schemes and sorted once,
hardest first; each (depth, problem) is split into chunks of runs, each finished chunk is
written to disk before the next starts, so an interrupted sweep resumes where it stopped.
Finished runs are found by what they are (depth, problem, init), not by chunk name, so a
resume with another chunk size, another number of shards or processes reuses every one.

Scale-out: `shard=(i, N)` computes only chunks k with k mod N = i into a shared directory
(Slurm job arrays); under `jax.distributed` (several processes) every process computes its
share on its own devices and process 0 gathers and writes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import shutil
import types
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from ._batch import difficulty, lanes_for, run_queue
from ._bounds import c0 as theory_c0
from ._engine import EngineConfig
from ._geometry import check_signed_geometry
from ._init import INIT_SCHEMES, gaussian_init
from ._losses import CallableLoss, as_loss
from ._models import (
    SignedModel,
    as_model,
    shape_scale_init,
    signed_gaussian_init,
    woodworth_init,
)
from ._problems import Problem, custom_problem, make_problem
from ._results import ResultStore, StoreError, load_dataset
from ._solution import EVENT, SUCCESS
from ._spec import SOLVERS, SpecError, SweepSpec

# The signed model's init schemes (`[model] kind = "signed"`), called as f(L, d, α, shape)
# (gaussian with a key first); every one scales with α.
_SIGNED_INITS = {
    "woodworth": lambda L, d, alpha, shape: woodworth_init(L, d, alpha),
    "shape_scale": shape_scale_init,
}


# Memory allowed for one chunk's saved trajectories (θ at every save time).
_CHUNK_BYTES = 512 * 2**20
# Above this, θ(t) of all runs is not assembled in memory: it stays in the chunk files.
_THETA_BYTES = 2 * 2**30
# Working memory of one lane of the engine, in units of L·d float64 (solver stages, the
# geometry's gaps, the dense output of the step that crossed a threshold).
_LANE_WORDS = 32
JOB_DIMS = ("depth", "problem", "shape", "alpha", "seed")
CUSTOM_DIMS = ("depth", "problem", "init")


def as_spec(spec) -> SweepSpec:
    if isinstance(spec, SweepSpec):
        return spec
    if isinstance(spec, dict):
        return SweepSpec.from_dict(spec)
    if isinstance(spec, (str, Path)):
        return SweepSpec.load(spec)
    raise TypeError(f"`spec` must be a SweepSpec, a dict or a path to a TOML file, got {type(spec).__name__}")


def run_dims(spec: SweepSpec) -> tuple[str, ...]:
    """The dimensions that label the runs of a sweep's dataset."""
    return CUSTOM_DIMS if spec.init.scheme == "custom" else JOB_DIMS


def _versions():
    out = {}
    for pkg in ("ddln_jax", "jax", "jaxlib", "diffrax", "equinox", "xarray", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover
            out[pkg] = "unknown"
    return out


def _fingerprint(tree) -> str:
    """A hash of a loss (or any pytree) that is the same in every process: array bytes, and
    for functions their qualified name and bytecode (not their memory address)."""
    h = hashlib.sha256()
    leaves, treedef = jax.tree_util.tree_flatten(tree)

    def describe(x):
        if isinstance(x, jax.tree_util.Partial):
            x = x.func
        if callable(x) and hasattr(x, "__code__"):
            return f"{x.__module__}.{x.__qualname__}:{x.__code__.co_code.hex()}"
        return type(x).__qualname__ if callable(x) else repr(x)

    h.update(type(tree).__qualname__.encode())
    for leaf in leaves:
        if isinstance(leaf, (np.ndarray, jax.Array, np.generic, float, int)):
            a = np.asarray(leaf)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
        else:
            h.update(describe(leaf).encode())
    for field in getattr(tree, "__dataclass_fields__", {}):  # static fields (functions, sizes)
        value = getattr(tree, field, None)
        if not isinstance(value, (np.ndarray, jax.Array)):
            h.update(f"{field}={describe(value)}".encode())
    return h.hexdigest()[:16]


# -- inputs ----------------------------------------------------------------------------------


class _Inputs:
    """What a sweep runs: the problems, the inits of every depth (built and sorted once) and
    the digest under which its results are stored."""

    def __init__(self, spec: SweepSpec, loss, inits):
        self.spec = spec
        custom_p, custom_i = spec.problem.kind == "custom", spec.init.scheme == "custom"
        if (loss is not None) != custom_p:
            raise SpecError(
                f"{spec.source}: [problem] kind: a loss given to `sweep(..., loss=...)` needs "
                f"kind = 'custom' in the spec, and kind = 'custom' needs the loss (got kind "
                f"{spec.problem.kind!r} and loss={'given' if loss is not None else 'None'})"
            )
        if (inits is not None) != custom_i:
            raise SpecError(
                f"{spec.source}: [init] scheme: inits given to `sweep(..., inits=...)` need "
                f"scheme = 'custom' in the spec, and scheme = 'custom' needs the inits (got "
                f"scheme {spec.init.scheme!r} and inits={'given' if inits is not None else 'None'})"
            )
        extra = {}
        self.custom_inits = None
        if custom_i:
            self.custom_inits = _custom_inits(spec, inits)
            extra["inits"] = _fingerprint(self.custom_inits)
        if custom_p:
            loss = as_loss(loss)
            extra["loss"] = _fingerprint(loss)
            fn = getattr(loss, "fn", None)
            if isinstance(loss, CallableLoss) and not any(eqx.is_array(x) for x in jax.tree_util.tree_leaves(fn)):
                # A plain function is no array: carried in the tree structure (as a
                # `Partial`), so that the engine's data holds arrays only.
                loss = CallableLoss(jax.tree_util.Partial(fn), loss.dim)
        self.loss = loss
        self.d = self._dimension()
        self.digest = spec.digest()
        if extra:
            self.digest = hashlib.sha256(
                json.dumps([self.digest, extra], sort_keys=True).encode()).hexdigest()[:16]
        self.extra = extra

    def _dimension(self) -> int:
        spec = self.spec
        if self.custom_inits is not None:
            d = next(iter(self.custom_inits.values())).shape[-1]
        elif spec.problem.kind == "custom":
            d = self.loss.dim
            if d is None:
                raise ValueError("the custom loss does not know its dimension: give it one "
                                 "(e.g. CallableLoss(f, dim=d)) or give the inits")
        else:
            d = spec.problem.d
        if spec.problem.kind == "custom" and self.loss.dim is not None and self.loss.dim != d:
            raise ValueError(f"the loss has dimension {self.loss.dim}, the inits {d}")
        if spec.problem.kind != "custom" and self.custom_inits is not None and spec.problem.d != d:
            raise ValueError(f"the problem has dimension d = {spec.problem.d}, the inits {d}")
        return int(d)

    def runs_per_depth(self, L: int) -> int:
        if self.custom_inits is not None:
            return self.custom_inits[L].shape[0]
        return len(self.spec.jobs())

    def problems(self) -> list[Problem]:
        if self.spec.problem.kind == "custom":
            return [custom_problem(self.loss, self.d)]
        return [make_problem(self.spec.problem, s) for s in self.spec.problem.seeds]

    def inits(self, L: int) -> np.ndarray:
        """The inits of depth L, (B, L, d), in the dataset's run order."""
        if self.custom_inits is not None:
            return self.custom_inits[L]
        spec, d = self.spec, self.d
        scheme = spec.init.scheme
        if spec.model.kind == "signed":
            out = np.empty((len(spec.jobs()), 2, L, d))
            for j, (shape, alpha, seed) in enumerate(spec.jobs()):
                if scheme == "gaussian":
                    key = jax.random.fold_in(jax.random.PRNGKey(seed), L)
                    u = np.array(signed_gaussian_init(key, L, d, alpha))
                    u[:, 0] *= shape  # the first layer of each half, as for the product model
                else:
                    u = np.asarray(_SIGNED_INITS[scheme](L, d, alpha, shape))
                out[j] = u
            return out
        out = np.empty((len(spec.jobs()), L, d))
        for j, (shape, alpha, seed) in enumerate(spec.jobs()):
            if scheme == "gaussian":
                # One key per (seed, depth): an α grid of one seed rescales one draw.
                key = jax.random.fold_in(jax.random.PRNGKey(seed), L)
                u = gaussian_init(key, L, d, alpha)
            else:
                u = INIT_SCHEMES[scheme](L, d, alpha)
            out[j] = np.asarray(u)
            out[j, 0] *= shape
        return out


def _custom_inits(spec, inits) -> dict[int, np.ndarray]:
    """`inits` as {depth: array (B, L, d)}: an array (B, L, d) is one depth."""
    if not isinstance(inits, dict):
        if isinstance(inits, (str, bytes)):
            raise TypeError(f"`inits` must be an array (B, L, d) or a dict {{L: (B, L, d)}}, got {type(inits).__name__}")
        arr = np.asarray(inits)
        if arr.ndim != 3:
            raise ValueError(f"`inits` must be an array (B, L, d) or a dict {{L: (B, L, d)}}, got shape {arr.shape}")
        inits = {int(arr.shape[1]): arr}
    out = {}
    for L, u in inits.items():
        if isinstance(u, (str, bytes)):
            raise TypeError(f"`inits[{L}]` must be an array (B, L, d), got {type(u).__name__}")
        u = np.asarray(u)
        if np.iscomplexobj(u) or u.dtype == object or not np.issubdtype(u.dtype, np.number):
            raise TypeError(f"`inits[{L}]` must hold real numbers, got dtype {u.dtype}")
        if u.ndim != 3 or u.shape[0] < 1 or u.shape[1] != L or u.shape[2] < 1:
            raise ValueError(f"`inits[{L}]` must have shape (B ≥ 1, {L}, d ≥ 1), got {u.shape}")
        if not np.all(np.isfinite(u)):
            raise ValueError(f"`inits[{L}]` must be finite")
        out[int(L)] = np.ascontiguousarray(u, np.float64)
    if sorted(out) != sorted(spec.run.depths):
        raise SpecError(f"{spec.source}: [run] depths: the inits are given for depths "
                        f"{sorted(out)}, the spec lists {list(spec.run.depths)}")
    ds = {u.shape[2] for u in out.values()}
    if len(ds) != 1:
        raise ValueError(f"the inits of every depth must have one width d, got {sorted(ds)}")
    return out


# -- sizes -----------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _device_memory(device) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory statistics
        return None
    return (stats or {}).get("bytes_limit")


def footprint(spec: SweepSpec, inputs: _Inputs, n_devices: int, out) -> dict[str, int]:
    """Bytes a sweep needs, estimated from its sizes before anything is allocated."""
    d, n_save = inputs.d, len(spec.run.save_times)
    depths = spec.run.depths
    runs = {L: inputs.runs_per_depth(L) for L in depths}
    total = sum(runs.values()) * len(spec.problem.seeds)
    rows = spec.problem.n if spec.problem.kind in ("sparse_regression", "logistic", "data") else 0
    n_save *= max(1, len(spec.run.learning_rates))  # discrete runs: θ(t) per learning rate
    keep_theta = 8 * total * n_save * d <= _THETA_BYTES
    per_run = n_save * (d + 3) * 8
    chunk = max(1, min(spec.engine.chunk_size, _CHUNK_BYTES // max(1, 8 * n_save * d)))
    size = min(chunk, max(runs.values()))
    lanes = lanes_for(spec.engine.lanes, size, n_devices)
    return {
        "one run's saved θ(t)": 8 * n_save * d,
        "problem data": 8 * rows * d * len(spec.problem.seeds) * 3,
        "inits": 8 * sum(runs[L] * L for L in depths) * d * (2 if spec.model.kind == "signed" else 1),
        "engine (per device)": lanes * _LANE_WORDS * max(depths) * d * 8 + size * per_run,
        "dataset in memory": total * (n_save * (3 + (d if keep_theta else 0)) + 2 * d + 16) * 8,
        "disk": total * (per_run + 2 * d * 8) if out is not None else 0,
    }


def _check_footprint(spec, inputs, devices, out) -> None:
    need = footprint(spec, inputs, len(devices), out)
    one_run = need["one run's saved θ(t)"]
    if one_run > _CHUNK_BYTES:
        raise SpecError(
            f"{spec.source}: [run] one run's θ(t) at {len(spec.run.save_times)} save times × d = "
            f"{inputs.d} takes {_gib(one_run)}, more than the "
            f"{_gib(_CHUNK_BYTES)} a chunk may hold: save fewer times"
        )
    host = need["problem data"] + need["inits"] + need["dataset in memory"]
    dev_mem = _device_memory(devices[0])
    if dev_mem is None:  # the host is the device
        host += need["engine (per device)"] * len(devices)
    elif need["engine (per device)"] > dev_mem:
        raise SpecError(
            f"{spec.source}: this sweep's engine needs about {_gib(need['engine (per device)'])} "
            f"per device (depth {max(spec.run.depths)}, d = {inputs.d}, lanes), the device has "
            f"{_gib(dev_mem)}: use fewer lanes, smaller depths or a smaller d"
        )
    avail = _available_memory()
    if host > avail:
        parts = ", ".join(f"{k} {_gib(v)}" for k, v in need.items() if k != "disk" and v)
        raise SpecError(
            f"{spec.source}: this sweep would need about {_gib(host)} of memory ({parts}); "
            f"{_gib(avail)} is available: split it into smaller sweeps"
        )
    if out is not None:
        path = Path(out)
        while not path.exists() and path != path.parent:
            path = path.parent
        try:
            free = shutil.disk_usage(path).free
        except OSError:
            free = None
        if free is not None and need["disk"] > free:
            raise SpecError(
                f"{spec.source}: this sweep's results take about {_gib(need['disk'])} on disk, "
                f"{_gib(free)} is free under {str(path)!r}"
            )


# -- the plan of runs ------------------------------------------------------------------------


class _Depth:
    """The runs of one depth: inits (in run order), their order hardest first, the chunks."""

    def __init__(self, L, inits, chunk, model=None):
        self.L = L
        self.inits = inits
        self.order = np.argsort(-difficulty(inits), kind="stable")
        self.chunks = [self.order[i : i + chunk] for i in range(0, len(self.order), chunk)]
        if isinstance(model, SignedModel):
            self.theta0 = np.asarray(model.theta(inits))
            # c0 of the equivalent product problem, layers [+ half | − half] (L, 2d).
            self.c0 = np.asarray(theory_c0(np.asarray(model.as_product(inits))))
        else:
            self.theta0 = np.prod(inits, axis=1)
            self.c0 = np.asarray(theory_c0(inits))


def _chunk_name(L, p_seed, idx) -> str:
    """A name from the runs a chunk holds: the same chunk has the same name in every shard
    and process, and chunks of different chunkings never collide."""
    key = hashlib.sha1(np.sort(np.asarray(idx, np.int64)).tobytes()).hexdigest()[:12]
    return f"L{L}_p{p_seed}_{key}"


def _problems_dataset(spec, problems: list[Problem], f_star, pl) -> xr.Dataset:
    data = {
        "theta_star": (("problem", "coord"), np.stack([p.theta_star for p in problems])),
        "theta_min": (("problem", "coord"), np.stack([p.theta_min for p in problems])),
        "f_star": (("problem",), np.array([np.nan if f is None else f for f in f_star], float)),
        "pl_mu": (("problem",), np.array([np.nan if m is None else m for m in pl], float)),
    }
    if all(p.X is not None for p in problems):
        data["X"] = (("problem", "row", "coord"), np.stack([p.X for p in problems]))
        data["y"] = (("problem", "row"), np.stack([p.y for p in problems]))
    seeds = list(spec.problem.seeds) if spec.problem.kind != "custom" else [0]
    return xr.Dataset(data, coords={"problem": seeds})


def _labels(spec, inputs, L, idx) -> dict:
    idx = np.asarray(idx)
    if spec.init.scheme == "custom":
        return {"init": ("run", idx.astype(np.int64))}
    jobs = spec.jobs()
    return {
        "shape": ("run", np.array([jobs[i][0] for i in idx], float)),
        "alpha": ("run", np.array([jobs[i][1] for i in idx], float)),
        "seed": ("run", np.array([jobs[i][2] for i in idx], np.int64)),
    }


def _chunk_dataset(spec, inputs, L, p_seed, idx, out, stats, f0, c0, bregman) -> xr.Dataset:
    status = np.asarray(out.status).astype(np.int32)
    t_final = np.asarray(out.t_final)
    data = {
        "job": ("run", np.asarray(idx, np.int64)),
        "depth": ("run", np.full(len(idx), L, np.int64)),
        "problem": ("run", np.full(len(idx), p_seed, np.int64)),
        **_labels(spec, inputs, L, idx),
        "status": ("run", status),
        "steps": ("run", np.asarray(out.steps).astype(np.int64)),
        "rejected_steps": ("run", np.asarray(out.rejected).astype(np.int64)),
        "t_final": ("run", t_final),
        "time_to_eps": ("run", np.where(status == EVENT, t_final, np.nan)),
        "loss_final": ("run", np.asarray(out.loss_final)),
        "f0": ("run", f0),
        "c0": ("run", c0),
        "conservation_drift": ("run", np.asarray(out.drift)),
        "loss": (("run", "time"), np.asarray(out.loss)),
        "theta": (("run", "time", "coord"), np.asarray(out.theta)),
        "theta_final": (("run", "coord"), np.asarray(out.theta_final)),
    }
    if bregman:
        data["bregman"] = (("run", "time"), np.asarray(out.bregman))
    ds = xr.Dataset(data, coords={"time": spec.save_times})
    ds.attrs.update({
        "lane_steps_executed": int(stats["lane_steps_executed"]),
        "lane_steps_useful": int(stats["lane_steps_useful"]),
    })
    return ds


# -- the sweep -------------------------------------------------------------------------------


def _as_shard(shard) -> tuple[int, int] | None:
    if shard is None:
        return None
    if isinstance(shard, str):
        try:
            i, n = (int(x) for x in shard.split("/"))
        except ValueError:
            raise ValueError(f"`shard` must look like 'i/N' (e.g. 0/4), got {shard!r}") from None
        shard = (i, n)
    if (not isinstance(shard, tuple) or len(shard) != 2
            or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in shard)):
        raise TypeError(f"`shard` must be (i, N) or 'i/N', got {shard!r}")
    i, n = int(shard[0]), int(shard[1])
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"`shard` i/N needs N ≥ 1 and 0 ≤ i < N, got {i}/{n}")
    return i, n


def _devices(spec, devices, distributed):
    if devices is not None:
        devices = list(devices)
        if not devices:
            raise ValueError("`devices` must hold at least one device")
        return devices
    devices = jax.local_devices() if distributed else jax.devices()
    if spec.engine.devices != "all":
        if spec.engine.devices > len(devices):
            raise SpecError(f"{spec.source}: [engine] devices: {spec.engine.devices} requested, "
                            f"{len(devices)} available")
        devices = devices[: spec.engine.devices]
    return devices


def sweep(spec, out=None, *, loss=None, inits=None, progress: bool = True, devices=None,
          shard=None) -> xr.Dataset | None:
    """Run a sweep of initializations × depths × problems (host-side driver).

    **Arguments:**

    - `spec`: a [`ddln_jax.SweepSpec`][], a dict, or the path of a TOML spec (see
      `ddln_jax/_spec.py` for the keys; `SweepSpec.default()` is `ddln sweep`'s).
    - `out`: a results directory. Finished chunks are written there as they complete; a rerun
      with the same spec resumes (a finished sweep is just loaded, read-only access suffices),
      a different spec is refused. Without it the sweep runs in memory.
    - `loss`: a loss in memory (an `AbstractLoss` or a callable f(θ)); the spec must say
      `[problem] kind = "custom"`. Its arrays (and a function's bytecode) enter the digest.
    - `inits`: inits in memory, an array (B, L, d) or a dict {L: array (B, L, d)}; the spec
      must say `[init] scheme = "custom"` and list the same depths. The runs are then labelled
      `init` = 0…B−1 instead of `shape`, `alpha`, `seed`.
    - `progress`: show a progress bar over runs, with an ETA.
    - `devices`: the devices to shard the lanes over (default from the spec: all; under
      `jax.distributed`, each process's own).
    - `shard`: `(i, N)` or `"i/N"`: compute only chunk k with k mod N = i (Slurm job arrays:
      N jobs write into one `out` together). The shard that finds every run done assembles.

    **Returns:** an `xarray.Dataset` with dimensions `depth`, `problem`, `shape`, `alpha`,
    `seed` (or `init`), `time`, `coord` (and `row` for the data): `loss`, `theta`, `bregman`
    (when defined), `theta_final`, `time_to_eps`, `status`, `steps`, `t_final`, `f0`, `c0`,
    `conservation_drift`, the problems (`X`, `y`, `theta_star`, `theta_min`, `f_star`,
    `pl_mu`); attributes hold the spec, the model, the method, the package versions and engine
    statistics. Discrete runs (`[run] method = "gd"`, ...) add a `learning_rate` dimension, the
    `time` axis holds the saved steps k and the coordinate `t` = k·η; `[run] sensitivities =
    ["alpha"]` adds `dtheta_dalpha`, `dloss_dalpha`, `dtheta_final_dalpha` and
    `dtime_to_eps_dalpha`. A shard that did not complete the sweep returns None.

    **Raises:** `SpecError` (the spec, or sizes past this machine), `StoreError` (the
    directory), `ValueError`/`TypeError` (the arguments) — all before anything is compiled.
    """
    spec = as_spec(spec)
    if not jax.config.read("jax_enable_x64"):
        raise ValueError(
            "sweeps run in float64: call `jax.config.update('jax_enable_x64', True)` first "
            "(the `ddln` command does)"
        )
    shard = _as_shard(shard)
    if shard is not None and out is None:
        raise ValueError("`shard` splits a sweep over jobs that share an output directory: give `out`")
    distributed = jax.process_count() > 1
    if distributed and shard is not None:
        raise ValueError("`shard` and jax.distributed are two ways to split a sweep: use one")
    inputs = _Inputs(spec, loss, inits)
    store = None
    if out is not None:
        payload = {**spec.to_dict(), "in_memory_inputs": inputs.extra}
        store = ResultStore(out, inputs.digest, payload)
        final = store.load_final()
        if final is not None:
            return final
    devices = _devices(spec, devices, distributed)
    _check_footprint(spec, inputs, devices, out)
    writer = jax.process_index() == 0
    opened = None
    if store is not None and writer:
        try:
            store.open(shared=shard is not None)
        except Exception as e:  # noqa: BLE001 - told to the other processes, then raised
            opened = e
    if distributed:
        _agree_or_raise(opened)
    elif opened is not None:
        raise opened
    try:
        return _run(spec, inputs, store if writer else None, out, devices, progress, shard)
    finally:
        if store is not None:
            store.close()


def _agree_or_raise(error) -> None:
    from jax.experimental import multihost_utils

    flag = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if error is not None:
        raise error
    if int(flag):
        raise StoreError("process 0 could not open the results directory (see its error)")


def _run(spec, inputs, store, out, devices, progress, shard):
    problems = inputs.problems()
    losses = [p.loss() for p in problems]
    f_star = [lo.minimum() for lo in losses]
    pl = [lo.pl_constant() for lo in losses]
    p_seeds = [0] if spec.problem.kind == "custom" else list(spec.problem.seeds)
    d, n_save = inputs.d, len(spec.run.save_times)
    model = as_model(spec.model.name)
    signed = isinstance(model, SignedModel)
    discrete = spec.run.method != "flow"
    n_lr = max(1, len(spec.run.learning_rates))  # discrete runs: every η of an init in one chunk
    sens = bool(spec.run.sensitivities)
    if jax.process_count() > 1 and (discrete or sens):
        raise ValueError("discrete methods and sensitivities run in one process: not under jax.distributed")
    chunk = max(1, min(spec.engine.chunk_size, _CHUNK_BYTES // (8 * n_save * d * n_lr * (2 if sens else 1))))
    depths = {L: _Depth(L, inputs.inits(L), chunk, model) for L in spec.run.depths}
    for L, dep in depths.items():
        if signed:
            break  # θ0 = θ⁺ − θ⁻ = 0 is the signed model's usual init, not an underflow
        # θ0 = u¹⊙…⊙u^L of nonzero layers that is 0 in float64: the product underflowed.
        under = (dep.theta0 == 0) & np.all(dep.inits != 0, axis=1)
        if under.all():
            raise SpecError(
                f"{spec.source}: [run] depths: at depth {L} the product θ0 = u¹⊙…⊙u^L of every "
                f"init underflows to 0 in float64 (|θ0| ≈ α^L): raise α or lower the depth")
    form = model.formulation(spec.run.formulation)
    holds = all(bool(np.all(dep.c0 > 0)) for dep in depths.values())
    if signed and form.needs_assumption_a:
        for L, dep in depths.items():
            try:
                check_signed_geometry(dep.inits, "the inits", f"formulation {spec.run.formulation!r}")
            except ValueError as e:
                raise SpecError(f"{spec.source}: [init] at depth {L}: {e}; use 'reduced'") from e
    elif not holds and form.needs_assumption_a and not discrete:
        L, j = next((L, int(np.flatnonzero(dep.c0 <= 0)[0])) for L, dep in depths.items() if np.any(dep.c0 <= 0))
        what = f"init {j}" if spec.init.scheme == "custom" else f"the {spec.init.scheme!r} init (α={spec.jobs()[j][1]:g}, shape={spec.jobs()[j][0]:g})"
        raise SpecError(f"{spec.source}: [init]: {what} at depth {L} violates Assumption A, which "
                        f"formulation {spec.run.formulation!r} needs; use 'reduced'")
    theta_min = [np.nan_to_num(p.theta_min) for p in problems]
    if signed or discrete:
        bregman, note = False, f"not recorded: {'discrete runs' if discrete else 'the signed model'}"
    elif spec.problem.kind == "logistic":
        bregman, note = False, "not recorded: logistic loss has no minimizer"
    elif not all(np.all(np.isfinite(p.theta_min)) for p in problems):
        bregman, note = False, "not recorded: no known minimizer of the loss"
    elif not holds:
        bregman, note = False, "not recorded: some inits violate Assumption A (Q undefined)"
    else:
        bregman, note = True, "D_Q(theta_min, theta(t))"
    # f(θ0) and the stop thresholds, once per (depth, problem); f* straight from the losses.
    ratio = spec.run.stop_ratio or 0.0
    f0, targets = {}, {}
    for L, dep in depths.items():
        for p, lo in enumerate(losses):
            v = np.asarray(jax.vmap(lo)(jnp.asarray(dep.theta0)), np.float64)
            if not np.all(np.isfinite(v)):
                j = int(np.flatnonzero(~np.isfinite(v))[0])
                raise SpecError(f"{spec.source}: [init]: f(θ0) is not finite for run {j} of depth {L} "
                                f"(f(θ0) = {v[j]}): α, the depth or the data's scale overflow float64")
            fs = f_star[p] if f_star[p] is not None and np.isfinite(f_star[p]) else 0.0
            f0[L, p], targets[L, p] = v, fs + ratio * (v - fs)
    problems_ds = _problems_dataset(spec, problems, f_star, pl)
    keep_theta = 8 * sum(inputs.runs_per_depth(L) for L in depths) * len(problems) * n_save * d * n_lr <= _THETA_BYTES
    if not keep_theta and store is None and out is None:
        raise ValueError(
            f"this sweep's θ(t) takes more than {_gib(_THETA_BYTES)}: give an output directory, "
            "where it is kept chunk by chunk (`load_trajectories` reads it back)"
        )
    size = min(chunk, max(len(dep.inits) for dep in depths.values()))
    lanes = lanes_for(spec.engine.lanes, size, len(devices))
    config = EngineConfig(formulation=form, solver=SOLVERS[spec.run.solver](), lanes=lanes,
                          n_save=n_save, stop=spec.run.stop_ratio is not None, bregman=bregman,
                          round_steps=2000)
    total = sum(len(dep.inits) for dep in depths.values()) * len(problems)
    # Chunks first: another spec's chunks are refused before this spec's files are written.
    found = store.scan() if store is not None else {}
    if store is not None:
        store.begin(problems_ds)
    planned = [(L, p, idx) for L, dep in depths.items() for p in range(len(problems)) for idx in dep.chunks]
    done = _done_jobs(found)
    missing = [idx[~np.isin(idx, list(done.get((L, p_seeds[p]), ())))] for L, p, idx in planned]
    bar = _progress(total, progress)
    pieces = dict(found)

    def compute(k):
        L, p, _ = planned[k]
        idx = missing[k]
        dep = depths[L]
        seen = [0]
        if discrete:
            res = _train_chunk(spec, losses[p], dep.inits[idx])
            bar.update(len(idx))
            return _discrete_dataset(spec, L, p_seeds[p], idx, inputs, res, f0[L, p][idx], dep.c0[idx])

        def on_jobs(n):
            bar.update(n - seen[0])
            seen[0] = n

        tangent = _alpha_tangent(spec, model, losses[p], dep.inits[idx], idx) if sens else None
        res = run_queue(
            config, losses[p], dep.inits[idx], targets[L, p][idx], ts=spec.save_times,
            t1=spec.run.t1, rtol=spec.run.rtol, atol=spec.run.atol, max_steps=spec.run.max_steps,
            theta_star=theta_min[p], devices=devices[:1] if sens else devices, size=size,
            on_jobs=on_jobs, tangent=tangent)
        res, dres, stats = res if sens else (res[0], None, res[1])
        bar.update(len(idx) - seen[0])
        ds = _chunk_dataset(spec, inputs, L, p_seeds[p], idx, res, stats, f0[L, p][idx],
                            dep.c0[idx], bregman)
        if dres is not None:
            ds = _with_sensitivities(ds, res, dres)
        return ds

    try:
        bar.update(total - sum(len(m) for m in missing))
        if jax.process_count() > 1:
            empty = types.SimpleNamespace(
                status=np.zeros(0, np.int32), t_final=np.zeros(0), steps=np.zeros(0, np.int64),
                rejected=np.zeros(0, np.int64), loss_final=np.zeros(0), drift=np.zeros(0),
                loss=np.zeros((0, n_save)), theta=np.zeros((0, n_save, d)),
                theta_final=np.zeros((0, d)), bregman=np.zeros((0, n_save)))
            template = _chunk_dataset(spec, inputs, 0, 0, np.zeros(0, np.int64), empty,
                                      {"lane_steps_executed": 0, "lane_steps_useful": 0},
                                      np.zeros(0), np.zeros(0), bregman)
            _run_distributed(planned, missing, compute, store, pieces, p_seeds, chunk, bar, template)
        else:
            for k, (L, p, _) in enumerate(planned):
                if len(missing[k]) == 0 or (shard is not None and k % shard[1] != shard[0]):
                    continue
                ds = compute(k)
                name = _chunk_name(L, p_seeds[p], missing[k])
                if store is not None:
                    store.write_chunk(name, ds)
                pieces[name] = ds
    finally:
        bar.close()
    if shard is not None and store is not None:
        pieces = store.scan(repair=False)  # the other shards' chunks too
    distributed = jax.process_count() > 1
    if distributed and out is not None and store is None:
        # Process 0 holds every chunk and writes the dataset; the others read it back.
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("ddln_jax sweep: results written")
        return load_dataset(Path(out) / "results.nc")
    runs = _unique_runs(pieces, keep_theta)
    if sum(r.sizes["run"] for r in runs) < total:
        return None  # a shard whose sweep is not complete yet
    result = _assemble(spec, runs, problems_ds, pieces, note, devices, inputs)
    if discrete:
        # Discrete time t = k·η: one row of times per learning rate.
        k = result["time"].values
        eta = result["learning_rate"].values
        result = result.assign_coords(t=(("learning_rate", "time"), eta[:, None] * k[None, :]))
    result.attrs["theta_trajectories"] = (
        "in this dataset" if keep_theta else "in the chunk files only (too large to assemble); "
        "read them with ddln_jax.load_trajectories"
    )
    if store is not None:
        store.write_final(result)
    if distributed and out is not None:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("ddln_jax sweep: results written")
    return result


def _alpha_tangent(spec, model, loss, U, idx):
    """The engine's tangent inputs for d/dα: du0 = u0/α (every scheme of a spec scales
    linearly with α) and the threshold's derivative ε·d f(θ0)/dα (f* does not move)."""
    jobs = spec.jobs()
    alpha = np.array([jobs[i][1] for i in idx], float)
    du0 = U / alpha.reshape(-1, *([1] * (U.ndim - 1)))
    f0 = jax.vmap(lambda u: loss(model.theta(u)))
    df0 = np.asarray(jax.jvp(f0, (jnp.asarray(U),), (jnp.asarray(du0),))[1])
    return du0, (spec.run.stop_ratio or 0.0) * df0


def _with_sensitivities(ds, out, dout) -> xr.Dataset:
    status = np.asarray(out.status)
    # Save times after a stop record no θ (NaN): nor its derivative (the engine's tangent is 0).
    theta = np.asarray(out.theta)
    return ds.assign({
        "dtheta_dalpha": (("run", "time", "coord"), np.where(np.isnan(theta), np.nan, np.asarray(dout.theta))),
        "dloss_dalpha": (("run", "time"), np.where(np.isnan(np.asarray(out.loss)), np.nan, np.asarray(dout.loss))),
        "dtheta_final_dalpha": (("run", "coord"), np.asarray(dout.theta_final)),
        # The time to ε moves with α only for runs that reached ε.
        "dtime_to_eps_dalpha": ("run", np.where(status == EVENT, np.asarray(dout.t_final), np.nan)),
    })


def _save_steps(spec) -> np.ndarray:
    """The steps of a discrete run saved: the spec's save times as fractions of t1, rounded."""
    return np.rint(spec.save_times / spec.run.t1 * spec.run.steps).astype(np.int64)


def _train_chunk(spec, loss, U) -> dict:
    from ._discrete import train_runs

    return train_runs(loss, U, np.asarray(spec.run.learning_rates, float), spec.run.steps,
                      _save_steps(spec), method=spec.run.method)


def _discrete_dataset(spec, L, p_seed, idx, inputs, res, f0, c0) -> xr.Dataset:
    """A chunk of discrete runs: every learning rate of each init (dimension `learning_rate`)."""
    n = len(idx)
    lr = np.asarray(res["learning_rate"], float)
    status = np.swapaxes(np.asarray(res["status"]), 0, 1).astype(np.int32)
    data = {
        "job": ("run", np.asarray(idx, np.int64)),
        "depth": ("run", np.full(n, L, np.int64)),
        "problem": ("run", np.full(n, p_seed, np.int64)),
        **_labels(spec, inputs, L, idx),
        "status": (("run", "learning_rate"), status),
        "steps": ("run", np.full(n, spec.run.steps, np.int64)),
        "t_final": (("run", "learning_rate"), np.broadcast_to(spec.run.steps * lr, (n, len(lr))).copy()),
        "time_to_eps": ("run", np.full(n, np.nan)),
        "diverged_step": (("run", "learning_rate"), np.swapaxes(np.asarray(res["diverged_step"]), 0, 1).astype(np.int64)),
        "stable_learning_rate": ("run", np.asarray(res["stable_learning_rate"], float).reshape(n)),
        "loss_final": (("run", "learning_rate"), np.swapaxes(np.asarray(res["loss_final"]), 0, 1)),
        "f0": ("run", f0),
        "c0": ("run", c0),
        "loss": (("run", "learning_rate", "time"), np.swapaxes(np.asarray(res["loss"]), 0, 1)),
        "theta": (("run", "learning_rate", "time", "coord"), np.swapaxes(np.asarray(res["theta"]), 0, 1)),
        "theta_final": (("run", "learning_rate", "coord"), np.swapaxes(np.asarray(res["theta_final"]), 0, 1)),
    }
    ds = xr.Dataset(data, coords={"time": _save_steps(spec), "learning_rate": lr})
    ds.attrs.update({"lane_steps_executed": 0, "lane_steps_useful": 0})
    return ds


def _done_jobs(found: dict) -> dict:
    done = {}
    for ds in found.values():
        for L, p, j in zip(ds["depth"].values, ds["problem"].values, ds["job"].values):
            done.setdefault((int(L), int(p)), set()).add(int(j))
    return done


def _unique_runs(pieces: dict, keep_theta: bool) -> list[xr.Dataset]:
    """Every run once (chunks of different chunkings may overlap), in chunk-name order."""
    seen, out = set(), []
    for name in sorted(pieces):
        ds = pieces[name]
        keys = list(zip(ds["depth"].values.tolist(), ds["problem"].values.tolist(), ds["job"].values.tolist()))
        keep = [i for i, key in enumerate(keys) if key not in seen]
        seen.update(keys)
        if keep:
            part = ds.isel(run=keep)
            out.append(part if keep_theta else part.drop_vars("theta"))
    return out


def _run_distributed(planned, missing, compute, store, pieces, p_seeds, chunk, bar, template):
    """Every process computes its share of the chunks on its own devices; process 0 gathers
    them (fixed-size buffers through `process_allgather`) and writes them."""
    from jax.experimental import multihost_utils

    n, me = jax.process_count(), jax.process_index()
    # Process 0 read the directory: every process follows its list of what is missing.
    mask = np.zeros((len(planned), chunk), bool)
    for k, m in enumerate(missing):
        pos = np.flatnonzero(np.isin(planned[k][2], m))
        mask[k, pos] = True
    mask = np.asarray(multihost_utils.broadcast_one_to_all(mask))
    todo = [k for k in range(len(planned)) if mask[k].any()]
    for k in todo:
        missing[k] = planned[k][2][mask[k, : len(planned[k][2])]]
    for r in range(0, len(todo), n):
        batch = todo[r : r + n]
        mine = compute(batch[me]) if me < len(batch) else None
        packed = multihost_utils.process_allgather(_pack(mine, template, chunk))
        for q, k in enumerate(batch):
            ds = _unpack(packed, q, template)
            L, p, _ = planned[k]
            name = _chunk_name(L, p_seeds[p], missing[k])
            if store is not None:
                store.write_chunk(name, ds)
            pieces[name] = ds
            if q != me:
                bar.update(ds.sizes["run"])


def _pack(ds, template, chunk) -> dict:
    out = {"n": np.int64(0 if ds is None else ds.sizes["run"]),
           "executed": np.int64(0 if ds is None else ds.attrs["lane_steps_executed"]),
           "useful": np.int64(0 if ds is None else ds.attrs["lane_steps_useful"])}
    for name, var in template.data_vars.items():
        buf = np.zeros((chunk, *var.shape[1:]), var.dtype)
        if ds is not None:
            buf[: ds.sizes["run"]] = ds[name].values
        out[name] = buf
    return out


def _unpack(packed, q, template) -> xr.Dataset:
    n = int(packed["n"][q])
    data = {name: (var.dims, np.asarray(packed[name][q][:n])) for name, var in template.data_vars.items()}
    ds = xr.Dataset(data, coords=template.coords)
    ds.attrs.update({"lane_steps_executed": int(packed["executed"][q]),
                     "lane_steps_useful": int(packed["useful"][q])})
    return ds


def load_trajectories(out, **selection) -> xr.DataArray:
    """θ(t) of the runs of a sweep directory matching `selection` (e.g. `depth=3,
    alpha=0.5`), read chunk by chunk: for sweeps too large to hold θ(t) in memory at once.
    Host-side; damaged chunks are reported and skipped.

    **Returns:** a DataArray with the run dimensions of the selection, `time` and `coord`.
    """
    root = Path(out)
    spec_file = root / "spec.json"
    try:
        digest = json.loads(spec_file.read_text("utf-8"))["digest"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StoreError(f"{str(root)!r} holds no readable spec.json ({e})") from e
    pieces = ResultStore(root, digest, {}).scan(repair=False)
    if not pieces:
        raise StoreError(f"{str(root)!r} holds no sweep chunks")
    dims = CUSTOM_DIMS if "init" in next(iter(pieces.values())) else JOB_DIMS
    unknown = set(selection) - set(dims)
    if unknown:
        raise ValueError(f"selection keys must be among {dims}, got {sorted(unknown)}")
    parts = []
    for ds in _unique_runs(pieces, True):
        mask = np.ones(ds.sizes["run"], bool)
        for key, value in selection.items():
            mask &= np.isin(ds[key].values, np.atleast_1d(value))
        if mask.any():
            parts.append(ds[["theta", *dims]].isel(run=np.flatnonzero(mask)))
    if not parts:
        raise ValueError(f"no run of {str(root)!r} matches {selection}")
    flat = xr.concat(parts, dim="run").set_index(run=list(dims)).unstack("run")
    return flat["theta"].transpose(*[d for d in (*dims, "learning_rate", "time", "coord") if d in flat["theta"].dims])


def _assemble(spec, runs, problems_ds, pieces, bregman_note, devices, inputs) -> xr.Dataset:
    dims = run_dims(spec)
    flat = xr.concat(runs, dim="run", combine_attrs="drop").drop_vars("job")
    flat = flat.set_index(run=list(dims)).unstack("run")
    if spec.init.scheme == "custom":
        flat = flat.reindex(depth=list(spec.run.depths), problem=[0],
                            init=list(range(max(inputs.runs_per_depth(L) for L in spec.run.depths))))
    else:
        flat = flat.reindex(
            depth=list(spec.run.depths), problem=list(spec.problem.seeds), shape=list(spec.init.shape),
            alpha=list(spec.init.alpha),
            seed=list(spec.init.seeds if spec.init.scheme == "gaussian" else spec.init.seeds[:1]),
        )
    order = [*dims, "learning_rate", "time", "coord"]
    flat = flat.transpose(*[dim for dim in order if dim in flat.dims])
    ds = xr.merge([flat, problems_ds])
    # Engine statistics of every chunk used, loaded or computed.
    executed = sum(int(p.attrs.get("lane_steps_executed", 0)) for p in pieces.values())
    useful = sum(int(p.attrs.get("lane_steps_useful", 0)) for p in pieces.values())
    status = ds["status"].values
    valid = status[status >= 0] if np.issubdtype(status.dtype, np.integer) else status[np.isfinite(status)]
    ds.attrs = {
        "spec": json.dumps(spec.to_dict(), sort_keys=True),
        "spec_digest": inputs.digest,
        "model": spec.model.name,
        "method": spec.run.method,
        "versions": json.dumps(_versions(), sort_keys=True),
        "stop_ratio": float(spec.run.stop_ratio) if spec.run.stop_ratio is not None else math.nan,
        "bregman": bregman_note,
        "lane_efficiency": useful / executed if executed else math.nan,
        "devices": len(devices) * jax.process_count(),
        "n_runs": int(valid.size),
        "n_failed": int(np.sum((valid != SUCCESS) & (valid != EVENT))),
    }
    return ds


def _progress(total, enabled):
    # tqdm.auto only when a bar is wanted (it warns in notebooks without ipywidgets).
    if enabled:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit="run", desc="sweep", dynamic_ncols=True)


def summary(ds: xr.Dataset) -> str:
    """A text table: per depth and α, the runs, failures, and median time-to-ε / final loss."""
    lines = []
    has_eps = np.isfinite(ds.attrs.get("stop_ratio", math.nan))
    head = f"{'depth':>5} {'alpha':>9} {'runs':>5} {'failed':>6} "
    head += f"{'reached eps':>11} {'median time-to-eps':>19}" if has_eps else f"{'median final loss':>18}"
    lines.append(head)
    # Sweeps of given inits (`scheme = "custom"`) have no α axis: one row per depth.
    alphas = ds.alpha.values if "alpha" in ds.dims else [math.nan]
    for L in ds.depth.values:
        for a in alphas:
            sub = ds.sel(depth=L, alpha=a) if "alpha" in ds.dims else ds.sel(depth=L)
            st = sub["status"].values.ravel()
            failed = int(np.sum((st != SUCCESS) & (st != EVENT)))
            if has_eps:
                # Runs that ended at t1 above ε count as +inf in the median.
                vals = np.where(st == SUCCESS, np.inf, sub["time_to_eps"].values.ravel())
                val = np.nanmedian(vals) if np.any(~np.isnan(vals)) else math.nan
                reached = int(np.sum(st == EVENT))
                cell = f"{reached:>11} {val:>19.4g}"
            else:
                cell = f"{np.nanmedian(sub['loss_final'].values):>18.3e}"
            lines.append(f"{int(L):>5} {a:>9.4g} {st.size:>5} {failed:>6} {cell}")
    n_failed = ds.attrs.get("n_failed", 0)
    lines.append(
        f"{ds.attrs.get('n_runs', 0)} runs, {n_failed} failed; lane efficiency "
        f"{ds.attrs.get('lane_efficiency', math.nan):.2f}"
    )
    return "\n".join(lines)
