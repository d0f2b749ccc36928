"""Turn one rollout into parameter updates, one Updater class per variant of the family."""

from __future__ import annotations

import copy
import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from ppo_cli import losses
from ppo_cli.agent import ActorCritic, Evaluation
from ppo_cli.config import (
    A2CConfig,
    ActorCriticConfig,
    AlgoConfig,
    ClipConfig,
    GRPOConfig,
    PenaltyConfig,
    PGConfig,
    RegressedCriticConfig,
    SurrogateConfig,
    TRPOConfig,
)
from ppo_cli.distributed import SINGLE_PROCESS, DataParallel
from ppo_cli.distributions import ActionDistribution
from ppo_cli.errors import NonFiniteError
from ppo_cli.rollout import RolloutStorage
from ppo_cli.trpo import trust_region_step
from ppo_cli.trunk import Memory


@dataclass
class Batch:
    """The valid transitions of one rollout, flattened to (B, ...), with their advantage targets.

    Minibatches are drawn along :attr:`SAMPLE_AXIS`: single transitions here, whole env
    sequences in :class:`SequenceBatch`.
    """

    SAMPLE_AXIS = 0

    obs: torch.Tensor
    actions: torch.Tensor
    log_probs: torch.Tensor
    policy_params: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    action_masks: torch.Tensor | None = None  # allowed actions, when the envs report them

    @classmethod
    def from_storage(
        cls, storage: RolloutStorage, advantages: torch.Tensor, returns: torch.Tensor, chunks: int = 1
    ) -> Batch:
        """Flatten time and env dimensions and drop the fake steps of NEXT_STEP autoreset (a
        recurrent agent's storage gives a :class:`SequenceBatch` of ``chunks`` sequences per env
        instead)."""
        if storage.states is not None:
            return SequenceBatch.of_sequences(storage, advantages, returns, chunks)
        valid = storage.valid.flatten()
        keep = None if bool(valid.all()) else valid.nonzero().squeeze(-1)

        def flat(x: torch.Tensor) -> torch.Tensor:
            x = x.flatten(0, 1)
            return x if keep is None else x[keep]

        return cls(
            flat(storage.obs),
            flat(storage.actions),
            flat(storage.log_probs),
            flat(storage.policy_params),
            flat(storage.values),
            flat(advantages),
            flat(returns),
            None if storage.action_masks is None else flat(storage.action_masks),
        )

    @property
    def memory(self) -> Memory | None:
        """What a recurrent agent replays its sequences from (none here: no sequences)."""
        return None

    def __len__(self) -> int:
        return self.obs.shape[self.SAMPLE_AXIS]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """The batch with ``fn`` applied to every field (that holds a tensor)."""
        values = (getattr(self, f.name) for f in dataclasses.fields(self))
        mapped: list[Any] = [None if x is None else fn(x) for x in values]
        return type(self)(*mapped)

    def shuffled_minibatches(self, num_minibatches: int) -> Iterator[Batch]:
        """The batch in a fresh random order, cut into ``num_minibatches`` consecutive parts
        whose sizes differ by at most one (like ``torch.tensor_split``).

        Each field is gathered once per call; the minibatches are views of the gathered copy.
        """
        axis = self.SAMPLE_AXIS
        order = torch.randperm(len(self), device=self.obs.device)
        shuffled = self.map(lambda field: field.index_select(axis, order))
        size, extra = divmod(len(self), num_minibatches)
        start = 0
        for i in range(num_minibatches):
            length = size + (i < extra)
            yield shuffled.map(lambda field: field.narrow(axis, start, length))  # noqa: B023 (used at once)
            start += length


