"""The `ddln` command.

A user's mistake (a bad spec, an unusable directory, a full disk, bad options) ends in one
line `ddln: error: …` and exit status 2, never a traceback (`--debug` shows it); Ctrl-C or
SIGTERM (a Slurm time limit) ends with "interrupted; rerun to resume" and status 130.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path


def _x64():
    import jax

    # The command line is a shipped path: float64 throughout (DESIGN.md).
    jax.config.update("jax_enable_x64", True)


def _cpu_devices(n: int) -> None:
    """JAX gives a CPU one device (its lanes step on one core) unless told before it starts:
    ask for n (at most one per core), so that `--devices n` runs n shares of the lanes in
    parallel on a multi-core CPU. No effect on accelerators, nor once JAX has started (an
    in-process call)."""
    import os

    import jax

    try:
        jax.config.update("jax_num_cpu_devices", min(n, os.cpu_count() or 1))
    except RuntimeError:  # the backends already exist: they keep their devices
        pass


class _UsageError(Exception):
    """A bad command-line value (reported like argparse's own errors)."""


def _positive(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be ≥ 1, got {value}")
        return value

    return parse


def _real(name, positive=True):
    def parse(text):
        import math

        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not math.isfinite(value) or (positive and value <= 0):
            raise argparse.ArgumentTypeError(f"{name} must be finite and > 0, got {text}")
        return value

    return parse


def _shard(text):
    from ._sweep import _as_shard

    try:
        return _as_shard(text)
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e).replace("`shard`", "--shard")) from None


