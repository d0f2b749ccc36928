"""ppo-cli: the PPO family of algorithms behind one Hydra-driven command line."""

from ppo_cli.policy import TrainedAgent, load_agent

__all__ = ["TrainedAgent", "load_agent"]
__version__ = "0.1.0"
