"""Fault injection on sweeps: every case ends with the exact uninterrupted dataset or one line
`ddln: error: …` (real subprocesses killed, interrupted, run together, under a file-size limit;
damaged, deleted and foreign files; a fuzzer over the default spec)."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import xarray as xr

import ddln_jax as dj
from ddln_jax import _spec, _sweep, cli
from ddln_jax._results import StoreError

# One small sweep for every case: 6 runs of depth 2 in 3 chunks (one compiled engine, shared
# with the subprocesses through the persistent compilation cache).
TINY = {
    "problem": {"kind": "sparse_regression", "n": 6, "d": 8, "sparsity": 2, "seeds": [0]},
    "init": {"scheme": "gaussian", "alpha": {"geomspace": [0.5, 1.0, 3]}, "seeds": [0, 1]},
    "run": {"depths": [2], "t1": 3000.0, "n_save": 5, "rtol": 1e-10, "atol": 1e-12},
    "engine": {"lanes": 1, "chunk_size": 2},
}
SEED = int(os.environ.get("DDLN_FAULT_SEED", "0"))


def toml(raw) -> str:
    lines = [f"{k} = {json.dumps(v)}" for k, v in raw.items() if not isinstance(v, dict)]
    for section, values in ((k, v) for k, v in raw.items() if isinstance(v, dict)):
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, dict):
                inner = ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items())
                lines.append(f"{key} = {{{inner}}}")
            else:
                lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted sweep, on disk, and its spec file."""
    root = tmp_path_factory.mktemp("faults")
    (root / "tiny.toml").write_text(toml(TINY))
    ds = dj.sweep(root / "tiny.toml", root / "ref", progress=False)
    return ds, root


def same(a, b):
    xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())


def copy_of(reference, tmp_path, name="out"):
    dst = tmp_path / name
    shutil.copytree(reference[1] / "ref", dst)
    return dst


def start(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "ddln_jax.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    return False


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and "WARNING" not in line
             and "Warning" not in line and not line.startswith("  warnings.warn")]
    assert len(lines) == 1 and lines[0].startswith("ddln: error: "), stderr[-3000:]
    return lines[0]


