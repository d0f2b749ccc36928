"""The variants of the family, one module each: its updater (its loss) and its :class:`Variant`
(what the training loop asks of it). Adding a variant: a module here, listed in
:data:`VARIANTS`; its schema in ``config.py``; its preset ``configs/algo/<name>.yaml``."""

from __future__ import annotations

import torch

from ppo_cli.agent import ActorCritic
from ppo_cli.algos.a2c import A2C
from ppo_cli.algos.clip import Clip
from ppo_cli.algos.grpo import GRPO
from ppo_cli.algos.penalty import Penalty
from ppo_cli.algos.pg import PG
from ppo_cli.algos.trpo import TRPO
from ppo_cli.algos.variant import Variant
from ppo_cli.config import AlgoConfig, TrainConfig
from ppo_cli.distributed import SINGLE_PROCESS, DataParallel
from ppo_cli.update import Updater

VARIANTS: dict[type[AlgoConfig], type[Variant]] = {
    variant.schema: variant for variant in (Clip, Penalty, PG, A2C, TRPO, GRPO)
}


def variant_of(cfg: TrainConfig) -> Variant:
    """The variant ``cfg.algo`` configures, for the run ``cfg``."""
    return VARIANTS[type(cfg.algo)](cfg)


def make_updater(
    cfg: AlgoConfig,
    agent: ActorCritic,
    optimizer: torch.optim.Optimizer,
    parallel: DataParallel = SINGLE_PROCESS,
) -> Updater:
    """The updater of the variant ``cfg`` configures, for a single process unless ``parallel``
    says otherwise."""
    return VARIANTS[type(cfg)].updater(agent, optimizer, cfg, parallel)
