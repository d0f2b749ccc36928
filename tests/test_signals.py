"""GracefulStop: a first signal is a request, a second stops at once, an echo is neither."""

from __future__ import annotations

import os
import signal
import time

import pytest

from ppo_cli.errors import Interrupted
from ppo_cli.signals import GracefulStop


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
