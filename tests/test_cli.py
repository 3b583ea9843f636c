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
