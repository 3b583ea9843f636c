"""Sweep specifications: parsing and validation (TOML or dict), before anything is compiled.

A spec has four sections; unknown sections or keys are errors, and every error names the
file, the section and the key:

```toml
[problem]                 # what to fit
kind = "sparse_regression"  # "sparse_regression" | "logistic" | "data"
n = 30                    # samples
d = 100                   # dimension
sparsity = 3              # nonzeros of the planted θ*, magnitudes in [1, 2], random signs
noise = 0.0               # std of the label noise
seeds = [0]               # one problem draw per seed
# path = "data.npz"       # kind = "data": arrays X (n, d) and y (n,)

[init]
scheme = "gaussian"       # "gaussian" | "zero_first" | "balanced"
alpha = {geomspace = [0.1, 1.0, 6]}   # or a list of values
seeds = [0, 1]            # init draws (gaussian only)
shape = [1.0]             # first-layer scale ratios: u¹ is scaled by shape·α

[run]
depths = [2, 3, 4]
formulation = "reduced"   # "layer" | "reduced" | "mirror" | "dual"
t1 = 100.0
n_save = 41               # or save_times = [...]
save_spacing = "linear"   # or "log": t = 0, then n_save - 1 times from t1·1e-4 to t1
stop_ratio = 1e-6         # optional: stop when f − f* ≤ ε (f(θ0) − f*)
rtol = 1e-8
atol = 1e-10
solver = "tsit5"          # "tsit5" | "dopri5" | "dopri8" | "bosh3" | "heun"
max_steps = 200000

[engine]
lanes = 64                # lanes per device
chunk_size = 512          # runs per stored chunk (smaller if memory asks for it)
devices = "all"           # "all" or a number of devices
```
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
from pathlib import Path

import numpy as np

try:  # Python ≥ 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib


class SpecError(ValueError):
    """A malformed sweep specification (names the file, the section and the key)."""


SOLVERS = ("tsit5", "dopri5", "dopri8", "bosh3", "heun")
FORMULATIONS = ("layer", "reduced", "mirror", "dual")
PROBLEMS = ("sparse_regression", "logistic", "data")
SCHEMES = ("gaussian", "zero_first", "balanced")


@dataclasses.dataclass(frozen=True)
class ProblemSpec:
    kind: str = "sparse_regression"
    n: int = 30
    d: int = 100
    sparsity: int = 3
    noise: float = 0.0
    seeds: tuple[int, ...] = (0,)
    path: str | None = None
    data_sha256: str | None = None  # of X and y (kind = "data"): changed data, changed spec


@dataclasses.dataclass(frozen=True)
class InitSpec:
    scheme: str = "gaussian"
    alpha: tuple[float, ...] = (0.1, 0.3, 1.0)
    seeds: tuple[int, ...] = (0,)
    shape: tuple[float, ...] = (1.0,)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    depths: tuple[int, ...] = (2, 3)
    formulation: str = "reduced"
    t1: float = 100.0
    save_times: tuple[float, ...] = ()
    stop_ratio: float | None = None
    rtol: float = 1e-8
    atol: float = 1e-10
    solver: str = "tsit5"
    max_steps: int = 200_000


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    lanes: int = 64
    chunk_size: int = 512
    devices: str | int = "all"


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A validated sweep specification. Build it with `SweepSpec.load(path)` or
    `SweepSpec.from_dict(d)`; `to_dict()` gives it back (stored with the results)."""

    problem: ProblemSpec
    init: InitSpec
    run: RunSpec
    engine: EngineSpec
    source: str = dataclasses.field(default="<dict>", compare=False)

    @classmethod
    def load(cls, path) -> SweepSpec:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise SpecError(f"{path}: cannot read the spec ({e.strerror})") from e
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise SpecError(f"{path}: not valid TOML: {e}") from e
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, *, source: str = "<dict>") -> SweepSpec:
        return _parse(raw, source)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("source")
        return out

    def digest(self) -> str:
        """A hash of everything that changes the results (not the engine's knobs, which only
        change how they are computed)."""
        d = self.to_dict()
        d.pop("engine")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def save_times(self) -> np.ndarray:
        return np.asarray(self.run.save_times, dtype=np.float64)

    def count(self) -> int:
        scheme_seeds = len(self.init.seeds) if self.init.scheme == "gaussian" else 1
        return (
            len(self.run.depths) * len(self.problem.seeds) * len(self.init.shape)
            * len(self.init.alpha) * scheme_seeds
        )


def _err(source, section, key, msg):
    where = f"[{section}] {key}" if key else f"[{section}]"
    return SpecError(f"{source}: {where}: {msg}")


def _section(raw, name, source, allowed):
    sec = raw.get(name, {})
    if not isinstance(sec, dict):
        raise _err(source, name, "", f"must be a table, got {sec!r}")
    unknown = sorted(set(sec) - set(allowed))
    if unknown:
        raise _err(source, name, unknown[0], f"unknown key (known keys: {', '.join(allowed)})")
    return sec


