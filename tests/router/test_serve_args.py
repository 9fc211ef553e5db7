"""`coralline serve`'s arguments -> the StackConfig, and what its verifiers are started with."""

import pytest

from coralline.cli import _stack_config, build_parser
from coralline.router.stack import Stack


@pytest.mark.parametrize("speculation", [None, "budget", "always"])
def test_serve_hands_speculation_to_every_verifier(tmp_path, speculation):
    argv = ["serve", "--port", "0", "--log-dir", str(tmp_path)]
    argv += ["--speculation", speculation] if speculation else []
    parser = build_parser()
    config = _stack_config(parser.parse_args(argv))
    verifier_argv = Stack(config)._verifier_args()
    verifier = parser.parse_args(["verifier", *verifier_argv])  # the verifier accepts them
    assert verifier.speculation == (speculation or "measured")
    assert verifier.no_drafter and verifier.max_sessions == config.max_sessions


def test_serve_refuses_an_unknown_speculation(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--speculation", "sometimes"])
    assert "invalid choice" in capsys.readouterr().err
