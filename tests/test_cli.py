"""The ``fabric`` command: its sub-commands are wired, help helps, the demo verifies bytes."""

from __future__ import annotations

import pytest

from fabric.cli import main


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("demo", "launch", "bench", "serve"))


def test_serve_lists_every_role(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert all(role in out for role in ("prefill", "decode", "aggregated", "frontend"))


def test_bench_forwards_to_the_benchmark_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["bench", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("kvbm", "copy", "transfer", "serve"))


def test_demo_runs_and_verifies_the_onboarded_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--prompt-tokens", "256"]) == 0
    out = capsys.readouterr().out
    assert out.count("bytes identical to what prefill wrote") == 2  # host hit, then disk hit


def test_bad_input_is_an_error_exit(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--prompt-tokens", "3"]) == 2
    assert "shorter than one block" in capsys.readouterr().err


def test_launch_refuses_a_negative_drain_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["launch", "--drain-timeout", "-1"]) == 2
    assert "--drain-timeout must be a number of seconds >= 0" in capsys.readouterr().err