def _int(source, sec, key, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _err(source, sec, key, f"must be an integer, got {value!r}")
    if value < minimum:
        raise _err(source, sec, key, f"must be ≥ {minimum}, got {value}")
    return int(value)


def _float(source, sec, key, value, *, positive=True, allow_zero=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _err(source, sec, key, f"must be a number, got {value!r}")
    value = float(value)
    if not np.isfinite(value):
        raise _err(source, sec, key, f"must be finite, got {value}")
    if positive and (value < 0 or (value == 0 and not allow_zero)):
        raise _err(source, sec, key, f"must be {'≥' if allow_zero else '>'} 0, got {value}")
    return value


def _list(source, sec, key, value, item, *, unique=True):
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        value = [value]
    if len(value) == 0:
        raise _err(source, sec, key, "must not be empty")
    out = tuple(item(v) for v in value)
    if unique and len(set(out)) != len(out):
        raise _err(source, sec, key, f"has repeated values {list(out)}")
    return out


def _choice(source, sec, key, value, choices):
    if value not in choices:
        raise _err(source, sec, key, f"must be one of {list(choices)}, got {value!r}")
    return value


def _alpha(source, value):
    if isinstance(value, dict):
        keys = set(value)
        if keys == {"geomspace"}:
            spec = value["geomspace"]
            if not isinstance(spec, (list, tuple)) or len(spec) != 3:
                raise _err(source, "init", "alpha", "geomspace must be [start, stop, count]")
            lo = _float(source, "init", "alpha", spec[0])
            hi = _float(source, "init", "alpha", spec[1])
            num = _int(source, "init", "alpha", spec[2], 1)
            return tuple(float(a) for a in np.geomspace(lo, hi, num))
        raise _err(source, "init", "alpha", f"a table must be {{geomspace = [start, stop, count]}}, got keys {sorted(keys)}")
    return _list(source, "init", "alpha", value, lambda v: _float(source, "init", "alpha", v))


def _parse(raw, source) -> SweepSpec:
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a spec must be a table of sections, got {type(raw).__name__}")
    unknown = sorted(set(raw) - {"problem", "init", "run", "engine"})
    if unknown:
        raise SpecError(f"{source}: [{unknown[0]}]: unknown section (known: problem, init, run, engine)")

    p = _section(raw, "problem", source, ["kind", "n", "d", "sparsity", "noise", "seeds", "path"])
    dp = ProblemSpec()
    kind = _choice(source, "problem", "kind", p.get("kind", dp.kind), PROBLEMS)
    path = p.get("path")
    if kind == "data":
        if not isinstance(path, str):
            raise _err(source, "problem", "path", f"kind = 'data' needs a path to an .npz with X and y, got {path!r}")
        base = Path(source).parent if source != "<dict>" else Path(".")
        file = (base / path) if not Path(path).is_absolute() else Path(path)
        try:
            with np.load(file) as z:
                X, y = np.asarray(z["X"], float), np.asarray(z["y"], float)
        except (OSError, KeyError, ValueError) as e:
            raise _err(source, "problem", "path", f"cannot read X and y from {str(file)!r} ({e})") from e
        if X.ndim != 2 or y.shape != (X.shape[0],) or not np.all(np.isfinite(X)) or not np.all(np.isfinite(y)):
            raise _err(source, "problem", "path", f"{str(file)!r} must hold finite X (n, d) and y (n,)")
        n, d = X.shape
        path = str(file.resolve())
        data_sha = hashlib.sha256(np.ascontiguousarray(X).tobytes() + np.ascontiguousarray(y).tobytes()).hexdigest()
    else:
        data_sha = None
        if path is not None:
            raise _err(source, "problem", "path", f"only used with kind = 'data', not {kind!r}")
        n = _int(source, "problem", "n", p.get("n", dp.n), 1)
        d = _int(source, "problem", "d", p.get("d", dp.d), 1)
    sparsity = _int(source, "problem", "sparsity", p.get("sparsity", dp.sparsity), 1)
    if kind != "data" and sparsity > d:
        raise _err(source, "problem", "sparsity", f"must be ≤ d = {d}, got {sparsity}")
    noise = _float(source, "problem", "noise", p.get("noise", dp.noise), allow_zero=True)
    seeds = _list(source, "problem", "seeds", p.get("seeds", list(dp.seeds)),
                  lambda v: _int(source, "problem", "seeds", v, 0))
    if kind == "data" and len(seeds) != 1:
        raise _err(source, "problem", "seeds", "kind = 'data' has one problem: use seeds = [0]")
    problem = ProblemSpec(kind, n, d, sparsity, noise, seeds, path, data_sha)

    i = _section(raw, "init", source, ["scheme", "alpha", "seeds", "shape"])
    di = InitSpec()
    scheme = _choice(source, "init", "scheme", i.get("scheme", di.scheme), SCHEMES)
    alpha = _alpha(source, i.get("alpha", list(di.alpha)))
    iseeds = _list(source, "init", "seeds", i.get("seeds", list(di.seeds)),
                   lambda v: _int(source, "init", "seeds", v, 0))
    if scheme != "gaussian" and len(iseeds) > 1:
        raise _err(source, "init", "seeds", f"scheme {scheme!r} is deterministic: use one seed")
    shape = _list(source, "init", "shape", i.get("shape", list(di.shape)),
                  lambda v: _float(source, "init", "shape", v))
    init = InitSpec(scheme, alpha, iseeds, shape)

    r = _section(raw, "run", source, ["depths", "formulation", "t1", "n_save", "save_times",
                                       "save_spacing", "stop_ratio", "rtol", "atol", "solver",
                                       "max_steps"])
    dr = RunSpec()
    depths = _list(source, "run", "depths", r.get("depths", list(dr.depths)),
                   lambda v: _int(source, "run", "depths", v, 1))
    formulation = _choice(source, "run", "formulation", r.get("formulation", dr.formulation), FORMULATIONS)
    if formulation in ("mirror", "dual") and scheme == "balanced":
        raise _err(source, "run", "formulation", f"{formulation!r} needs Assumption A, which the balanced init violates; use 'reduced'")
    t1 = _float(source, "run", "t1", r.get("t1", dr.t1))
    if "save_times" in r and "n_save" in r:
        raise _err(source, "run", "save_times", "give either n_save or save_times, not both")
    if "save_times" in r:
        save = _list(source, "run", "save_times", r["save_times"],
                     lambda v: _float(source, "run", "save_times", v, allow_zero=True))
        if any(b <= a for a, b in zip(save, save[1:])) or save[-1] > t1:
            raise _err(source, "run", "save_times", f"must increase within [0, t1 = {t1}], got {list(save)}")
        if "save_spacing" in r:
            raise _err(source, "run", "save_spacing", "only used with n_save, not save_times")
    else:
        n_save = _int(source, "run", "n_save", r.get("n_save", 41), 2)
        spacing = _choice(source, "run", "save_spacing", r.get("save_spacing", "linear"), ("linear", "log"))
        if spacing == "log" and n_save > 2:
            save = (0.0, *(float(t) for t in np.geomspace(t1 * 1e-4, t1, n_save - 1)))
        elif spacing == "log":
            save = (0.0, t1)
        else:
            save = tuple(float(t) for t in np.linspace(0.0, t1, n_save))
    stop = r.get("stop_ratio")
    if stop is not None:
        stop = _float(source, "run", "stop_ratio", stop)
        if stop >= 1:
            raise _err(source, "run", "stop_ratio", f"must be in (0, 1), got {stop}")
    rtol = _float(source, "run", "rtol", r.get("rtol", dr.rtol))
    atol = _float(source, "run", "atol", r.get("atol", dr.atol))
    if rtol < 2.2e-15:
        raise _err(source, "run", "rtol", f"is below what float64 can deliver, got {rtol}")
    solver = _choice(source, "run", "solver", r.get("solver", dr.solver), SOLVERS)
    max_steps = _int(source, "run", "max_steps", r.get("max_steps", dr.max_steps), 1)
    if max_steps > 2**31 - 1:
        raise _err(source, "run", "max_steps", f"must be < 2**31, got {max_steps}")
    run = RunSpec(depths, formulation, t1, save, stop, rtol, atol, solver, max_steps)

    e = _section(raw, "engine", source, ["lanes", "chunk_size", "devices"])
    de = EngineSpec()
    lanes = _int(source, "engine", "lanes", e.get("lanes", de.lanes), 1)
    chunk = _int(source, "engine", "chunk_size", e.get("chunk_size", de.chunk_size), 1)
    devices = e.get("devices", de.devices)
    if devices != "all":
        devices = _int(source, "engine", "devices", devices, 1)
    engine = EngineSpec(lanes, chunk, devices)
    return SweepSpec(problem, init, run, engine, source)


DEFAULT_SPEC = """\
# The default sweep of `ddln sweep`: planted sparse regression, depths 2-4, six init scales,
# four init draws each, every run stopped when f ≤ 1e-6 f(θ0). About 20 s on 2 CPU cores.
[problem]
kind = "sparse_regression"
n = 20
d = 60
sparsity = 3
noise = 0.0
seeds = [0]

[init]
scheme = "gaussian"
alpha = {geomspace = [0.35, 1.4, 6]}
seeds = [0, 1, 2, 3]

[run]
depths = [2, 3, 4]
formulation = "reduced"
t1 = 3000.0
n_save = 101
save_spacing = "log"
stop_ratio = 1e-6
rtol = 1e-8
atol = 1e-10

[engine]
lanes = 64
chunk_size = 512
"""

# `ddln sweep --smoke`: the default sweep at a reduced size (the test suite runs it).
SMOKE_SPEC = """\
[problem]
kind = "sparse_regression"
n = 8
d = 16
sparsity = 2
seeds = [0]

[init]
scheme = "gaussian"
alpha = {geomspace = [0.5, 1.0, 3]}
seeds = [0, 1]

[run]
depths = [2, 3]
t1 = 200.0
n_save = 11
stop_ratio = 1e-4
rtol = 1e-10
atol = 1e-12

[engine]
lanes = 2
chunk_size = 6
"""
