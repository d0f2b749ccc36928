"""The launcher's structured config, ``hydra/launcher=population`` (``hydra.launcher.*``)."""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore


@dataclass
class PopulationLauncherConf:
    _target_: str = "hydra_plugins.ppo_cli_population.population_launcher.PopulationLauncher"

    # The most jobs trained as one population; a larger group is split into consecutive
    # populations of near-equal size (10 jobs with 8 at most: 5 + 5).
    max_members: int = 16
    # Torch intra-op threads of the population's process (0: one per core). A single run's small
    # MLPs are fastest on one thread (torch_threads=1); a population's stacked tensors are
    # max_members times larger, and its update runs about a third faster on two cores than on
    # one (benchmarks/RESULTS.md, "Population training"). The members' own torch_threads does not apply.
    torch_threads: int = 0


ConfigStore.instance().store(
    group="hydra/launcher", name="population", node=PopulationLauncherConf, provider="ppo_cli"
)