@dataclass
class SequenceBatch(Batch):
    """A recurrent agent's rollout as env sequences: every field keeps its (steps, sequences, ...)
    shape, so that minibatches are sets of sequences (axis 1), each replayed from the state the
    agent held at its first step (trunk.py). The losses are elementwise: they take (L, n) as
    they take (B,).

    Each env's T steps are one sequence, or ``chunks`` consecutive ones of T / chunks steps
    when more minibatches are asked for than there are envs (truncated backpropagation through
    time, starting each chunk from the state stored while acting).
    """

    SAMPLE_AXIS = 1
    initial_state: torch.Tensor | None = None  # (1, sequences, state_dim): axis 1 is the sequence
    starts: torch.Tensor | None = None  # (L, sequences)

    @classmethod
    def of_sequences(
        cls, storage: RolloutStorage, advantages: torch.Tensor, returns: torch.Tensor, chunks: int
    ) -> SequenceBatch:
        assert storage.states is not None and storage.starts is not None
        assert bool(storage.valid.all())  # same-step autoreset: no fake steps inside a sequence
        length = storage.num_steps // chunks

        def cut(x: torch.Tensor) -> torch.Tensor:
            """(T, N, ...) -> (T / chunks, chunks * N, ...): chunk c of env n is sequence c * N + n."""
            pieces = x.reshape(chunks, length, *x.shape[1:]).transpose(0, 1)
            return pieces.reshape(length, -1, *x.shape[2:])

        return cls(
            cut(storage.obs),
            cut(storage.actions),
            cut(storage.log_probs),
            cut(storage.policy_params),
            cut(storage.values),
            cut(advantages),
            cut(returns),
            None if storage.action_masks is None else cut(storage.action_masks),
            cut(storage.states)[:1],
            cut(storage.starts),
        )

    @property
    def memory(self) -> Memory:
        assert self.initial_state is not None and self.starts is not None
        return Memory(self.initial_state[0], self.starts)


