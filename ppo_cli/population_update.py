"""The update of a population's members at once (``population.py``): their batches stacked along a
leading member dimension, one batched forward and backward per minibatch, one Adam step.

Each member's loss is its own variant's: the first member's updater code (``minibatch_loss`` of
PPO-Clip and PPO-Penalty, ``batch_loss`` of A2C, TRPO's ``surrogate_of`` and ``mean_kl_of`` and
its critic's loss) runs under ``torch.func.vmap`` over the members,
with each member's values of the hyperparameters that differ between them (a learning rate, a
clip range, ...) and of its updater's own numbers (PPO-Penalty's beta) passed in as tensors. So
the loss is written once, in ``algos/``, and means, advantage normalisations and clip fractions
are each member's own. The loop around it is the single run's (``update.py``) with its decisions
made per member: each member's minibatch order comes from its own random generator, a member
whose KL passes ``target_kl`` stops stepping for the rest of the update while the others go on,
and a member whose loss or gradient is not finite stops (its error is returned) before its step.
TRPO's step is ``trust_region.batched_trust_region_step``: each member's conjugate gradient and
line search, on the rows of the stacked actor.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch
from torch.func import vmap

from ppo_cli.agent import Evaluation
from ppo_cli.algos.a2c import A2CUpdater
from ppo_cli.algos.clip import ClipUpdater
from ppo_cli.algos.penalty import PenaltyUpdater
from ppo_cli.algos.pg import PGUpdater
from ppo_cli.algos.trpo import TRPOUpdater
from ppo_cli.batch import Batch
from ppo_cli.config import AlgoConfig
from ppo_cli.errors import NonFiniteError
from ppo_cli.stacked import StackedAdam, StackedAgents
from ppo_cli.trust_region import batched_trust_region_step, non_finite_gradient
from ppo_cli.update import CriticRegression, OneStepUpdater, SurrogateUpdater, Updater, critic_regression_loss

LossFn = Callable[[Updater, Evaluation, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]
MemberResult = dict[str, float] | NonFiniteError


def batched_loss_of(updater: Updater) -> LossFn | None:
    """The loss a population minimises by Adam steps for ``updater``'s variant; None for TRPO
    (a trust-region step of the policy, then critic regression: :meth:`PopulationUpdate._trust_region`)
    and for GRPO (not batched yet)."""
    if isinstance(updater, ClipUpdater | PenaltyUpdater):
        return lambda u, out, mb: u.minibatch_loss(out, mb)  # type: ignore[attr-defined]
    if isinstance(updater, A2CUpdater | PGUpdater):
        return lambda u, out, mb: u.batch_loss(out, mb)  # type: ignore[attr-defined]
    return None


def differing(values: Sequence[Any]) -> bool:
    return any(value != values[0] for value in values[1:])


class PopulationUpdate:
    """Updates K members' agents (stacked in ``agents``, stepped by ``adam``) from their batches.

    ``updaters`` are the members' own (the first one's code computes every member's loss);
    ``draw_orders(sizes)`` gives each member's random order of its ``sizes[k]`` samples, drawn
    from the member's own generator. ``padded_to``: the members' batches may hold fewer samples
    than that (their envs reset on the next step: ``envs.py``), and every batch and minibatch is
    padded to the size it would have if none were missing (:func:`_minibatches`), whatever the
    other members hold, so that no member's arithmetic depends on another's.
    """

    def __init__(
        self,
        updaters: Sequence[Updater],
        agents: StackedAgents,
        adam: StackedAdam,
        draw_orders: Callable[[Sequence[int]], list[torch.Tensor]],
        padded_to: int | None = None,
    ) -> None:
        self.updaters, self.agents, self.adam, self.draw_orders = updaters, agents, adam, draw_orders
        self.padded_to = padded_to
        self.template = updaters[0]
        loss = batched_loss_of(self.template)
        if loss is None and not isinstance(self.template, TRPOUpdater):
            raise ValueError(f"{type(self.template).__name__}'s update is not batched")
        self.loss = loss
        cfgs = [updater.cfg for updater in updaters]
        device = agents.actor.flat.device
        # Every number of the config that differs between the members goes in as a tensor; the
        # rest (the same for all) stays the template's.
        self.hyper: dict[str, torch.Tensor] = {
            name: torch.tensor([float(getattr(cfg, name)) for cfg in cfgs], device=device)
            for name in vars(cfgs[0])
            if isinstance(getattr(cfgs[0], name), int | float)
            and not isinstance(getattr(cfgs[0], name), bool)
            and differing([getattr(cfg, name) for cfg in cfgs])
        }
        self.max_grad_norm = self._per_member(cfgs, "max_grad_norm")
        self.adam_eps = self._per_member(cfgs, "adam_eps")
        target_kls = [getattr(cfg, "target_kl", None) for cfg in cfgs]
        self.target_kl = None if target_kls[0] is None else torch.tensor(target_kls, device=device)

    def _per_member(self, cfgs: Sequence[AlgoConfig], name: str) -> torch.Tensor:
        return torch.tensor([float(getattr(cfg, name)) for cfg in cfgs], device=self.agents.actor.flat.device)

    def update(self, batches: Sequence[Batch], active: torch.Tensor) -> list[MemberResult | None]:
        """Update the ``active`` (K,) members on their ``batches``; per member, its metrics (as
        its own updater returns them), the NonFiniteError that stopped it, or None if inactive."""
        stacked = _stack(batches, self.padded_to)
        lrs = torch.tensor(
            [updater.optimizer.param_groups[0]["lr"] for updater in self.updaters], device=active.device
        )
        if isinstance(self.template, SurrogateUpdater):
            return self._epochs(stacked, batches, active, lrs)
        if isinstance(self.template, TRPOUpdater):
            return self._trust_region(stacked, batches, active, lrs)
        return self._one_step(stacked, batches, active, lrs)

    def _epochs(
        self, stacked: Batch, batches: Sequence[Batch], active: torch.Tensor, lrs: torch.Tensor
    ) -> list[MemberResult | None]:
        cfg = self.template.epochs  # type: ignore[attr-defined]
        running, stopped = active.clone(), torch.zeros_like(active)
        errors: dict[int, NonFiniteError] = {}
        logged: list[torch.Tensor] = []  # (K, terms) per minibatch
        stepped: list[torch.Tensor] = []  # (K,) per minibatch: who stepped on it
        names: list[str] = []
        members = torch.arange(len(batches), device=active.device).unsqueeze(1)
        assert self.loss is not None
        member_loss = self._batched(self.loss)  # the updaters' state changes only after the update
        for _ in range(cfg.update_epochs):
            orders = self.draw_orders([len(batch) for batch in batches])
            for idx, weights in _minibatches(orders, cfg.num_minibatches, self.padded_to):
                mb = stacked.map(lambda field: field[members, idx])  # noqa: B023 (used at once)
                mb = dataclasses.replace(mb, weights=weights)
                out = self.agents.evaluate(mb.obs, mb.actions, mb.action_masks)
                if self.target_kl is not None:
                    log_ratio = out.log_prob.detach() - mb.log_probs
                    k3 = torch.expm1(log_ratio) - log_ratio
                    k3 = k3.mean(dim=1) if weights is None else (weights * k3).mean(dim=1)
                    over = running & (k3 > self.target_kl)
                    stopped |= over
                    running &= ~over
                if not bool(running.any()):
                    break
                loss, terms = member_loss(out, mb)
                failed = self._step(loss, terms, running, lrs, errors)
                names = list(terms)
                logged.append(torch.stack([value.detach() for value in terms.values()], dim=1))
                stepped.append(running & ~failed)
                running &= ~failed
            if not bool(running.any()):
                break
        results: list[MemberResult | None] = []
        for k, updater in enumerate(self.updaters):
            if k in errors:
                results.append(errors[k])
                continue
            if not bool(active[k]):
                results.append(None)
                continue
            ran = [i for i, mask in enumerate(stepped) if bool(mask[k])]
            means = torch.stack([logged[i][k] for i in ran]).mean(dim=0).tolist() if ran else []
            metrics = dict(zip(names if ran else [], means, strict=True))
            metrics.update(minibatch_updates=float(len(ran)), early_stop=float(bool(stopped[k])))
            results.append(updater.finish_update(batches[k], metrics))  # type: ignore[attr-defined]
        return results

    def _one_step(
        self, stacked: Batch, batches: Sequence[Batch], active: torch.Tensor, lrs: torch.Tensor
    ) -> list[MemberResult | None]:
        sizes = [len(batch) for batch in batches]
        batch = self._whole(stacked, sizes)
        out = self.agents.evaluate(batch.obs, batch.actions, batch.action_masks)
        assert self.loss is not None
        loss, terms = self._batched(self.loss)(out, batch)
        errors: dict[int, NonFiniteError] = {}
        failed = self._step(loss, terms, active, lrs, errors)
        if cast(OneStepUpdater, self.template).regresses_critic:
            terms["value_loss"] = self._regress_critics(stacked, sizes, active & ~failed, lrs, errors)
        results: list[MemberResult | None] = []
        for k, updater in enumerate(self.updaters):
            if k in errors or not bool(active[k]):
                results.append(errors.get(k))
                continue
            own = {name: value[k] for name, value in terms.items()}
            results.append(updater.metrics_after_step(batches[k], own))  # type: ignore[attr-defined]
        return results

    def _trust_region(
        self, stacked: Batch, batches: Sequence[Batch], active: torch.Tensor, lrs: torch.Tensor
    ) -> list[MemberResult | None]:
        """TRPO (``algos/trpo.py``) for every member: its trust-region step of the policy on its
        whole batch (``trust_region.batched_trust_region_step``), then its critic regression."""
        sizes = [len(batch) for batch in batches]
        batch = self._whole(stacked, sizes)
        surrogate = self._batched(lambda updater, params, b: updater.surrogate_of(params, b))  # type: ignore[attr-defined]
        mean_kl = self._batched(lambda updater, params, b: updater.mean_kl_of(params, b))  # type: ignore[attr-defined]

        def policy() -> torch.Tensor:
            return self.agents.policy_params(batch.obs, batch.action_masks)

        steps, not_finite = batched_trust_region_step(
            self.agents.actor.flat,
            lambda: surrogate(policy(), batch),
            lambda: mean_kl(policy(), batch),
            cast(TRPOUpdater, self.template).region,
            active,
        )
        failed = (active & not_finite).nonzero().flatten().tolist()
        errors = {k: non_finite_gradient(steps[k].surrogate_before) for k in failed}
        value_losses = self._regress_critics(stacked, sizes, active & ~not_finite, lrs, errors)
        results: list[MemberResult | None] = []
        for k, updater in enumerate(self.updaters):
            if k in errors or not bool(active[k]):
                results.append(errors.get(k))
                continue
            results.append(cast(TRPOUpdater, updater).metrics_of(batches[k], value_losses[k], steps[k]))
        return results

    def _whole(self, stacked: Batch, sizes: Sequence[int]) -> Batch:
        """Every member's whole batch, (K, B, ...), as one step on the whole batch takes it (its
        samples in order, padded with weight 0 to ``padded_to``, see :func:`_minibatches`)."""
        device = stacked.obs.device
        whole = [torch.arange(size, device=device) for size in sizes]
        idx, weights = next(_minibatches(whole, 1, self.padded_to))
        members = torch.arange(len(sizes), device=device).unsqueeze(1)
        return dataclasses.replace(stacked.map(lambda field: field[members, idx]), weights=weights)

    def _regress_critics(
        self,
        stacked: Batch,
        sizes: Sequence[int],
        running: torch.Tensor,
        lrs: torch.Tensor,
        errors: dict[int, NonFiniteError],
    ) -> torch.Tensor:
        """``update.regress_critic`` of the ``running`` members at once (each with its own
        minibatch orders); each member's mean value loss, (K,)."""
        cfg = cast(CriticRegression, self.template.cfg)
        members = torch.arange(len(sizes), device=running.device).unsqueeze(1)
        critic_loss = self._batched(
            lambda updater, value, mb: critic_regression_loss(
                updater.cfg,  # type: ignore[arg-type]
                value,
                mb.values,
                mb.returns,
                mb.weights,
            )
        )
        running, value_losses = running.clone(), []
        for _ in range(cfg.value_epochs):
            for idx, weights in _minibatches(self.draw_orders(sizes), cfg.value_minibatches, self.padded_to):
                mb = dataclasses.replace(stacked.map(lambda field: field[members, idx]), weights=weights)  # noqa: B023
                loss, terms = critic_loss(self.agents.value(mb.obs), mb)
                running &= ~self._step(loss, terms, running, lrs, errors)
                value_losses.append(terms["value_loss"].detach())
        return torch.stack(value_losses).mean(dim=0)

    def _member_values(self) -> dict[str, torch.Tensor]:
        """The numbers that differ between the members: config keys, and the updaters' state."""
        state = {
            f"state.{name}": torch.tensor(
                [float(getattr(updater, name)) for updater in self.updaters], device=self.adam_eps.device
            )
            for name in self.template.member_state
        }
        return {**{f"cfg.{name}": value for name, value in self.hyper.items()}, **state}

    def _batched(self, method: Callable[[Updater, Any, Batch], Any]) -> Callable[[Any, Batch], Any]:
        """``method(updater, arg, batch)`` of every member at once, under vmap: each member's call
        sees its own slice of ``arg`` and of the (K, ...) ``batch``, and an updater (a copy of the
        template's) whose config numbers and state are that member's."""
        values = self._member_values()

        def member(values: dict[str, torch.Tensor], arg: Any, fields: dict[str, torch.Tensor]) -> Any:
            updater = copy.copy(self.template)
            updater.cfg = copy.copy(updater.cfg)
            for key, value in values.items():
                kind, name = key.split(".", 1)
                # object.__setattr__: the schema's checks would read the traced value as a bool.
                object.__setattr__(updater.cfg if kind == "cfg" else updater, name, value)
            return method(updater, arg, Batch(**fields))

        return lambda arg, batch: vmap(member)(values, arg, _fields(batch))

    def _step(
        self,
        loss: torch.Tensor,
        terms: dict[str, torch.Tensor],
        running: torch.Tensor,
        lrs: torch.Tensor,
        errors: dict[int, NonFiniteError],
    ) -> torch.Tensor:
        """One optimizer step of the ``running`` members on their ``loss`` (K,); those whose loss
        or gradient is not finite are left unstepped, their errors put in ``errors``; returns
        which failed."""
        self.adam.zero_grad()
        torch.where(running, loss, torch.zeros_like(loss)).sum().backward()
        norms = self.adam.clip_and_check(self.max_grad_norm)
        finite = torch.isfinite(loss.detach()) & torch.isfinite(norms)
        failed = running & ~finite
        self.adam.step(lrs, self.adam_eps, running & finite)
        if bool(failed.any()):  # one device sync per step, as a single run's check
            for k in failed.nonzero().flatten().tolist():
                errors[k] = NonFiniteError(_non_finite_report(float(loss[k].detach()), terms, k))
        return failed