def demo(args) -> int:
    _x64()
    import jax
    import jax.numpy as jnp

    import ddln_jax as dj

    from ._plot import plot_trajectories

    kx, ku = jax.random.split(jax.random.PRNGKey(args.seed))
    n, d, L = 20, 40, args.depth
    X = jax.random.normal(kx, (n, d))
    theta_star = jnp.zeros(d).at[:4].set(jnp.array([1.5, -1.0, 2.0, -0.5]))
    loss = dj.LeastSquares(X, X @ theta_star)
    u0 = dj.gaussian_init(ku, L, d, args.alpha)
    ts = jnp.linspace(0.0, args.t1, 201)
    runs = {
        f: dj.simulate(loss, u0, t1=args.t1, ts=ts, formulation=f, rtol=1e-10, atol=1e-12)
        for f in ("layer", "mirror")
    }
    a, b = runs["layer"].theta, runs["mirror"].theta
    err = float(jnp.max(jnp.linalg.norm(a - b, axis=1) / jnp.linalg.norm(a, axis=1)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_trajectories(
        {f"{k} flow": v for k, v in runs.items()}, out,
        title=f"least squares n={n}, d={d}, L={L}, α={args.alpha}",
    )
    print(f"layer flow ({int(runs['layer'].num_steps)} steps) vs mirror flow "
          f"({int(runs['mirror'].num_steps)} steps): max relative θ difference {err:.2e}")
    print(f"final loss {float(runs['layer'].loss_final):.3e}; figure written to {out}")
    return 0 if err < 1e-7 else 1


def _load_spec(args):
    from ._spec import SweepSpec

    if args.smoke:
        if args.spec is not None:
            raise _UsageError("--smoke runs the reduced default spec: give no SPEC with it")
        return SweepSpec.smoke(), "smoke"
    if args.spec is None:
        return SweepSpec.default(), "default"
    return SweepSpec.load(args.spec), Path(args.spec).stem


def run_shard(spec, out, i: int, n: int) -> str:
    """One task of a job array: shard i of n of `spec` into `out` (what `--executor` submits).

    **Returns:** a one-line report (the shard that completes the sweep says so).
    """
    _x64()
    from ._sweep import sweep

    ds = sweep(spec, out, progress=False, shard=(i, n))
    if ds is None:
        return f"shard {i}/{n}: done"
    return f"shard {i}/{n}: done; the sweep is complete ({ds.attrs['n_runs']} runs) in {Path(out) / 'results.nc'}"


def _submit(args, spec, out) -> int:
    try:
        import submitit
    except ImportError:
        raise _UsageError("--executor needs submitit: pip install 'ddln_jax[cluster]'") from None
    n = args.shards
    folder = Path(args.log_dir) if args.log_dir else out / "jobs"
    cluster = "slurm" if args.executor == "slurm" else "local"
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params = {"timeout_min": args.time, "name": "ddln-sweep"}
    if cluster == "slurm":
        params.update({"slurm_array_parallelism": n, "cpus_per_task": args.cpus})
        if args.partition:
            params["slurm_partition"] = args.partition
        if args.gpus:
            params["gpus_per_node"] = args.gpus
    executor.update_parameters(**params)
    jobs = executor.map_array(run_shard, [spec] * n, [str(out)] * n, list(range(n)), [n] * n)
    print(f"submitted {n} shards to {cluster} (job {jobs[0].job_id.split('_')[0]}); logs in {folder}")
    if not args.wait:
        print(f"the last shard to finish assembles {out / 'results.nc'}; "
              f"or run `ddln sweep SPEC --out {out}` after them")
        return 0
    failed = []
    for i, job in enumerate(jobs):
        try:
            print(job.result())
        except Exception as e:  # noqa: BLE001 - a failed task is reported, the others kept
            failed.append(i)
            last = str(e).strip().splitlines()
            print(f"shard {i}/{n} failed: {last[-1] if last else type(e).__name__}", file=sys.stderr)
    if failed:
        raise _UsageError(f"{len(failed)} of {n} shards failed (logs in {folder}); rerun to resume")
    return 0


def sweep_cmd(args) -> int:
    import time

    if args.distributed:
        import jax

        # CPU-only hosts need a collectives backend for the gathers (GPUs use NCCL).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize()
    elif args.devices is not None and args.devices > 1:
        _cpu_devices(args.devices)
    _x64()
    from ._plot import plot_sweep
    from ._sweep import summary, sweep

    spec, name = _load_spec(args)
    overrides = {}
    if args.lanes is not None:
        overrides["lanes"] = args.lanes
    if args.devices is not None:
        overrides["devices"] = args.devices
    if overrides:
        spec = spec.with_engine(**overrides)
    out = Path(args.out) if args.out else Path("ddln_results") / name
    if args.executor is not None:
        if args.shard is not None or args.distributed:
            raise _UsageError("--executor submits the shards itself: give no --shard/--distributed")
        return _submit(args, spec, out)
    start = time.perf_counter()
    ds = sweep(spec, out, progress=not args.quiet, shard=args.shard)
    elapsed = time.perf_counter() - start
    if ds is None:
        i, n = args.shard
        print(f"shard {i}/{n} done in {elapsed:.1f} s; the last shard (or `ddln sweep` without "
              f"--shard) assembles {out / 'results.nc'}")
        return 0
    import jax

    if jax.process_index() != 0:
        return 0
    figures = plot_sweep(ds, out)
    print(summary(ds))
    print(f"{elapsed:.1f} s; results in {out / 'results.nc'}; figures: "
          + ", ".join(str(p) for p in figures))
    return 0


def plot_cmd(args) -> int:
    from ._plot import plot_sweep
    from ._results import open_results
    from ._sweep import summary

    ds = open_results(args.dir)
    figures = plot_sweep(ds, args.out or args.dir)
    print(summary(ds))
    print("figures: " + ", ".join(str(p) for p in figures))
    return 0


def spec_cmd(args) -> int:
    from ._spec import spec_text

    print(spec_text("smoke" if args.smoke else "default"), end="")
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error of the command
        print(f"ddln: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def _parser():
    parser = _Parser(prog="ddln", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="simulate the layer and mirror flows of one network",
                       description="Simulate one network with the layer and the mirror flow, "
                       "print how far apart they are, and draw a figure.")
    p.add_argument("--depth", type=_positive("--depth"), default=3, help="depth L (default 3)")
    p.add_argument("--alpha", type=_real("--alpha"), default=0.5, help="init scale α (default 0.5)")
    p.add_argument("--t1", type=_real("--t1"), default=30.0, help="horizon (default 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="ddln_demo.png", help="figure path (default ddln_demo.png)")
    p.set_defaults(func=demo)

    p = sub.add_parser(
        "sweep", help="run a sweep of inits × depths × problems (the main job)",
        description="Run a sweep described by a TOML spec (or the shipped default spec), "
        "write the dataset chunk by chunk to --out (rerun to resume), draw the figures and "
        "print a summary. `ddln spec` prints the default spec as a starting point.",
    )
    p.add_argument("spec", nargs="?", help="TOML spec (default: the shipped default spec)")
    p.add_argument("--out", help="results directory (default ddln_results/<spec name>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--smoke", action="store_true",
                   help="run the default sweep at a reduced size (a quick check)")
    p.add_argument("--lanes", type=_positive("--lanes"), help="lanes per device (overrides [engine] lanes)")
    p.add_argument("--devices", type=_positive("--devices"),
                   help="number of devices (overrides [engine] devices); on a CPU, JAX is given "
                   "this many (one per core)")
    p.add_argument("--shard", type=_shard, metavar="i/N",
                   help="compute only shard i of N (job arrays: N jobs into one --out; the last "
                   "one assembles)")
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (one process per host/GPU; "
                   "process 0 writes)")
    g = p.add_argument_group("cluster submission (needs `pip install 'ddln_jax[cluster]'`)")
    g.add_argument("--executor", choices=["slurm", "local"],
                   help="submit --shards tasks as a job array through submitit (local: "
                   "subprocesses on this machine)")
    g.add_argument("--shards", type=_positive("--shards"), default=4, help="array size (default 4)")
    g.add_argument("--partition", help="Slurm partition")
    g.add_argument("--time", type=_positive("--time"), default=60, help="minutes per task (default 60)")
    g.add_argument("--cpus", type=_positive("--cpus"), default=4, help="CPUs per task (default 4)")
    g.add_argument("--gpus", type=_positive("--gpus"), help="GPUs per task")
    g.add_argument("--log-dir", help="submitit's folder (default OUT/jobs)")
    g.add_argument("--wait", action="store_true", help="wait for the tasks and report them")
    p.set_defaults(func=sweep_cmd)

    p = sub.add_parser("plot", help="redraw the figures of a results directory",
                       description="Redraw the figures and the summary of a finished sweep.")
    p.add_argument("dir", help="results directory of `ddln sweep`")
    p.add_argument("--out", help="where to write the figures (default: DIR)")
    p.set_defaults(func=plot_cmd)

    p = sub.add_parser("spec", help="print the default sweep spec",
                       description="Print the shipped default spec (TOML) to start your own.")
    p.add_argument("--smoke", action="store_true", help="print the reduced (smoke) spec instead")
    p.set_defaults(func=spec_cmd)
    return parser


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 2000 else text[:1997] + "..."


def _terminate(signum, frame):  # SIGTERM (Slurm's time limit, kill) ends like Ctrl-C
    raise KeyboardInterrupt


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from ._results import StoreError
    from ._spec import SpecError

    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread
        pass
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("ddln: interrupted; rerun to resume", file=sys.stderr)
        return 130
    except (SpecError, StoreError, _UsageError, ValueError, TypeError, OSError, MemoryError) as e:
        # Users' mistakes and the machine's limits, by type: specs, directories, arguments,
        # files (OSError: full disk, read-only places), sizes.
        if args.debug:
            raise
        kind = "" if isinstance(e, (SpecError, StoreError, _UsageError, ValueError)) else f"{type(e).__name__}: "
        print(f"ddln: error: {kind}{_one_line(e)}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
