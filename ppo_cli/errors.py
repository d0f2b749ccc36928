"""The exceptions that end a run cleanly: one line on stderr and a documented exit code.

Anything raised as a :class:`UserError` (or a subclass) reaches the console as one line on stderr
and exits with its ``exit_code``, without a traceback. :class:`Interrupted` does the same for a
signal. Every other exception is a bug and keeps its traceback.

Exit codes: 1 the environment failed (its own code raised, or it broke its observation space),
2 bad input, 3 training diverged (non-finite numbers), 128 + N stopped by signal N (130 for Ctrl-C,
143 for SIGTERM), as shells report a process killed by that signal.
"""


class UserError(Exception):
    """Bad input: a config value, an environment id, a file. The message is shown as is."""

    exit_code = 2


class ConfigError(UserError):
    """A config value that is out of range or inconsistent with another one."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key


class NonFiniteError(UserError):
    """A NaN or infinity in an env output, a loss or a gradient: training stops before the
    optimizer step, so the weights and the last checkpoint stay as they were."""

    exit_code = 3


class EnvError(UserError):
    """The environment failed in reset or step: its own code raised, or it returned an observation
    its space does not allow.

    ``details`` is the traceback of the env's code when it raised, shown below the one line: that
    code is the user's (or a simulator's), and its traceback is what they need to fix it.
    """

    exit_code = 1

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


class Interrupted(BaseException):
    """SIGINT or SIGTERM stopped the run. A BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` on the way (Hydra's job runner among them) mistakes it for a failed job."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum
