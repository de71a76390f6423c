"""CLI basics through typer.testing.CliRunner."""

from typer.testing import CliRunner

from pdae.cli import app

runner = CliRunner()


def test_help_lists_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    assert "params" in res.output and "convert" in res.output


def test_params_bad_value_is_one_line_error(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  lr: -1\n")
    res = runner.invoke(app, ["params", "--params", str(tmp_path / "params.yaml")])
    assert res.exit_code == 1
    assert "train.lr" in res.output and "Traceback" not in res.output


def test_params_override_and_unknown_key(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  lr: 0.001\n")
    res = runner.invoke(app, ["params", "--params", str(tmp_path / "params.yaml"), "-S", "train.z_dim=16"])
    assert res.exit_code == 0 and "z_dim: 16" in res.output
    res = runner.invoke(app, ["params", "--params", str(tmp_path / "params.yaml"), "-S", "train.zdim=16"])
    assert res.exit_code == 1 and "train.zdim: unknown key" in res.output
