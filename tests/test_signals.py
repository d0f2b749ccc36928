"""GracefulStop: a first signal is a request, a second stops at once, an echo is neither."""

from __future__ import annotations

import os
import signal
import time

import pytest

from ppo_cli import cli
from ppo_cli.errors import Interrupted, UserError
from ppo_cli.signals import STOP_SIGNALS, GracefulStop


@pytest.fixture(autouse=True)
def _fresh_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts as a new process would: no signal taken yet (else the last test's last
    signal, a moment ago, would make this test's first one look like its echo)."""
    monkeypatch.setattr(GracefulStop, "_last", (0, -float("inf")))


def test_a_second_signal_stops_at_once() -> None:
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        with pytest.raises(Interrupted) as raised:
            os.kill(os.getpid(), signal.SIGTERM)
    assert raised.value.exit_code == 128 + signal.SIGTERM


def test_the_same_signal_within_the_echo_window_is_one_request() -> None:
    """Under torchrun a rank gets Ctrl-C twice: from the terminal and forwarded by torchrun."""
    with GracefulStop(echo_window=0.5) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the forwarded copy
        assert stop.signum == signal.SIGINT
        with pytest.raises(Interrupted):
            os.kill(os.getpid(), signal.SIGTERM)  # another signal is a second request
    with GracefulStop(echo_window=0.5) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.6)
        with pytest.raises(Interrupted):
            os.kill(os.getpid(), signal.SIGINT)  # too late to be an echo


def test_the_echo_of_a_signal_that_stopped_the_process_is_ignored() -> None:
    """A forwarded copy must not interrupt the clean-up (closing envs, writing summary.json) of a
    stop at once, nor the handler of the command around the training loop."""
    with GracefulStop(echo_window=0.5, graceful=False):
        with GracefulStop(echo_window=0.5) as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signum == signal.SIGINT
            with pytest.raises(Interrupted):
                os.kill(os.getpid(), signal.SIGTERM)  # a second request: at once
            os.kill(os.getpid(), signal.SIGTERM)  # its echo
        os.kill(os.getpid(), signal.SIGTERM)  # another echo, reaching the outer handler


@pytest.mark.parametrize(
    ("exc", "ignored"),
    [(Interrupted(signal.SIGTERM, "stopped by SIGTERM"), True), (UserError("seed: not a number"), False)],
    ids=["stopped by a signal", "bad input"],
)
def test_a_command_ending_for_a_signal_ignores_later_copies_of_one(exc: BaseException, ignored: bool) -> None:
    """ppo-train's last words after a stop signal (cli._exit_if_expected): a late copy (the
    supervisor's echo on a loaded machine) must not kill it while it exits, when Python has put the
    default handlers back; another ending leaves the handlers alone."""
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli._exit_if_expected(exc, "ppo-train")
        assert exit_info.value.code == (128 + signal.SIGTERM if ignored else UserError.exit_code)
        handlers = [signal.getsignal(signum) for signum in STOP_SIGNALS]
        assert handlers == ([signal.SIG_IGN] * 2 if ignored else list(previous.values()))
        if ignored:
            os.kill(os.getpid(), signal.SIGTERM)  # the late echo: nothing happens
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
