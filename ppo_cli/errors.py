"""The one exception type that means "the user asked for something we cannot do".

Anything raised as a :class:`UserError` reaches the console as one line on stderr and a non-zero
exit code, without a traceback. Every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a config value, an environment id, a file. The message is shown as is."""


class ConfigError(UserError):
    """A config value that is out of range or inconsistent with another one."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
