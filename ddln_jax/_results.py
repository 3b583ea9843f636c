"""Sweep results on disk: a directory written chunk by chunk, safe to interrupt.

```
OUT/spec.json            the spec and its digest (a different spec is refused)
OUT/problems.nc          the problem data (X, y, θ*, f*, μ)
OUT/chunks/<name>.nc     finished chunks, each written to a temporary file and renamed
OUT/results.nc           the assembled dataset, once every chunk is there
```
A chunk file exists only when it is complete (rename is atomic), so a sweep killed at any
moment, even by SIGKILL, resumes from the chunks on disk and never duplicates one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import jax
import xarray as xr

from ._spec import SpecError, SweepSpec

_ENGINE = "netcdf4"


def _atomic_write(ds: xr.Dataset, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        ds.to_netcdf(tmp, engine=_ENGINE)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_dataset(path) -> xr.Dataset:
    """Open a netCDF file written by a sweep, fully loaded (no file handle kept)."""
    with xr.open_dataset(path, engine=_ENGINE) as ds:
        return ds.load()


class ResultStore:
    """The results directory of one sweep spec."""

    def __init__(self, out, spec: SweepSpec):
        self.root = Path(out)
        self.spec = spec
        try:
            (self.root / "chunks").mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.root, prefix=".write-test", delete=True)
            probe.close()
        except OSError as e:
            raise ValueError(f"output directory {str(self.root)!r} is not writable ({e.strerror})") from e
        self.writer = jax.process_index() == 0  # with several hosts, one writes
        # Leftovers of a write that was killed half-way.
        if self.writer:
            for stale in [*(self.root / "chunks").glob("*.tmp"), *self.root.glob("*.tmp")]:
                stale.unlink(missing_ok=True)
        spec_file = self.root / "spec.json"
        if spec_file.exists():
            try:
                old = json.loads(spec_file.read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f"{spec_file}: unreadable ({e}); remove the directory to start over") from e
            if old.get("digest") != spec.digest():
                raise SpecError(
                    f"output directory {str(self.root)!r} holds results of a different spec "
                    f"(digest {old.get('digest')}, this spec {spec.digest()}); refusing to mix "
                    "them: choose another directory or remove this one"
                )
        elif self.writer:
            payload = {"digest": spec.digest(), "spec": spec.to_dict()}
            tmp = spec_file.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
            os.replace(tmp, spec_file)

    def chunk_path(self, name: str) -> Path:
        return self.root / "chunks" / f"{name}.nc"

    def has_chunk(self, name: str) -> bool:
        return self.chunk_path(name).exists()

    def write_chunk(self, name: str, ds: xr.Dataset) -> None:
        _atomic_write(ds, self.chunk_path(name))

    def load_chunk(self, name: str) -> xr.Dataset:
        return load_dataset(self.chunk_path(name))

    @property
    def problems_path(self) -> Path:
        return self.root / "problems.nc"

    def write_problems(self, ds: xr.Dataset) -> None:
        if self.writer and not self.problems_path.exists():
            _atomic_write(ds, self.problems_path)

    @property
    def final_path(self) -> Path:
        return self.root / "results.nc"

    def write_final(self, ds: xr.Dataset) -> None:
        _atomic_write(ds, self.final_path)


def open_results(out) -> xr.Dataset:
    """Load the dataset of a finished sweep directory."""
    path = Path(out) / "results.nc"
    if not path.exists():
        raise ValueError(f"{str(Path(out))!r} holds no finished sweep (no results.nc); rerun the sweep to resume it")
    return load_dataset(path)
