"""Sweep specifications: parsing and validation (TOML or dict), before anything is compiled.

A spec has up to five sections; unknown sections or keys are errors, and every error names the
file, the section and the key:

```toml
[problem]                 # what to fit
kind = "sparse_regression"  # "sparse_regression" | "logistic" | "data" | "custom"
n = 30                    # samples
d = 100                   # dimension
sparsity = 3              # nonzeros of the planted θ*, magnitudes in [1, 2], random signs
noise = 0.0               # std of the label noise
seeds = [0]               # one problem draw per seed
# path = "data.npz"       # kind = "data": arrays X (n, d) and y (n,)

[init]
scheme = "gaussian"       # "gaussian" | "zero_first" | "balanced" | "custom"
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
solver = "auto"           # "auto" | "rodas4" | "rodas5p" | "tsit5" | "dopri5" | "dopri8" | "bosh3" | "heun"
max_steps = 200000
# method = "gd"           # "flow" (default) | "gd" | "momentum" | "adam": discrete runs
# learning_rates = [0.01] # discrete methods: one `learning_rate` dimension
# steps = 1000            # discrete methods: steps per run (save step k = round(steps·t/t1))
# sensitivities = ["alpha"]  # flow only: forward-mode d/dα of θ(t), θ_final, time to ε

[model]                   # optional; default: the product model
kind = "product"          # "product" (θ = u¹⊙…⊙u^L) | "signed" (θ = θ⁺ − θ⁻, layers (2, L, d))
tied = false              # signed only: one vector per half raised to the power L

[engine]
lanes = 64                # lanes per device
chunk_size = 512          # runs per stored chunk (smaller if memory asks for it)
devices = "all"           # "all" or a number of devices
```

The default and the smoke specs ship with the package (`ddln_jax/specs/*.toml`):
`SweepSpec.default()`, `SweepSpec.smoke()`, and `ddln spec` prints the default one.

`kind = "custom"` (problem) and `scheme = "custom"` (init) take the loss and the inits from
the arguments of `ddln_jax.sweep(spec, out, loss=..., inits=...)` instead of the spec.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import numbers
from pathlib import Path

import diffrax as dfx
import numpy as np

from ._flows import FORMULATIONS
from ._init import INIT_SCHEMES
from ._problems import PROBLEM_KINDS, data_digest, load_data
from ._solvers import Auto, Rodas4, Rodas5P

try:  # Python ≥ 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib


class SpecError(ValueError):
    """A malformed sweep specification (names the file, the section and the key)."""


# The names a spec may use, each next to what it names.
SOLVERS: dict[str, type[dfx.AbstractSolver]] = {
    "auto": Auto,  # Tsit5 while the flow is not stiff, Rodas5P once it is (simulate's default)
    "rodas4": Rodas4,
    "rodas5p": Rodas5P,
    "tsit5": dfx.Tsit5,
    "dopri5": dfx.Dopri5,
    "dopri8": dfx.Dopri8,
    "bosh3": dfx.Bosh3,
    "heun": dfx.Heun,
}
# Init schemes: `ddln_jax._init.INIT_SCHEMES` (called as f(L, d, α), gaussian with a key
# first); "custom" takes the inits given to `sweep(..., inits=...)`.
SCHEMES = (*INIT_SCHEMES, "custom")

# The models a spec may use (`[model] kind`) and their init schemes (`[init] scheme`).
MODEL_KINDS = ("product", "signed")
SIGNED_SCHEMES = ("woodworth", "shape_scale", "gaussian")
# `[run] method`: the gradient flow, or discrete runs (`ddln_jax._discrete.train_runs`).
METHODS = ("flow", "gd", "momentum", "adam")
# `[run] sensitivities`: forward-mode derivatives computed on the lane engine.
SENSITIVITIES = ("alpha",)

# Bounds that keep a typo from becoming a silent wrong result or an endless allocation.
MAX_RTOL = 1e-2  # looser tolerances let the flow drift off (rtol = 10 "succeeds" with f 5000× too big)
MAX_ATOL = 1e-2
MAX_GRID = 10**6  # values of one axis (α, save times): past it, a typo rather than a sweep
MAX_SEED = 2**32 - 1  # jax.random and numpy seeds


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
    solver: str = "auto"
    max_steps: int = 200_000
    method: str = "flow"
    learning_rates: tuple[float, ...] = ()
    steps: int = 0
    sensitivities: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    kind: str = "product"
    tied: bool = False

    @property
    def name(self) -> str:
        """The name `ddln_jax.as_model` knows: "product", "signed" or "signed_tied"."""
        return "signed_tied" if self.tied else self.kind


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    lanes: int = 64
    chunk_size: int = 512
    devices: str | int = "all"


def spec_text(name: str) -> str:
    """The TOML text of a shipped spec: `"default"` or `"smoke"`."""
    if name not in ("default", "smoke"):
        raise ValueError(f"shipped specs are 'default' and 'smoke', got {name!r}")
    return importlib.resources.files("ddln_jax").joinpath("specs", f"{name}.toml").read_text("utf-8")


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A validated sweep specification. Build it with `SweepSpec.load(path)`,
    `SweepSpec.from_dict(d)`, `SweepSpec.default()` or `SweepSpec.smoke()`; `to_dict()` gives
    it back (stored with the results)."""

    problem: ProblemSpec
    init: InitSpec
    run: RunSpec
    engine: EngineSpec
    model: ModelSpec = ModelSpec()
    source: str = dataclasses.field(default="<dict>", compare=False)

    @classmethod
    def load(cls, path) -> SweepSpec:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise SpecError(f"{path}: cannot read the spec ({e.strerror or e})") from e
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SpecError(f"{path}: not UTF-8 text (byte {e.start}); a spec is a TOML file") from e
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise SpecError(f"{path}: not valid TOML: {e}") from e
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, *, source: str = "<dict>") -> SweepSpec:
        return _parse(raw, source)

    @classmethod
    def default(cls) -> SweepSpec:
        """The default sweep of `ddln sweep` (shipped as `ddln_jax/specs/default.toml`)."""
        return cls.from_dict(tomllib.loads(spec_text("default")), source="<default spec>")

    @classmethod
    def smoke(cls) -> SweepSpec:
        """The default sweep at a reduced size (`ddln sweep --smoke`; seconds on a CPU)."""
        return cls.from_dict(tomllib.loads(spec_text("smoke")), source="<smoke spec>")

    def to_dict(self) -> dict:
        """The spec as the tables of a TOML file: `SweepSpec.from_dict(spec.to_dict()) == spec`
        (save times listed, keys that do not apply left out; a data file is read again)."""
        p, i, r, e, m = self.problem, self.init, self.run, self.engine, self.model
        if p.kind == "data":
            problem = {"kind": p.kind, "path": p.path, "seeds": list(p.seeds)}
        elif p.kind == "custom":
            problem = {"kind": p.kind, "seeds": list(p.seeds)}
        else:
            problem = {"kind": p.kind, "n": p.n, "d": p.d, "sparsity": p.sparsity,
                       "noise": p.noise, "seeds": list(p.seeds)}
        init = {"scheme": i.scheme}
        if i.scheme != "custom":
            init.update(alpha=list(i.alpha), seeds=list(i.seeds), shape=list(i.shape))
        run = {"depths": list(r.depths), "formulation": r.formulation, "t1": r.t1,
               "save_times": list(r.save_times), "rtol": r.rtol, "atol": r.atol,
               "solver": r.solver, "max_steps": r.max_steps, "method": r.method}
        if r.stop_ratio is not None:
            run["stop_ratio"] = r.stop_ratio
        if r.method != "flow":
            run.update(learning_rates=list(r.learning_rates), steps=r.steps)
        if r.sensitivities:
            run["sensitivities"] = list(r.sensitivities)
        return {"problem": problem, "model": {"kind": m.kind, "tied": m.tied}, "init": init,
                "run": run, "engine": dataclasses.asdict(e)}

    def _fields(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("source")
        return out

    def with_engine(self, **changes) -> SweepSpec:
        """This spec with `[engine]` keys changed (validated like the file's)."""
        engine = dataclasses.asdict(self.engine)
        engine.update(changes)
        e = _engine(engine, f"{self.source} (overridden)")
        return dataclasses.replace(self, engine=e)

    def digest(self) -> str:
        """A hash of everything that changes the results (not the engine's knobs, which only
        change how they are computed, nor where a data file lies: its bytes are hashed)."""
        d = self._fields()  # every field, as when the digest was introduced (old sweeps resume)
        d.pop("engine")
        d["problem"].pop("path")
        # Keys added later enter the digest only when they differ from their defaults: the
        # results of a spec without them keep their digest (and resume).
        if d["model"] == dataclasses.asdict(ModelSpec()):
            d.pop("model")
        for key, default in (("method", "flow"), ("learning_rates", ()), ("steps", 0),
                             ("sensitivities", ())):
            if d["run"][key] == default:
                d["run"].pop(key)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def save_times(self) -> np.ndarray:
        return np.asarray(self.run.save_times, dtype=np.float64)

    def jobs(self) -> list[tuple[float, float, int]]:
        """The (shape, α, seed) of every run of one (depth, problem), in the dataset's order
        (empty for `scheme = "custom"`, whose runs are the given inits)."""
        if self.init.scheme == "custom":
            return []
        seeds = self.init.seeds if self.init.scheme == "gaussian" else self.init.seeds[:1]
        return [(s, a, k) for s in self.init.shape for a in self.init.alpha for k in seeds]

    def count(self) -> int:
        """Number of runs (for `scheme = "custom"`: per given init)."""
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
        raise _err(source, name, "", f"must be a table, got {_short(sec)}")
    unknown = sorted(set(sec) - set(allowed), key=str)
    if unknown:
        raise _err(source, name, unknown[0], f"unknown key (known keys: {', '.join(allowed)})")
    return sec


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(source, sec, key, value, minimum, maximum=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _err(source, sec, key, f"must be an integer, got {_short(value)}")
    if value < minimum:
        raise _err(source, sec, key, f"must be ≥ {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise _err(source, sec, key, f"must be ≤ {maximum}, got {value}")
    return int(value)


def _float(source, sec, key, value, *, positive=True, allow_zero=False, maximum=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _err(source, sec, key, f"must be a number, got {_short(value)}")
    value = float(value)
    if not np.isfinite(value):
        raise _err(source, sec, key, f"must be finite, got {value}")
    if positive and (value < 0 or (value == 0 and not allow_zero)):
        raise _err(source, sec, key, f"must be {'≥' if allow_zero else '>'} 0, got {value}")
    if maximum is not None and value > maximum:
        raise _err(source, sec, key, f"must be ≤ {maximum:g}, got {value:g}")
    return value


def _list(source, sec, key, value, item, *, unique=True):
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        value = [value]
    if len(value) == 0:
        raise _err(source, sec, key, "must not be empty")
    if len(value) > MAX_GRID:
        raise _err(source, sec, key, f"has {len(value)} values, more than {MAX_GRID}")
    out = tuple(item(v) for v in value)
    if unique and len(set(out)) != len(out):
        raise _err(source, sec, key, f"has repeated values {_short(list(out))}")
    return out


def _choice(source, sec, key, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise _err(source, sec, key, f"must be one of {list(choices)}, got {_short(value)}")
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
            # Checked before anything is allocated: a count of 3e7 is a typo, not a sweep.
            num = _int(source, "init", "alpha", spec[2], 1, MAX_GRID)
            if num > 1 and lo == hi:
                raise _err(source, "init", "alpha", f"geomspace from {lo:g} to itself repeats one value")
            return tuple(float(a) for a in np.geomspace(lo, hi, num))
        raise _err(source, "init", "alpha",
                   f"a table must be {{geomspace = [start, stop, count]}}, got keys {sorted(map(str, keys))}")
    return _list(source, "init", "alpha", value, lambda v: _float(source, "init", "alpha", v))


def _problem(raw, source) -> ProblemSpec:
    known = ["kind", "n", "d", "sparsity", "noise", "seeds", "path"]
    p = _section(raw, "problem", source, known)
    dp = ProblemSpec()
    kind = _choice(source, "problem", "kind", p.get("kind", dp.kind), PROBLEM_KINDS)
    if kind in ("data", "custom"):
        # These keys describe generated problems: given here they would be silently ignored.
        extra = [k for k in ("n", "d", "sparsity", "noise") if k in p]
        if extra:
            where = "the data file" if kind == "data" else "the loss given to `sweep`"
            raise _err(source, "problem", extra[0], f"not used with kind = {kind!r} (the problem is {where})")
        seeds = _list(source, "problem", "seeds", p.get("seeds", [0]),
                      lambda v: _int(source, "problem", "seeds", v, 0, MAX_SEED))
        if seeds != (0,):
            raise _err(source, "problem", "seeds", f"kind = {kind!r} has one problem: use seeds = [0]")
    path = p.get("path")
    if kind == "data":
        if not isinstance(path, str) or not path:
            raise _err(source, "problem", "path", f"kind = 'data' needs a path to an .npz with X and y, got {_short(path)}")
        base = Path(source).parent if not source.startswith("<") else Path(".")
        file = (base / path) if not Path(path).is_absolute() else Path(path)
        try:
            X, y = load_data(file)
        except ValueError as e:
            raise _err(source, "problem", "path", str(e)) from e
        n, d = X.shape
        return ProblemSpec(kind, n, d, dp.sparsity, 0.0, seeds, str(file.resolve()), data_digest(X, y))
    if path is not None:
        raise _err(source, "problem", "path", f"only used with kind = 'data', not {kind!r}")
    if kind == "custom":
        return ProblemSpec(kind, 0, 0, 0, 0.0, seeds, None, None)
    n = _int(source, "problem", "n", p.get("n", dp.n), 1)
    d = _int(source, "problem", "d", p.get("d", dp.d), 1)
    sparsity = _int(source, "problem", "sparsity", p.get("sparsity", dp.sparsity), 1)
    if sparsity > d:
        raise _err(source, "problem", "sparsity", f"must be ≤ d = {d}, got {sparsity}")
    noise = _float(source, "problem", "noise", p.get("noise", dp.noise), allow_zero=True)
    seeds = _list(source, "problem", "seeds", p.get("seeds", list(dp.seeds)),
                  lambda v: _int(source, "problem", "seeds", v, 0, MAX_SEED))
    return ProblemSpec(kind, n, d, sparsity, noise, seeds, None, None)


def _model(raw, source) -> ModelSpec:
    m = _section(raw, "model", source, ["kind", "tied"])
    kind = _choice(source, "model", "kind", m.get("kind", "product"), MODEL_KINDS)
    tied = m.get("tied", False)
    if not isinstance(tied, bool):
        raise _err(source, "model", "tied", f"must be true or false, got {_short(tied)}")
    if tied and kind != "signed":
        raise _err(source, "model", "tied", f"only the signed model has tied layers, not {kind!r}")
    return ModelSpec(kind, tied)


def _init(raw, source, model: ModelSpec = ModelSpec()) -> InitSpec:
    i = _section(raw, "init", source, ["scheme", "alpha", "seeds", "shape"])
    di = InitSpec()
    schemes = SIGNED_SCHEMES if model.kind == "signed" else SCHEMES
    scheme = _choice(source, "init", "scheme", i.get("scheme", di.scheme), schemes)
    if model.tied and scheme == "gaussian":
        raise _err(source, "init", "scheme", "the tied signed model needs equal layers in each half: "
                   "use 'woodworth' or 'shape_scale' with shape = [1.0]")
    if scheme == "custom":
        extra = [k for k in ("alpha", "seeds", "shape") if k in i]
        if extra:
            raise _err(source, "init", extra[0], "not used with scheme = 'custom' (the inits are given to `sweep`)")
        return InitSpec(scheme, (), (), ())
    alpha = _alpha(source, i.get("alpha", list(di.alpha)))
    iseeds = _list(source, "init", "seeds", i.get("seeds", list(di.seeds)),
                   lambda v: _int(source, "init", "seeds", v, 0, MAX_SEED))
    if scheme != "gaussian" and len(iseeds) > 1:
        raise _err(source, "init", "seeds", f"scheme {scheme!r} is deterministic: use one seed")
    shape = _list(source, "init", "shape", i.get("shape", list(di.shape)),
                  lambda v: _float(source, "init", "shape", v))
    if model.kind == "signed" and scheme == "woodworth" and shape != (1.0,):
        raise _err(source, "init", "shape", f"'woodworth' has equal layers (shape 1); use scheme = 'shape_scale' for shape {list(shape)}")
    if model.tied and shape != (1.0,):
        raise _err(source, "init", "shape", f"the tied signed model needs equal layers in each half: use [1.0], got {list(shape)}")
    return InitSpec(scheme, alpha, iseeds, shape)


def _run(raw, source, scheme, model: ModelSpec = ModelSpec()) -> RunSpec:
    r = _section(raw, "run", source, ["depths", "formulation", "t1", "n_save", "save_times",
                                       "save_spacing", "stop_ratio", "rtol", "atol", "solver",
                                       "max_steps", "method", "learning_rates", "steps",
                                       "sensitivities"])
    dr = RunSpec()
    depths = _list(source, "run", "depths", r.get("depths", list(dr.depths)),
                   lambda v: _int(source, "run", "depths", v, 1))
    formulation = _choice(source, "run", "formulation", r.get("formulation", dr.formulation), tuple(FORMULATIONS))
    t1 = _float(source, "run", "t1", r.get("t1", dr.t1))
    if "save_times" in r and "n_save" in r:
        raise _err(source, "run", "save_times", "give either n_save or save_times, not both")
    if "save_times" in r:
        save = _list(source, "run", "save_times", r["save_times"],
                     lambda v: _float(source, "run", "save_times", v, allow_zero=True))
        if any(b <= a for a, b in zip(save, save[1:])) or save[-1] > t1:
            raise _err(source, "run", "save_times", f"must increase within [0, t1 = {t1}], got {_short(list(save))}")
        if "save_spacing" in r:
            raise _err(source, "run", "save_spacing", "only used with n_save, not save_times")
    else:
        # Checked before anything is allocated: 3e7 save times is a typo, not a sweep.
        n_save = _int(source, "run", "n_save", r.get("n_save", 41), 2, MAX_GRID)
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
    rtol = _float(source, "run", "rtol", r.get("rtol", dr.rtol), maximum=MAX_RTOL)
    atol = _float(source, "run", "atol", r.get("atol", dr.atol), maximum=MAX_ATOL)
    if rtol < 2.2e-15:
        raise _err(source, "run", "rtol", f"is below what float64 can deliver, got {rtol}")
    solver = _choice(source, "run", "solver", r.get("solver", dr.solver), tuple(SOLVERS))
    max_steps = _int(source, "run", "max_steps", r.get("max_steps", dr.max_steps), 1, 2**31 - 1)
    method = _choice(source, "run", "method", r.get("method", "flow"), METHODS)
    lrs, steps = (), 0
    if method == "flow":
        extra = [k for k in ("learning_rates", "steps") if k in r]
        if extra:
            raise _err(source, "run", extra[0], "only used with a discrete method (method = 'gd', 'momentum', 'adam')")
    else:
        if "learning_rates" not in r or "steps" not in r:
            raise _err(source, "run", "learning_rates" if "learning_rates" not in r else "steps",
                       f"method = {method!r} needs learning_rates = [...] and steps = N")
        lrs = _list(source, "run", "learning_rates", r["learning_rates"],
                    lambda v: _float(source, "run", "learning_rates", v))
        steps = _int(source, "run", "steps", r["steps"], 1, 2**31 - 1)
        if model.kind != "product":
            raise _err(source, "run", "method", f"discrete runs train the product model only, not {model.kind!r}")
        if stop is not None:
            raise _err(source, "run", "stop_ratio", f"not used with method = {method!r} (discrete runs stop after `steps`)")
        ks = np.rint(np.asarray(save) / t1 * steps).astype(np.int64)
        if np.any(np.diff(ks) <= 0):
            raise _err(source, "run", "steps", f"{steps} steps cannot hold {len(save)} distinct save steps (k = round(steps·t/t1)): save fewer times or take more steps")
    sens = ()
    if "sensitivities" in r:
        sens = _list(source, "run", "sensitivities", r["sensitivities"],
                     lambda v: _choice(source, "run", "sensitivities", v, SENSITIVITIES))
        if method != "flow":
            raise _err(source, "run", "sensitivities", f"computed for the flow only, not method = {method!r}")
        if scheme == "custom":
            raise _err(source, "run", "sensitivities", "d/dα needs a scheme that scales with α, not scheme = 'custom'")
    return RunSpec(depths, formulation, t1, save, stop, rtol, atol, solver, max_steps,
                   method, lrs, steps, sens)


def _engine(e, source) -> EngineSpec:
    de = EngineSpec()
    lanes = _int(source, "engine", "lanes", e.get("lanes", de.lanes), 1, 2**20)
    chunk = _int(source, "engine", "chunk_size", e.get("chunk_size", de.chunk_size), 1, 2**31 - 1)
    devices = e.get("devices", de.devices)
    if devices != "all":
        devices = _int(source, "engine", "devices", devices, 1)
    return EngineSpec(lanes, chunk, devices)


def _parse(raw, source) -> SweepSpec:
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a spec must be a table of sections, got {type(raw).__name__}")
    unknown = sorted(set(raw) - {"problem", "init", "run", "engine", "model"}, key=str)
    if unknown:
        raise SpecError(f"{source}: [{unknown[0]}]: unknown section (known: problem, init, run, engine, model)")
    problem = _problem(raw, source)
    model = _model(raw, source)
    init = _init(raw, source, model)
    run = _run(raw, source, init.scheme, model)
    engine = _engine(_section(raw, "engine", source, ["lanes", "chunk_size", "devices"]), source)
    return SweepSpec(problem, init, run, engine, model, source)


def __getattr__(name):
    # The shipped specs' text, read from the package data on first use.
    if name == "DEFAULT_SPEC":
        return spec_text("default")
    if name == "SMOKE_SPEC":
        return spec_text("smoke")
    raise AttributeError(name)
