"""The launcher Hydra instantiates for ``hydra/launcher=population``."""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class PopulationLauncher(Launcher):
    """Trains each group of compatible jobs as one population in this process; runs the jobs that
    cannot be batched one after another, as Hydra's basic launcher does."""

    def __init__(self, max_members: int = 16, torch_threads: int = 0) -> None:
        self.max_members = max_members
        self.torch_threads = torch_threads
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra_plugins.ppo_cli_population import _core

        return _core.launch(self, job_overrides, initial_job_idx)