def test_interrupt_and_concurrent_sweep(reference, tmp_path):
    """Ctrl-C in the middle: one line, status 130; a second sweep meanwhile is refused (the
    first keeps its files); the rerun gives the uninterrupted dataset, redoing no chunk.

    TINY's 3 chunks take a few ms once compiled, so the child could finish before the signal
    (15 chunks were not enough when the suite's other worker held the CPU): 60 chunks of the
    same engine program leave room to land it mid-sweep."""
    raw = json.loads(json.dumps(TINY))
    raw["init"]["alpha"]["geomspace"] = [0.5, 1.0, 60]
    spec, out = tmp_path / "many.toml", tmp_path / "out"
    spec.write_text(toml(raw))
    expected = dj.sweep(spec, tmp_path / "ref", progress=False)
    proc = start(["sweep", str(spec), "--out", str(out), "--quiet"])
    chunks = out / "chunks"
    assert wait_for(lambda: chunks.is_dir() and any(chunks.glob("*.nc")), proc), proc.communicate()
    os.kill(proc.pid, signal.SIGSTOP)  # hold it mid-sweep while a second sweep tries
    try:
        with pytest.raises(StoreError, match="is in use by another sweep"):
            dj.sweep(spec, out, progress=False)
        assert cli.main(["sweep", str(spec), "--out", str(out), "--quiet"]) == 2
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    n_at = len(list(chunks.glob("*.nc")))
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip(f"the sweep finished before the interrupt arrived ({n_at} chunks at the signal; {err[-500:]!r})")
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "ddln: interrupted; rerun to resume", err
    before = {p.name: p.stat().st_mtime_ns for p in chunks.glob("*.nc")}
    assert 1 <= len(before) < 60
    ds = dj.sweep(spec, out, progress=False)
    same(ds, expected)
    assert all((chunks / n).stat().st_mtime_ns == t for n, t in before.items())  # not redone
    assert not list(chunks.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def test_sigkill_at_a_random_moment(reference, tmp_path):
    rng = np.random.default_rng(SEED)
    delay = float(rng.uniform(0.0, 2.0))
    spec, out = reference[1] / "tiny.toml", tmp_path / "out"
    proc = start(["sweep", str(spec), "--out", str(out), "--quiet"])
    assert wait_for(lambda: (out / "spec.json").exists(), proc), proc.communicate()
    time.sleep(delay)
    proc.kill()
    proc.communicate()
    ds = dj.sweep(spec, out, progress=False)
    assert ds.identical(reference[0]) or same(ds, reference[0]) is None, f"seed {SEED}, delay {delay:.2f} s"


def test_full_disk_is_one_line_and_resumes(reference, tmp_path):
    """A file-size limit (as a full disk): one line naming the file, status 2; rerun resumes."""
    spec, out = reference[1] / "tiny.toml", tmp_path / "out"
    limit = 2 * (reference[1] / "ref" / "problems.nc").stat().st_size  # chunks fit, results do not

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = start(["sweep", str(spec), "--out", str(out), "--quiet"], preexec_fn=limited)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    line = one_error_line(err)
    assert "cannot write" in line and "file-size limit" in line, line
    same(dj.sweep(spec, out, progress=False), reference[0])


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_damaged_chunk_is_reported_and_recomputed(reference, tmp_path, damage):
    out = copy_of(reference, tmp_path)
    (out / "results.nc").unlink()
    victim = sorted((out / "chunks").glob("*.nc"))[1]
    data = bytearray(victim.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":  # one bit of a stored value: the file still opens
        value = xr.open_dataset(victim, engine="netcdf4").load()["theta_final"].values[0, 0]
        at = bytes(data).find(np.float64(value).tobytes())
        assert at > 0
        data[at + 3] ^= 0x10
    else:
        data = b""
    victim.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=f"{victim.name}.*(cannot be read|checksum)"):
        ds = dj.sweep(reference[1] / "tiny.toml", out, progress=False)
    same(ds, reference[0])
    assert victim.exists() and (victim.parent / (victim.name + ".damaged")).exists()


def test_damaged_results_file_is_rebuilt(reference, tmp_path, monkeypatch, capsys):
    out = copy_of(reference, tmp_path)
    path = out / "results.nc"
    path.write_bytes(path.read_bytes()[:1000])
    assert cli.main(["plot", str(out)]) == 2
    assert "rerun the sweep on this directory to rebuild it" in one_error_line(capsys.readouterr().err)
    monkeypatch.setattr(_sweep, "run_queue", lambda *a, **k: pytest.fail("recomputed"))
    with pytest.warns(UserWarning, match="rebuilding it from the chunks"):
        same(dj.sweep(reference[1] / "tiny.toml", out, progress=False), reference[0])
    same(dj.open_results(out), reference[0])


def test_deleted_spec_file_and_changed_spec(reference, tmp_path, monkeypatch):
    """Issue 9.1: with spec.json gone, another spec is refused by the chunks' digests (with or
    without results.nc); the same spec resumes from them."""
    out = copy_of(reference, tmp_path)
    (out / "spec.json").unlink()
    other = {**TINY, "run": {**TINY["run"], "t1": 1500.0}}
    with pytest.raises(StoreError, match="holds results of a different spec"):
        dj.sweep(other, out, progress=False)  # results.nc kept
    (out / "results.nc").unlink()
    with pytest.raises(StoreError, match="holds results of a different spec"):
        dj.sweep(other, out, progress=False)
    assert not (out / "spec.json").exists()
    monkeypatch.setattr(_sweep, "run_queue", lambda *a, **k: pytest.fail("recomputed"))
    ds = dj.sweep(reference[1] / "tiny.toml", out, progress=False)
    same(ds, reference[0])
    # Every chunk was loaded: the engine statistics are still the computed ones.
    assert ds.attrs["lane_efficiency"] == reference[0].attrs["lane_efficiency"] > 0


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", ""])
def test_damaged_spec_file_is_one_line(reference, tmp_path, capsys, content):
    out = copy_of(reference, tmp_path)
    (out / "results.nc").unlink()
    (out / "spec.json").write_text(content)
    assert cli.main(["sweep", str(reference[1] / "tiny.toml"), "--out", str(out), "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "spec.json is damaged" in line and "removing spec.json alone" in line


def test_changed_chunk_size_reuses_finished_runs(reference, tmp_path, monkeypatch):
    """Issue 9.3: a resume with another chunk size computes only the runs not on disk."""
    out = copy_of(reference, tmp_path)
    (out / "results.nc").unlink()
    sorted((out / "chunks").glob("*.nc"))[0].unlink()  # 2 runs missing
    computed = []
    real = _sweep.run_queue

    def counting(config, loss, u0, *a, **k):
        computed.append(len(u0))
        return real(config, loss, u0, *a, **k)

    monkeypatch.setattr(_sweep, "run_queue", counting)
    other = {**TINY, "engine": {"lanes": 1, "chunk_size": 4}}
    ds = dj.sweep(other, out, progress=False)
    assert computed == [2]
    xr.testing.assert_allclose(ds.drop_attrs(), reference[0].drop_attrs(), rtol=1e-12, atol=0)
    theta = dj.load_trajectories(out, alpha=reference[0].alpha.values[0])  # no duplicate runs
    assert theta.sizes["alpha"] == 1 and theta.sizes["seed"] == 2


def test_failed_start_leaves_no_spec_file(reference, tmp_path):
    """Issue 9.10: a spec refused after the directory was opened leaves nothing behind, and the
    corrected spec then runs there."""
    out = tmp_path / "out"
    bad = {**TINY, "init": {**TINY["init"], "alpha": [1e200]}}  # θ0 overflows
    with pytest.raises(dj.SpecError, match="f\\(θ0\\) is not finite"):
        dj.sweep(bad, out, progress=False)
    deep = {**TINY, "run": {**TINY["run"], "depths": [10000]}}  # θ0 underflows to 0
    with pytest.raises(dj.SpecError, match="at depth 10000 the product θ0 .* underflows"):
        dj.sweep(deep, out, progress=False)
    assert not (out / "spec.json").exists() and not (out / "problems.nc").exists()
    same(dj.sweep(reference[1] / "tiny.toml", out, progress=False), reference[0])


def test_store_usability(reference, tmp_path, monkeypatch):
    """Issue 9.10: file modes, a finished sweep needs no write access, unwritable chunks/ found
    before compute, the data file hashed by its bytes."""
    ref = reference[1] / "ref"
    mask = os.umask(0o022)
    os.umask(mask)
    expected = 0o666 & ~mask
    for path in [ref / "results.nc", ref / "problems.nc", *(ref / "chunks").glob("*.nc")]:
        assert path.stat().st_mode & 0o777 == expected, path
    # Loading a finished sweep opens nothing for writing.
    monkeypatch.setattr("ddln_jax._results.ResultStore.open", lambda *a, **k: pytest.fail("opened"))
    same(dj.sweep(reference[1] / "tiny.toml", ref, progress=False), reference[0])
    monkeypatch.undo()
    # chunks/ unwritable: refused before anything is computed.
    import ddln_jax._results as results

    real = results._writable

    def chunks_read_only(directory):
        if directory.name == "chunks":
            raise PermissionError(13, "Permission denied", str(directory))
        return real(directory)

    monkeypatch.setattr(results, "_writable", chunks_read_only)
    monkeypatch.setattr(_sweep, "run_queue", lambda *a, **k: pytest.fail("computed"))
    with pytest.raises(StoreError, match="not writable .*chunks"):
        dj.sweep(TINY, tmp_path / "new", progress=False)
    monkeypatch.undo()
    # Moving the data file keeps the digest (its bytes are hashed, not its path).
    X = np.random.default_rng(0).normal(size=(5, 8))
    np.savez(tmp_path / "a.npz", X=X, y=X[:, 0])
    (tmp_path / "moved").mkdir()
    shutil.copy(tmp_path / "a.npz", tmp_path / "moved" / "b.npz")
    spec = lambda p: dj.SweepSpec.from_dict({**TINY, "problem": {"kind": "data", "path": str(p)}})
    assert spec(tmp_path / "a.npz").digest() == spec(tmp_path / "moved" / "b.npz").digest()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_finished_sweep_is_loadable(reference, tmp_path):
    out = copy_of(reference, tmp_path)
    for p in [out, out / "chunks"]:
        p.chmod(0o555)
    try:
        same(dj.sweep(reference[1] / "tiny.toml", out, progress=False), reference[0])
    finally:
        for p in [out, out / "chunks"]:
            p.chmod(0o755)


# -- the spec fuzzer -------------------------------------------------------------------------


class WouldCompute(Exception):
    pass


def mutations():
    base = _spec.tomllib.loads(_spec.spec_text("default"))
    values = {"string": "x", "list": [], "table": {}, "bool": True, "negative": -1, "zero": 0,
              "huge_int": 10**30, "huge_float": 1e300, "nan_text": "nan", "nested": [[1]]}
    for section, keys in base.items():
        for key in keys:
            for label, value in values.items():
                raw = json.loads(json.dumps(base))
                raw[section][key] = value
                yield f"{section}.{key}={label}", raw
            raw = json.loads(json.dumps(base))
            del raw[section][key]
            yield f"{section}.{key} missing", raw
        raw = json.loads(json.dumps(base))
        raw[section]["extra_key"] = 1
        yield f"{section}.extra_key", raw
        raw = json.loads(json.dumps(base))
        raw[section] = 3
        yield f"{section}=3", raw
    yield "extra section", {**base, "solver": {}}
    yield "alpha count 3e7", {**base, "init": {**base["init"], "alpha": {"geomspace": [0.1, 1.0, 30_000_000]}}}
    yield "n_save 3e7", {**base, "run": {**base["run"], "n_save": 30_000_000}}
    yield "d 1e9", {**base, "problem": {**base["problem"], "d": 10**9}}
    yield "n 1e12", {**base, "problem": {**base["problem"], "n": 10**12}}
    yield "rtol 10", {**base, "run": {**base["run"], "rtol": 10.0}}
    yield "rtol 1e8", {**base, "run": {**base["run"], "rtol": 1e8}}


def test_spec_fuzzer(tmp_path, monkeypatch, capsys):
    """Every mutation of the default spec is refused with one line before anything is
    compiled, or is a valid sweep that reaches the engine."""
    def would_compute(*a, **k):
        raise WouldCompute

    # Past every check of the spec, the sizes and the directory, the sweep would start.
    monkeypatch.setattr(_sweep, "_run", would_compute)
    outcomes = {}
    for label, raw in mutations():
        path = tmp_path / "fuzz.toml"
        path.write_text(toml(raw))
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        start = time.perf_counter()
        try:
            rc = cli.main(["sweep", str(path), "--out", str(tmp_path / "out"), "--quiet"])
        except WouldCompute:
            outcomes[label] = "runs"
            continue
        err = capsys.readouterr().err
        assert rc == 2, (label, err)
        line = one_error_line(err)
        assert time.perf_counter() - start < 10, label  # sized before allocating
        outcomes[label] = line
        assert not (tmp_path / "out" / "spec.json").exists(), label
    runs = {k for k, v in outcomes.items() if v == "runs"}
    # The valid ones (read once by hand): defaults, or large but meaningful values (their runs
    # would end with statuses; f(θ0) is checked in `test_failed_start_leaves_no_spec_file`).
    assert runs == {k for k in outcomes if k.endswith(" missing")} | {
        "problem.noise=zero", "problem.noise=huge_int", "problem.noise=huge_float",
        "problem.seeds=zero", "init.alpha=huge_int", "init.alpha=huge_float", "init.seeds=zero",
        "run.t1=huge_int", "run.t1=huge_float"}
    assert "GiB" in outcomes["d 1e9"] and "GiB" in outcomes["n 1e12"]
    assert "[run] rtol: must be ≤ 0.01, got 10" in outcomes["rtol 10"]
    assert "[init] alpha" in outcomes["alpha count 3e7"] and "[run] n_save" in outcomes["n_save 3e7"]
    assert len(outcomes) > 200


def test_cli_errors_are_one_line(tmp_path, capsys):
    """Issue 9.8: users' mistakes on the command line."""
    cases = []
    bad_utf8 = tmp_path / "latin1.toml"
    bad_utf8.write_bytes("[run]\nt1 = 1.0 # é\n".encode("latin-1"))
    cases.append((["sweep", str(bad_utf8)], "not UTF-8"))
    np.save(tmp_path / "data.npy", np.ones((3, 3)))
    X = np.random.default_rng(0).normal(size=(4, 8))
    for name, arrays, match in [
        ("npy", None, "not an .npz archive"),
        ("zero", {"X": np.zeros((4, 8)), "y": np.ones(4)}, "all zero"),
        ("rows", {"X": np.zeros((0, 8)), "y": np.zeros(0)}, "n, d ≥ 1"),
        ("complex", {"X": X + 1j, "y": np.ones(4)}, "complex"),
    ]:
        data = tmp_path / ("data.npy" if name == "npy" else f"{name}.npz")
        if arrays is not None:
            np.savez(data, **arrays)
        spec = tmp_path / f"{name}.toml"
        spec.write_text(toml({"problem": {"kind": "data", "path": str(data)}}))
        cases.append((["sweep", str(spec)], match))
    good = tmp_path / "ok.npz"
    np.savez(good, X=X, y=X[:, 0])
    spec = tmp_path / "nd.toml"
    spec.write_text(toml({"problem": {"kind": "data", "path": str(good), "d": 5}}))
    cases.append((["sweep", str(spec)], "[problem] d: not used with kind = 'data'"))
    cases += [
        (["demo", "--depth", "0"], "--depth must be ≥ 1"),
        (["sweep", "--smoke", "--lanes", "-3"], "--lanes must be ≥ 1"),
        (["sweep", "--smoke", "--devices", "0"], "--devices must be ≥ 1"),
        (["sweep", "--smoke", "--shard", "4/4"], "0 ≤ i < N"),
        (["plot", str(tmp_path / "missing")], "is not a directory of sweep results"),
        (["plot", str(tmp_path)], "holds no finished sweep"),
    ]
    for argv, match in cases:
        try:
            rc = cli.main([*argv, "--out", str(tmp_path / "o")] if argv[0] == "sweep" else argv)
        except SystemExit as e:  # argparse's own errors
            rc = e.code
        assert rc == 2, argv
        assert match in one_error_line(capsys.readouterr().err), argv


def test_devices_beyond_the_machine(capsys, tmp_path):
    n = len(jax.devices())
    assert cli.main(["sweep", "--smoke", "--devices", str(n + 1), "--out", str(tmp_path)]) == 2
    assert f"{n + 1} requested, {n} available" in one_error_line(capsys.readouterr().err)
