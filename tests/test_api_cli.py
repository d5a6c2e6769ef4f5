"""The command line: flags, their environment twins, and the write token file."""

from __future__ import annotations

import stat

import pytest

from app.cli import _settings, _with_api_token, build_parser
from app.core.config import Settings


def parse(*argv: str):
    return _settings(build_parser().parse_args(list(argv)))


def test_flags_override_env_which_overrides_defaults(monkeypatch):
    monkeypatch.setenv("NTK_UNLEARN_WIDTH", "32")
    monkeypatch.setenv("NTK_UNLEARN_LAM", "0.5")
    monkeypatch.setenv("REDIS_URL", "redis://example:6379/0")
    s = parse("serve", "--lam", "0.25", "--w-std", "1.5", "--no-refine", "--model", "linear")
    assert s.width == 32 and s.lam == 0.25 and s.w_std == 1.5
    assert s.refine is False and s.model == "linear"
    assert s.redis_url == "redis://example:6379/0"
    assert s.loss == "ce" and s.dataset == "digits"
    # Unset depth means the model kind's default (a148377): 2 hidden layers for linear/mlp.
    assert s.depth is None and s.to_model_config().depth == 2


def test_every_setting_is_a_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in text
    assert "--no-refine" in text and "--no-worker" in text


def test_invalid_settings_exit_with_a_message():
    with pytest.raises(SystemExit, match="lam"):
        parse("serve", "--lam", "-1")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--model", "resnet"])


def test_write_token_is_generated_once_with_mode_0600(tmp_path, monkeypatch):
    monkeypatch.delenv("NTK_UNLEARN_API_TOKEN", raising=False)
    s = parse("serve", "--data-dir", str(tmp_path))
    first = _with_api_token(s)
    path = tmp_path / "api_token"
    assert first.api_token and path.read_text().strip() == first.api_token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert _with_api_token(s).api_token == first.api_token  # reused, not regenerated


def test_given_token_wins_over_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("NTK_UNLEARN_API_TOKEN", "from-env")
    assert _with_api_token(parse("serve", "--data-dir", str(tmp_path))).api_token == "from-env"
    s = parse("serve", "--data-dir", str(tmp_path), "--api-token", "from-flag")
    assert _with_api_token(s).api_token == "from-flag"
    assert not (tmp_path / "api_token").exists()


def test_bench_hand_off_keeps_the_exit_status():
    from app.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", "no-such-benchmark"])
    assert exc.value.code == 2