class Updater(ABC):
    """Turns one rollout's Batch into parameter updates for one variant of the family.

    State that must survive from one iteration to the next (PPO-Penalty's beta) lives here and
    goes into checkpoints through :meth:`state_dict`. Under data parallelism (``parallel``, see
    ``distributed.py``) gradients, and the numbers decisions are taken on, are averaged over the
    ranks; the metrics returned are those averages.
    """

    def __init__(
        self,
        agent: ActorCritic,
        optimizer: torch.optim.Optimizer,
        cfg: AlgoConfig,
        parallel: DataParallel = SINGLE_PROCESS,
    ) -> None:
        self.agent = agent
        self.optimizer = optimizer
        self.cfg = cfg
        self.parallel = parallel
        self.params = [p for p in agent.parameters() if p.requires_grad]
        # What the optimizer steps: the agent's packed tensors (see packing.py) or its parameters.
        self.stepped = [p for group in optimizer.param_groups for p in group["params"]]
        self.reset_state()

    def reset_state(self) -> None:  # noqa: B027 (most variants keep no state: nothing to do)
        """Set the variant's own state (what :meth:`state_dict` holds) to its start."""

    def step(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """One optimizer step on ``loss`` with the global gradient norm clipped to
        ``max_grad_norm``; a non-finite loss or gradient stops training before the step.

        Parameters that ``loss`` does not depend on get no gradient, so the optimizer leaves them
        alone. ``terms`` are the loss's parts, named in the error when one of them is not finite.
        Under data parallelism the gradient is the ranks' mean, and a non-finite loss on any rank
        stops them all (its mean, averaged with the gradient, is then not finite either).
        """
        for param in self.params:
            param.grad = None
        loss.backward()
        for pack in self.agent.packs:
            pack.gather_grad()
        mean_loss = self.parallel.average_gradients(self.stepped, loss)
        grad_norm = nn.utils.clip_grad_norm_(self.stepped, self.cfg.max_grad_norm)
        if not bool(torch.isfinite(mean_loss) & torch.isfinite(grad_norm)):  # one device sync per step
            raise NonFiniteError(self._non_finite_report(loss, terms))
        self.optimizer.step()

    def _non_finite_report(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> str:
        if not torch.isfinite(loss):
            values = {name: float(value.detach()) for name, value in terms.items()}
            bad = [f"{name}={value:g}" for name, value in values.items() if not math.isfinite(value)]
            return f"the loss is {float(loss.detach()):g} (non-finite terms: {', '.join(bad) or 'none'})"
        for name, param in self.agent.named_parameters():
            if param.grad is not None and not bool(torch.isfinite(param.grad).all()):
                return f"the gradient of {name} is not finite (loss {float(loss.detach()):g})"
        return "the gradient norm is not finite"

    @abstractmethod
    def update(self, batch: Batch) -> dict[str, float]:
        """Update the agent; returns the quantities to log (means over the minibatches that ran)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; stateless variants accept only ``{}``."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {sorted(state)}")


class SurrogateUpdater(Updater):
    """Epochs x shuffled minibatches on a ratio objective (PPO-Clip, PPO-Penalty, GRPO).

    With ``target_kl`` set, the k3 estimate of KL(pi_old || pi) of each minibatch is checked
    *before* its optimizer step (it comes from the same forward pass), and the update stops at the
    first minibatch that exceeds it, so no step is ever taken from a policy already too far away.

    The logged losses are means over the minibatches that ran; the logged KL estimates are
    measured once, after the update, over the whole batch: how far this iteration moved the policy.
    """

    cfg: SurrogateConfig | GRPOConfig

    @abstractmethod
    def minibatch_loss(self, out: Evaluation, mb: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss to minimise, {name: term to log}) for the minibatch ``mb``."""

    def update(self, batch: Batch) -> dict[str, float]:
        cfg = self.cfg
        logged: list[torch.Tensor] = []  # one row of logged terms per minibatch
        names: list[str] = []
        stopped_early = False
        for _ in range(cfg.update_epochs):
            for mb in batch.shuffled_minibatches(cfg.num_minibatches):
                out = self.agent.evaluate(mb.obs, mb.actions, mb.action_masks, mb.memory)
                if cfg.target_kl is not None:
                    k3 = losses.kl_estimates(out.log_prob.detach(), mb.log_probs).k3
                    if self.parallel.average(k3).item() > cfg.target_kl:
                        stopped_early = True
                        break
                loss, terms = self.minibatch_loss(out, mb)
                self.step(loss, terms)
                names = list(terms)
                # Kept on the device; read back once per update, not once per minibatch.
                logged.append(torch.stack([value.detach() for value in terms.values()]))
            if stopped_early:
                break
        means = torch.stack(logged).mean(dim=0).tolist() if logged else []
        metrics = dict(zip(names, means, strict=True))
        metrics.update(minibatch_updates=float(len(logged)), early_stop=float(stopped_early))
        metrics.update(measure_kl(self.agent, batch))
        return self.parallel.average_metrics(metrics)


class ActorCriticSurrogateUpdater(SurrogateUpdater):
    """PPO-Clip and PPO-Penalty: policy term + c1 * value loss - c2 * entropy, GAE advantages."""

    cfg: SurrogateConfig

    @abstractmethod
    def policy_loss(self, out: Evaluation, mb: Batch, advantages: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"policy_loss": ..., <extra logged terms>}`` for one minibatch; may carry gradients."""

    def value_clip_eps(self) -> float | None:
        return None

    def minibatch_loss(self, out: Evaluation, mb: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        advantages = losses.normalize_advantages(mb.advantages) if cfg.norm_adv else mb.advantages
        terms = self.policy_loss(out, mb, advantages)
        terms["value_loss"] = losses.value_loss(out.value, mb.values, mb.returns, self.value_clip_eps())
        terms["entropy"] = out.entropy.mean()
        loss = terms["policy_loss"] - cfg.ent_coef * terms["entropy"] + cfg.vf_coef * terms["value_loss"]
        return loss, terms


class KLTerms(NamedTuple):
    """The sample estimates of KL(pi_old || pi) and its exact value, for one minibatch."""

    k1: torch.Tensor
    k2: torch.Tensor
    k3: torch.Tensor
    exact: torch.Tensor

    @classmethod
    def measure(
        cls, dist: ActionDistribution, out: Evaluation, old_log_prob: torch.Tensor, old_params: torch.Tensor
    ) -> KLTerms:
        """All four for the samples behind ``out`` (with gradients, if ``out`` has them)."""
        exact = dist.kl(old_params, out.policy_params).mean()
        return cls(*losses.kl_estimates(out.log_prob, old_log_prob), exact)


@torch.no_grad()
def measure_kl(agent: ActorCritic, batch: Batch) -> dict[str, float]:
    """Every KL estimate between pi_old and the current policy over the whole batch, as logged:
    under ``kl_*``, plus CleanRL's names for k1 and k3 so curves overlay."""
    kl = KLTerms.measure(
        agent.dist,
        agent.evaluate(batch.obs, batch.actions, batch.action_masks, batch.memory),
        batch.log_probs,
        batch.policy_params,
    )
    values = {f"kl_{name}": float(value) for name, value in kl._asdict().items()}
    return {**values, "old_approx_kl": values["kl_k1"], "approx_kl": values["kl_k3"]}


class ClipUpdater(ActorCriticSurrogateUpdater):
    """PPO-Clip: the clipped surrogate; value clipping with the same epsilon."""

    cfg: ClipConfig

    def policy_loss(self, out: Evaluation, mb: Batch, advantages: torch.Tensor) -> dict[str, torch.Tensor]:
        eps = self.cfg.clip_eps
        return {
            "policy_loss": losses.clipped_surrogate_loss(out.log_prob, mb.log_probs, advantages, eps),
            "clipfrac": losses.clip_fraction(out.log_prob.detach(), mb.log_probs, eps),
        }

    def value_clip_eps(self) -> float | None:
        return self.cfg.clip_eps if self.cfg.clip_vloss else None


class PenaltyUpdater(ActorCriticSurrogateUpdater):
    """PPO-Penalty: -mean(rho * A) + beta * KL(pi_old || pi), KL from ``algo.kl_estimator``.

    beta starts at ``kl_coef``; with ``adaptive`` it follows :func:`losses.adaptive_kl_coef` after
    every iteration, driven by the KL between pi_old and the updated policy over the whole batch.
    """

    cfg: PenaltyConfig

    def reset_state(self) -> None:
        self.beta = self.cfg.kl_coef

    def policy_loss(self, out: Evaluation, mb: Batch, advantages: torch.Tensor) -> dict[str, torch.Tensor]:
        estimator = self.cfg.kl_estimator  # only the one the penalty uses, with gradients
        if estimator == "exact":
            penalty = self.agent.dist.kl(mb.policy_params, out.policy_params).mean()
        else:
            penalty = getattr(losses.kl_estimates(out.log_prob, mb.log_probs), estimator)
        surrogate = losses.surrogate_loss(out.log_prob, mb.log_probs, advantages)
        return {"policy_loss": surrogate + self.beta * penalty, "surrogate_loss": surrogate}

    def update(self, batch: Batch) -> dict[str, float]:
        metrics = super().update(batch)
        metrics["kl_beta"] = self.beta  # the beta this iteration's update used
        if self.cfg.adaptive:
            measured = metrics[f"kl_{self.cfg.kl_estimator}"]  # over the batch, after the update
            metrics["kl_after_update"] = measured
            self.beta = losses.adaptive_kl_coef(
                self.beta,
                measured,
                self.cfg.kl_target,
                self.cfg.beta_factor,
                self.cfg.kl_tolerance,
                (self.cfg.beta_min, self.cfg.beta_max),
            )
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta = float(state["beta"])


class GRPOUpdater(SurrogateUpdater):
    """GRPO: clipped surrogate on group-relative advantages, plus kl_coef * KL(pi || pi_ref).

    The KL to the frozen reference policy uses the k3 form on the stored actions,
    mean(r - 1 - log r) with r = pi_ref(a|s) / pi(a|s) (Shao et al. 2024, eq. 4). The reference
    is the initial policy, or a copy refreshed every ``ref_update_every`` updates. There is no
    critic: the agent's value network receives no gradient.
    """

    cfg: GRPOConfig

    def reset_state(self) -> None:
        self.reference = copy.deepcopy(self.agent).requires_grad_(False)
        self.updates = 0

    def minibatch_loss(self, out: Evaluation, mb: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            ref_params = self.reference.policy_params(mb.obs, mb.action_masks, mb.memory)
            ref_log_prob = self.reference.dist.log_prob(ref_params, mb.actions)
        log_ratio = ref_log_prob - out.log_prob
        ref_kl = (torch.expm1(log_ratio) - log_ratio).mean()
        eps = self.cfg.clip_eps
        surrogate = losses.clipped_surrogate_loss(out.log_prob, mb.log_probs, mb.advantages, eps)
        terms = {
            "policy_loss": surrogate + self.cfg.kl_coef * ref_kl,
            "surrogate_loss": surrogate,
            "ref_kl": ref_kl,
            "entropy": out.entropy.mean(),
            "clipfrac": losses.clip_fraction(out.log_prob.detach(), mb.log_probs, eps),
        }
        return terms["policy_loss"] - self.cfg.ent_coef * terms["entropy"], terms

    def update(self, batch: Batch) -> dict[str, float]:
        metrics = super().update(batch)
        self.updates += 1
        if self.cfg.ref_update_every and self.updates % self.cfg.ref_update_every == 0:
            self.reference.load_state_dict(self.agent.state_dict())
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "reference": self.reference.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        self.reference.load_state_dict(state["reference"])


class A2CUpdater(Updater):
    """A2C: one step per rollout on -mean(log pi * A) - c2 * H + c1 * 0.5 * mean((V - R)^2)."""

    cfg: ActorCriticConfig

    def _policy_terms(self, batch: Batch) -> tuple[Evaluation, dict[str, torch.Tensor]]:
        out = self.agent.evaluate(batch.obs, batch.actions, batch.action_masks, batch.memory)
        advantages = losses.normalize_advantages(batch.advantages) if self.cfg.norm_adv else batch.advantages
        terms = {
            "policy_loss": losses.policy_gradient_loss(out.log_prob, advantages),
            "entropy": out.entropy.mean(),
        }
        return out, terms

    def update(self, batch: Batch) -> dict[str, float]:
        out, terms = self._policy_terms(batch)
        terms["value_loss"] = losses.value_loss(out.value, batch.values, batch.returns, None)
        self.step(
            terms["policy_loss"]
            - self.cfg.ent_coef * terms["entropy"]
            + self.cfg.vf_coef * terms["value_loss"],
            terms,
        )
        return self.metrics_after_step(batch, terms)

    def metrics_after_step(self, batch: Batch, terms: dict[str, torch.Tensor]) -> dict[str, float]:
        """The logged terms plus how far the single step moved the policy (every KL estimate)."""
        metrics = {key: float(value.detach()) for key, value in terms.items()}
        return self.parallel.average_metrics({**metrics, **measure_kl(self.agent, batch)})


class PGUpdater(A2CUpdater):
    """REINFORCE with baseline: one policy step, then the critic is regressed on the returns."""

    cfg: PGConfig

    def update(self, batch: Batch) -> dict[str, float]:
        _, terms = self._policy_terms(batch)
        self.step(terms["policy_loss"] - self.cfg.ent_coef * terms["entropy"], terms)
        terms["value_loss"] = regress_critic(self, batch, self.cfg)
        return self.metrics_after_step(batch, terms)


def regress_critic(updater: Updater, batch: Batch, cfg: RegressedCriticConfig) -> torch.Tensor:
    """``value_epochs`` x ``value_minibatches`` regression steps of V on the returns; mean loss.

    Only the critic receives gradients here, so the policy is untouched whatever the optimizer.
    """
    value_losses = []
    for _ in range(cfg.value_epochs):
        order = torch.randperm(len(batch), device=batch.obs.device)
        for idx in torch.tensor_split(order, cfg.value_minibatches):
            value_loss = losses.value_loss(
                updater.agent.value(batch.obs[idx]), batch.values[idx], batch.returns[idx], None
            )
            updater.step(cfg.vf_coef * value_loss, {"value_loss": value_loss})
            value_losses.append(value_loss.detach())
    return torch.stack(value_losses).mean()


class TRPOUpdater(A2CUpdater):
    """TRPO: one trust-region step of the policy (see ``trpo.py``), then critic regression."""

    cfg: TRPOConfig

    def update(self, batch: Batch) -> dict[str, float]:
        cfg = self.cfg
        advantages = losses.normalize_advantages(batch.advantages) if cfg.norm_adv else batch.advantages

        def surrogate() -> torch.Tensor:
            params = self.agent.policy_params(batch.obs, batch.action_masks, batch.memory)
            log_prob, entropy = self.agent.dist.log_prob_entropy(params, batch.actions)
            return (
                -losses.surrogate_loss(log_prob, batch.log_probs, advantages) + cfg.ent_coef * entropy.mean()
            )

        def mean_kl() -> torch.Tensor:
            new_params = self.agent.policy_params(batch.obs, batch.action_masks, batch.memory)
            return self.agent.dist.kl(batch.policy_params, new_params).mean()

        result = trust_region_step(
            self.agent.actor_parameters(),
            surrogate,
            mean_kl,
            cfg.max_kl,
            cfg.cg_iterations,
            cfg.cg_damping,
            cfg.line_search_steps,
            cfg.backtrack_coef,
            self.parallel.average,
        )
        _, terms = self._policy_terms(batch)
        terms["value_loss"] = regress_critic(self, batch, cfg)
        metrics = self.metrics_after_step(batch, terms)
        metrics.update(
            surrogate_improvement=result.surrogate_after - result.surrogate_before,
            line_search_fraction=result.step_fraction,
        )
        return metrics


UPDATERS: dict[type[AlgoConfig], type[Updater]] = {
    ClipConfig: ClipUpdater,
    PenaltyConfig: PenaltyUpdater,
    PGConfig: PGUpdater,
    A2CConfig: A2CUpdater,
    TRPOConfig: TRPOUpdater,
    GRPOConfig: GRPOUpdater,
}


def make_updater(
    cfg: AlgoConfig,
    agent: ActorCritic,
    optimizer: torch.optim.Optimizer,
    parallel: DataParallel = SINGLE_PROCESS,
) -> Updater:
    """The updater of the configured variant (one per schema in ``config.ALGO_SCHEMAS``), for a
    single process unless ``parallel`` says otherwise."""
    return UPDATERS[type(cfg)](agent, optimizer, cfg, parallel)
