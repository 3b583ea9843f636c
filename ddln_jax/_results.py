"""Sweep results on disk: a directory written chunk by chunk, safe to interrupt.

```
OUT/spec.json            the spec and its digest (a different spec is refused)
OUT/problems.nc          the problem data (X, y, θ*, f*, μ)
OUT/chunks/<name>.nc     finished chunks of runs, each written to a temporary file and renamed
OUT/results.nc           the assembled dataset, once every run is there
OUT/.lock                held while a sweep writes (shared by the shards of one sweep)
```
A chunk file exists only when it is complete (rename is atomic), so a sweep killed at any
moment, even by SIGKILL, resumes from the chunks on disk and never duplicates one. Every chunk
carries the digest of its spec and a checksum of its values, checked when it is read: a chunk
of another spec is refused, a damaged one is reported, set aside (`*.damaged`) and recomputed.
A damaged `results.nc` is rebuilt from the chunks. Host-side (files, NumPy).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import warnings
from pathlib import Path

import numpy as np
import xarray as xr

_ENGINE = "netcdf4"
# Errors a damaged or unreadable netCDF file raises (netCDF4/HDF5 report through all of them).
_READ_ERRORS = (OSError, RuntimeError, ValueError, KeyError, IndexError, TypeError, EOFError)


class StoreError(OSError):
    """A results directory cannot be used as asked: not writable, held by another sweep,
    holding another spec's results, damaged beyond repair, or the disk is full. The message
    says which file and what to do."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def checksum(ds: xr.Dataset) -> str:
    """A hash of a dataset's values (names, dtypes, shapes and bytes of every variable)."""
    h = hashlib.sha256()
    for name in sorted(ds.variables, key=str):
        v = np.ascontiguousarray(ds[name].values)
        h.update(f"{name}|{v.dtype.str}|{v.shape}|".encode())
        h.update(v.tobytes())
    return h.hexdigest()[:32]


def _atomic_write(ds: xr.Dataset, path: Path) -> None:
    # The temporary's name says who writes it, so that only stale ones are ever removed.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{socket.gethostname()}.{os.getpid()}.",
                               suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are ordinary files
        ds.to_netcdf(tmp, engine=_ENGINE)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        why = getattr(e, "strerror", None) or str(e)
        hint = ""
        if isinstance(e, RuntimeError) or getattr(e, "errno", None) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            hint = " (is the disk full or a file-size limit reached?)"
        raise StoreError(f"cannot write {path}: {why}{hint}; finished chunks are kept, rerun to resume") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_dataset(path) -> xr.Dataset:
    """Open a netCDF file written by a sweep, fully loaded (no file handle kept).

    **Raises:** `StoreError` when the file is missing, truncated or not netCDF.
    """
    try:
        with xr.open_dataset(path, engine=_ENGINE) as ds:
            return ds.load()
    except _READ_ERRORS as e:
        raise StoreError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e


def _read_verified(path: Path, digest: str | None) -> xr.Dataset:
    """A chunk or results file, checked: readable, of spec `digest`, values as written.

    **Raises:** `StoreError` (damaged) or `_Foreign` (another spec's file).
    """
    ds = load_dataset(path)
    stored = ds.attrs.get("checksum")
    if stored is None:
        raise StoreError(f"{path}: no checksum (not written by this version, or damaged)")
    if digest is not None and ds.attrs.get("spec_digest") != digest:
        raise _Foreign(path, ds.attrs.get("spec_digest"))
    if checksum(ds) != stored:
        raise StoreError(f"{path}: its values do not match its checksum (damaged)")
    del ds.attrs["checksum"]
    return ds


class _Foreign(Exception):
    def __init__(self, path, digest):
        super().__init__(path, digest)
        self.path, self.digest = path, digest


def _writable(directory: Path) -> None:
    probe = tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test", delete=True)
    probe.close()


