"""GracefulStop: a first signal is a request, a second stops at once, an echo is neither."""

from __future__ import annotations

import os
import signal
import time

import pytest

from ppo_cli.errors import Interrupted
from ppo_cli.signals import GracefulStop


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