def _non_finite_report(loss: float, terms: dict[str, torch.Tensor], k: int) -> str:
    """The single run's words (``Updater._non_finite_report``) for member ``k``."""
    if not math.isfinite(loss):
        bad = [
            f"{name}={float(v[k].detach()):g}"
            for name, v in terms.items()
            if not math.isfinite(float(v[k].detach()))
        ]
        return f"the loss is {loss:g} (non-finite terms: {', '.join(bad) or 'none'})"
    return "the gradient norm is not finite"


def _stack(batches: Sequence[Batch], padded_to: int | None) -> Batch:
    """The members' batches as one, every field (K, B, ...): B is ``padded_to`` (each batch
    padded with copies of its first sample, which :func:`_minibatches` gives weight 0), or the
    members' common batch size."""
    longest = padded_to or len(batches[0])
    if padded_to is None and any(len(batch) != longest for batch in batches):
        raise ValueError(f"the members' batches differ in size: {[len(b) for b in batches]}")

    def padded(x: torch.Tensor) -> torch.Tensor:
        return x if len(x) == longest else torch.cat([x, x[:1].expand(longest - len(x), *x.shape[1:])])

    fields: dict[str, Any] = {
        name: None if value is None else torch.stack([padded(getattr(b, name)) for b in batches])
        for name, value in _fields(batches[0], keep_none=True).items()
    }
    return type(batches[0])(**fields)