class ResultStore:
    """The results directory of one sweep spec (by its digest).

    **Arguments:**

    - `out`: the directory.
    - `digest`: the spec digest its files must carry.
    - `payload`: what `spec.json` holds (the spec as a dict).
    """

    def __init__(self, out, digest: str, payload: dict):
        self.root = Path(out)
        self.digest = digest
        self.payload = payload
        self._lock = None
        self.started = False

    # -- reading ---------------------------------------------------------------------------

    @property
    def final_path(self) -> Path:
        return self.root / "results.nc"

    @property
    def problems_path(self) -> Path:
        return self.root / "problems.nc"

    @property
    def chunks_dir(self) -> Path:
        return self.root / "chunks"

    def load_final(self) -> xr.Dataset | None:
        """The finished dataset when `results.nc` is there and intact; None otherwise (a
        damaged one is reported and will be rebuilt). Needs no write access."""
        if not self.final_path.exists():
            return None
        try:
            return _read_verified(self.final_path, self.digest)
        except _Foreign as f:
            raise self._foreign(f) from None
        except StoreError as e:
            warnings.warn(f"{e}; rebuilding it from the chunks", stacklevel=3)
            return None

    def _foreign(self, f: _Foreign) -> StoreError:
        return StoreError(
            f"output directory {str(self.root)!r} holds results of a different spec ({f.path.name} "
            f"has digest {f.digest}, this spec {self.digest}); refusing to mix them: choose "
            "another directory or remove this one"
        )

    def check_spec_file(self) -> None:
        spec_file = self.root / "spec.json"
        if not spec_file.exists():
            return
        try:
            old = json.loads(spec_file.read_text("utf-8"))
            if not isinstance(old, dict):
                raise ValueError(f"a JSON {type(old).__name__}, not an object")
        except (OSError, ValueError) as e:
            raise StoreError(
                f"{spec_file} is damaged ({e}); every chunk carries its spec's digest, so "
                "removing spec.json alone (not the directory) and rerunning resumes safely"
            ) from e
        if old.get("digest") != self.digest:
            raise StoreError(
                f"output directory {str(self.root)!r} holds results of a different spec "
                f"(digest {old.get('digest')}, this spec {self.digest}); refusing to mix "
                "them: choose another directory or remove this one"
            )

    def scan(self, *, repair: bool = True) -> dict[str, xr.Dataset]:
        """Every intact chunk of this spec, by name. A damaged chunk is reported and set aside
        as `*.damaged` (when `repair`), so that its runs are computed again; a chunk of another
        spec is refused (`StoreError`)."""
        found = {}
        if not self.chunks_dir.is_dir():
            return found
        for path in sorted(self.chunks_dir.glob("*.nc")):
            try:
                found[path.stem] = _read_verified(path, self.digest)
            except _Foreign as f:
                raise self._foreign(f) from None
            except StoreError as e:
                if not path.exists():  # removed meanwhile (set aside by another shard)
                    continue
                warnings.warn(f"{e}; its runs will be computed again", stacklevel=3)
                if repair:
                    try:
                        os.replace(path, path.with_name(path.name + ".damaged"))
                    except OSError:
                        pass
        return found

    # -- writing ---------------------------------------------------------------------------

    def open(self, *, shared: bool = False) -> None:
        """Check that the directory can take this sweep, before anything is computed: writable
        (the root and `chunks/`), not held by another sweep, not another spec's.

        A plain sweep holds the directory's lock alone; the shards of one sweep (`shared`)
        hold it together. Only with the lock held alone are leftover temporaries removed."""
        try:
            self.chunks_dir.mkdir(parents=True, exist_ok=True)
            _writable(self.root)
            _writable(self.chunks_dir)
        except OSError as e:
            where = e.filename or self.root
            raise StoreError(f"output directory {str(self.root)!r} is not writable ({e.strerror or e}: {where})") from e
        self.check_spec_file()
        lock_path = self.root / ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            try:
                holder = os.read(fd, 200).decode(errors="replace").strip()
            except OSError:
                pass
            os.close(fd)
            raise StoreError(
                f"output directory {str(self.root)!r} is in use by another sweep"
                f"{' (' + holder + ')' if holder else ''}; wait for it to finish, or run "
                "shards of one sweep together with --shard i/N"
            ) from None
        self._lock = fd
        if not shared:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
            # Temporaries of writes that were killed half-way: nobody else writes now.
            for stale in [*self.chunks_dir.glob("*.tmp"), *self.root.glob(".*.tmp")]:
                stale.unlink(missing_ok=True)

    def close(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            os.close(self._lock)
            self._lock = None

    def begin(self, problems: xr.Dataset) -> None:
        """Write `spec.json` and `problems.nc` (once the spec has passed every check, so that a
        failed start leaves nothing that would refuse the corrected spec)."""
        if self.started:
            return
        spec_file = self.root / "spec.json"
        if not spec_file.exists():
            tmp = self.root / f".spec.json.{socket.gethostname()}.{os.getpid()}.tmp"
            try:
                tmp.write_text(json.dumps({"digest": self.digest, "spec": self.payload},
                                          indent=2, sort_keys=True))
                os.replace(tmp, spec_file)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise StoreError(f"cannot write {spec_file}: {e.strerror or e}") from e
        if not self.problems_path.exists():
            self.write(self.problems_path, problems)
        self.started = True

    def write(self, path: Path, ds: xr.Dataset) -> None:
        ds = ds.copy()
        ds.attrs["spec_digest"] = self.digest
        ds.attrs["checksum"] = checksum(ds)
        _atomic_write(ds, path)

    def chunk_path(self, name: str) -> Path:
        return self.chunks_dir / f"{name}.nc"

    def write_chunk(self, name: str, ds: xr.Dataset) -> None:
        self.write(self.chunk_path(name), ds)

    def write_final(self, ds: xr.Dataset) -> None:
        self.write(self.final_path, ds)


def open_results(out) -> xr.Dataset:
    """Load the dataset of a finished sweep directory (read-only access is enough).

    **Raises:** `StoreError` when the directory holds no finished sweep or its results file is
    damaged (rerun the sweep: it rebuilds `results.nc` from the chunks).
    """
    root = Path(out)
    path = root / "results.nc"
    if not root.is_dir():
        raise StoreError(f"{str(root)!r} is not a directory of sweep results")
    if not path.exists():
        raise StoreError(f"{str(root)!r} holds no finished sweep (no results.nc); rerun the sweep to finish it")
    try:
        return _read_verified(path, None)
    except StoreError as e:
        raise StoreError(f"{e}; rerun the sweep on this directory to rebuild it from the chunks") from e
