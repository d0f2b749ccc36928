"""ppo-cli: the PPO family of algorithms behind one Hydra-driven command line."""

from typing import Any

__all__ = ["TrainedAgent", "load_agent"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``load_agent`` and ``TrainedAgent``, imported on first use: importing the package alone
    (as every console script does first, see ``launch.py``) must not import torch."""
    if name in __all__:
        from ppo_cli import policy

        return getattr(policy, name)
    raise AttributeError(f"module 'ppo_cli' has no attribute {name!r}")