def _fields(batch: Batch, keep_none: bool = False) -> dict[str, Any]:
    values = {name: getattr(batch, name) for name in batch.__dataclass_fields__}
    return values if keep_none else {name: value for name, value in values.items() if value is not None}


def _minibatches(
    orders: Sequence[torch.Tensor], parts: int, padded_to: int | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Minibatch i of every member: (K, S) sample indices and their loss weights (None: plain means).

    Member k's order of its own B_k samples is cut as ``Batch.shuffled_minibatches`` cuts a
    single run's (``parts`` consecutive pieces whose sizes differ by at most one), so each member
    learns from the minibatches its single run would. With ``padded_to`` (batches that may miss
    samples), piece i of every member is padded to S, the size piece i of a batch of
    ``padded_to`` samples has, with weight 0, and its n samples weigh S / n: every mean of the
    loss (``losses.weighted_mean``) is then the mean over the member's own samples, computed the
    same way whatever the other members hold."""
    cuts = [torch.tensor_split(order, parts) for order in orders]
    full = [len(piece) for piece in torch.tensor_split(torch.empty(padded_to or 0), parts)]
    for i in range(parts):
        pieces = [cut[i] for cut in cuts]
        if padded_to is None:
            yield torch.stack(pieces), None
            continue
        idx = torch.zeros(len(pieces), full[i], dtype=torch.long, device=pieces[0].device)
        weights = torch.zeros(len(pieces), full[i], device=pieces[0].device)
        for k, piece in enumerate(pieces):
            idx[k, : len(piece)] = piece
            weights[k, : len(piece)] = full[i] / max(len(piece), 1)
        yield idx, weights
