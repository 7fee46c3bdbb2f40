"""User errors have their own type: a ValueError subclass the CLI prints as one line; anything else is a bug and
keeps its traceback."""

from __future__ import annotations

import pytest

import smore
from smore import cli


def test_a_bad_config_value_is_a_user_error_and_still_a_value_error():
    with pytest.raises(smore.UserError, match="top_k"):
        smore.SMoREConfig(num_experts=[4, 4], top_k=[5, 2])
    assert issubclass(smore.UserError, ValueError)


def test_the_cli_prints_a_user_error_in_one_line(tmp_path, caplog):
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2
    errors = [record for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1 and "missing.yaml" in errors[0].getMessage() and errors[0].exc_info is None


def test_the_cli_lets_a_bug_show_its_traceback(monkeypatch, tmp_path):
    def broken(args):
        raise ValueError("a library bug, not the user's mistake")

    parser = cli.build_parser()
    args = parser.parse_args(["train", str(tmp_path / "run.yaml")])
    monkeypatch.setattr(cli, "build_parser", lambda: type("P", (), {"parse_args": lambda self, argv: args})())
    monkeypatch.setattr(args, "func", broken, raising=False)
    with pytest.raises(ValueError, match="library bug"):
        cli.main(["train", str(tmp_path / "run.yaml")])
