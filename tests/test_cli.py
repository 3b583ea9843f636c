"""The `ddln` command line."""

import pytest

from ddln_jax import cli


def test_demo_runs_and_writes_a_figure(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert cli.main(["demo", "--t1", "5", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "max relative θ difference" in text and out.stat().st_size > 10_000


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--help"])
    assert e.value.code == 0 and "--alpha" in capsys.readouterr().out


def test_spec_prints_the_shipped_specs(capsys):
    from ddln_jax._spec import spec_text

    assert cli.main(["spec"]) == 0 and capsys.readouterr().out == spec_text("default")
    assert cli.main(["spec", "--smoke"]) == 0 and capsys.readouterr().out == spec_text("smoke")


def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    from ddln_jax import SpecError

    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\nrtol = 10.0\n")
    assert cli.main(["sweep", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == f"ddln: error: {bad}: [run] rtol: must be ≤ 0.01, got 10\n"
    with pytest.raises(SpecError):
        cli.main(["--debug", "sweep", str(bad), "--out", str(tmp_path / "o")])
