"""Scale-out: shards of one sweep into one directory (Slurm job arrays, submitted through
submitit's local executor here) and jax.distributed with several real local CPU processes.
Every way of splitting gives the single-process dataset bit for bit."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import xarray as xr
from test_faults import TINY, toml

import ddln_jax as dj
from ddln_jax import _sweep


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The sweep in one process (in memory), and its spec file."""
    root = tmp_path_factory.mktemp("scale")
    (root / "tiny.toml").write_text(toml(TINY))
    return dj.sweep(root / "tiny.toml", progress=False), root / "tiny.toml"


def identical(a, b):
    xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())


def test_four_shards_equal_one_process(single, tmp_path, monkeypatch):
    """`shard=(i, 4)` computes chunk k only when k mod 4 = i; a plain sweep over the shards'
    directory assembles without computing; so does the last shard."""
    ref, spec = single
    out = tmp_path / "out"
    for count, i in enumerate([3, 0, 1]):
        assert dj.sweep(spec, out, progress=False, shard=(i, 4)) is None  # not complete yet
        # TINY has 3 chunks: shard 3 has none, shard i < 3 computes chunk i alone.
        assert len(list((out / "chunks").glob("*.nc"))) == count
    last = dj.sweep(spec, out, progress=False, shard=(2, 4))  # completes the sweep: assembles
    identical(last, ref)
    names = sorted(p.name for p in (out / "chunks").glob("*.nc"))
    (out / "results.nc").unlink()
    monkeypatch.setattr(_sweep, "run_queue", lambda *a, **k: pytest.fail("recomputed"))
    identical(dj.sweep(spec, out, progress=False), ref)  # a plain sweep assembles the shards'
    assert sorted(p.name for p in (out / "chunks").glob("*.nc")) == names


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core")
def test_cli_devices_runs_on_the_cpu_cores(single, tmp_path):
    """`ddln sweep --devices 2` on a CPU gives JAX two devices (one per core) and shares the
    lanes between them: the one-device dataset, to 1e-10."""
    ref, spec = single
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    res = subprocess.run([sys.executable, "-m", "ddln_jax.cli", "sweep", str(spec), "--out",
                          str(out), "--devices", "2", "--quiet"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    two = dj.open_results(out)
    assert two.attrs["devices"] == 2 and ref.attrs["devices"] == 1
    for name in ["theta", "loss", "theta_final"]:
        np.testing.assert_allclose(two[name].values, ref[name].values, rtol=1e-10, atol=1e-14,
                                   err_msg=name)
    assert np.array_equal(two.status.values, ref.status.values)


def test_shards_share_the_directory_but_not_with_a_plain_sweep(single, tmp_path):
    """Shards hold the directory's lock together; a plain sweep holds it alone."""
    from ddln_jax._results import ResultStore, StoreError

    a = ResultStore(tmp_path, "d", {})
    b = ResultStore(tmp_path, "d", {})
    a.open(shared=True)
    b.open(shared=True)
    with pytest.raises(StoreError, match="in use by another sweep"):
        ResultStore(tmp_path, "d", {}).open()
    a.close()
    b.close()
    c = ResultStore(tmp_path, "d", {})
    c.open()
    with pytest.raises(StoreError, match="in use by another sweep"):
        ResultStore(tmp_path, "d", {}).open(shared=True)
    c.close()


def test_submitit_job_array(single, tmp_path):
    """`ddln sweep --executor local --shards 2`: a job array through submitit (its local
    executor runs the tasks as processes here, as Slurm would on a cluster)."""
    pytest.importorskip("submitit")
    ref, spec = single
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "ddln_jax.cli", "sweep", str(spec), "--out", str(out),
                          "--executor", "local", "--shards", "2", "--wait", "--quiet"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "submitted 2 shards to local" in res.stdout and "the sweep is complete" in res.stdout
    identical(dj.open_results(out), ref)


WORKER = textwrap.dedent(
    """
    import sys
    import jax
    pid, n, port, spec, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=n,
                               process_id=pid, initialization_timeout=120)
    jax.config.update("jax_enable_x64", True)
    import ddln_jax as dj
    import ddln_jax._results as results
    assert jax.process_count() == n and len(jax.local_devices()) == 1
    if pid != 0:  # only process 0 may touch the directory
        def refuse(*a, **k):
            raise AssertionError(f"process {pid} wrote")
        results._atomic_write = refuse
        results.ResultStore.open = refuse
        results.ResultStore.begin = refuse
    ds = dj.sweep(spec, out, progress=False)
    print("OK", pid, ds.attrs["n_runs"], ds.attrs["devices"], flush=True)
    """
)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(n, spec, out, script):
    port = _free_port()
    return [subprocess.Popen([sys.executable, str(script), str(i), str(n), str(port), str(spec), str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]


@pytest.mark.parametrize("n", [2, pytest.param(4, marks=pytest.mark.skipif(
    not os.environ.get("DDLN_SLOW_TESTS"), reason="4 processes: set DDLN_SLOW_TESTS=1"))])
def test_jax_distributed(single, tmp_path, n):
    """n local CPU processes under jax.distributed: each computes its chunks on its own
    device, process 0 gathers and writes. A process killed mid-sweep leaves a directory that
    the next run resumes, and the result equals the one-process sweep bit for bit."""
    ref, spec = single
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "out"
    procs = _launch(n, spec, out, script)
    chunks = out / "chunks"
    deadline = time.time() + 300
    while time.time() < deadline and not (chunks.is_dir() and any(chunks.glob("*.nc"))):
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.005)
    procs[-1].send_signal(signal.SIGKILL)  # one process dies mid-sweep ...
    try:
        procs[0].wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    for p in procs:  # ... and the job with it (as a scheduler would end it)
        if p.poll() is None:
            p.kill()
        p.communicate()
    before = {p.name: p.stat().st_mtime_ns for p in chunks.glob("*.nc")}
    assert not (out / "results.nc").exists() or len(before) == 3
    procs = _launch(n, spec, out, script)  # the rerun resumes
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (so, se) in zip(procs, outputs):
        assert p.returncode == 0 and "OK" in so, se[-3000:]
    assert all(f"OK {i} 6 {n}" in so for i, (so, _) in enumerate(outputs))
    identical(dj.open_results(out), ref)
    assert all((chunks / k).stat().st_mtime_ns == t for k, t in before.items())  # kept
