"""A population's networks and optimizer as stacked tensors: K members, one batched operation each.

The members of a population (``population.py``) have agents of one architecture. Each agent keeps
its parameters packed, one flat tensor per network (``packing.py``); here the members' packs
become the rows of one (K, P) tensor per network, and every member's pack and parameters become
views of its row. The member's own objects (its agent, its optimizer's state) therefore always
hold its current values, for checkpoints, evaluations and acting, while the update runs on the
stacked tensors: one batched matrix product per layer (``torch.baddbmm``) instead of K small ones,
one Adam step for all members instead of K.

Nothing here reduces across the member dimension: each member's gradient is that of its own loss
(the population minimises the sum of the members' losses, whose gradient with respect to member
k's parameters is member k's gradient alone), its gradient norm is clipped by its own norm, and
Adam's moments are elementwise. Members whose ``active`` flag is off (stopped early by
``target_kl``, or failed) are left exactly as they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ppo_cli.agent import ACTIVATION_FUNCTIONS, ActorCritic, Evaluation
from ppo_cli.distributions import PAD_LOGIT
from ppo_cli.packing import PackedParameters

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which single runs use


class StackedPack:
    """The same network of K members as the rows of one (K, P) leaf tensor, :attr:`flat`; each
    member's pack (and so its parameters) is rebound to a view of its row."""

    def __init__(self, packs: Sequence[PackedParameters]) -> None:
        self.flat = torch.stack([pack.flat.detach() for pack in packs]).requires_grad_()
        for row, pack in zip(self.flat.data, packs, strict=True):
            pack.rebind(row)
        self.shapes = [param.shape for param in packs[0].params]
        self.sizes = [math.prod(shape) for shape in self.shapes]

    def views(self) -> list[torch.Tensor]:
        """Every parameter of the network, stacked: (K, *shape) views of :attr:`flat` that carry
        gradients back to it (through one split, whose backward is one concatenation)."""
        members = self.flat.shape[0]
        pieces = torch.split(self.flat, self.sizes, dim=1)
        return [piece.view(members, *shape) for piece, shape in zip(pieces, self.shapes, strict=True)]


def stacked_mlp(params: Sequence[torch.Tensor], x: torch.Tensor, activation: str) -> torch.Tensor:
    """The MLP of ``agent.MLP`` for K members at once: ``params`` alternate (K, out, in) weights
    and (K, out) biases, ``x`` is (K, B, in)."""
    act = ACTIVATION_FUNCTIONS[activation]
    for depth in range(len(params) // 2):
        if depth:
            x = act(x)
        weight, bias = params[2 * depth], params[2 * depth + 1]
        x = torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
    return x


class StackedAgents:
    """K agents of one architecture (actor and critic MLPs on the observations, no shared trunk)
    with their actor and critic packs stacked (:class:`StackedPack`)."""

    def __init__(self, agents: Sequence[ActorCritic]) -> None:
        first = agents[0]
        if first.has_trunk or len(first.packs) != 2:
            raise ValueError("only agents without a shared trunk are stacked")
        self.template = first
        self.actor, self.critic = (StackedPack([agent.packs[i] for agent in agents]) for i in range(2))
        self.packs = [self.actor, self.critic]

    def policy_params(self, obs: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        """``ActorCritic.policy_params`` of every member on its own (K, B, obs_dim) observations."""
        agent = self.template
        actor = self.actor.views()
        layers = 2 * len(agent.actor.linear_layers)
        out = stacked_mlp(actor[:layers], obs, agent.actor.activation_name)
        if agent.continuous:  # the log-std follows the actor MLP in its pack
            out = torch.cat([out, actor[layers].unsqueeze(1).expand_as(out)], dim=-1)
        return out if masks is None else out.masked_fill(~masks, PAD_LOGIT)

    def evaluate(self, obs: torch.Tensor, actions: torch.Tensor, masks: torch.Tensor | None) -> Evaluation:
        """``ActorCritic.evaluate`` of every member on its own (K, B, ...) samples, with gradients;
        every field of the result is (K, B)."""
        agent = self.template
        params = self.policy_params(obs, masks)
        log_prob, entropy = agent.dist.log_prob_entropy(params, actions)
        return Evaluation(log_prob, entropy, self.value(obs), params)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        """Every member's V on its own (K, B, obs_dim) observations: (K, B)."""
        return stacked_mlp(self.critic.views(), obs, self.template.critic.activation_name).squeeze(-1)


class StackedAdam:
    """Adam (Kingma & Ba 2015, as ``torch.optim.Adam`` computes it) over the stacked packs, each
    member with its own learning rate, epsilon, step count and gradient-norm limit.

    The members' own Adam optimizers give their state at the start (empty for a new run, a
    checkpoint's after a resume) and are then rebound to views of this state, so that their
    ``state_dict()`` is what each member's checkpoint holds, in the single run's layout.
    """

    def __init__(self, packs: Sequence[StackedPack], optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.packs = packs
        members = len(optimizers)
        flats = [group["params"] for opt in optimizers for group in opt.param_groups]
        self.steps = torch.zeros(len(packs), members)
        self.exp_avg: list[torch.Tensor] = []
        self.exp_avg_sq: list[torch.Tensor] = []
        for p, pack in enumerate(packs):
            rows = [opt.state.get(flats[k][p], {}) for k, opt in enumerate(optimizers)]
            for name, moments in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                moments.append(
                    torch.stack(
                        [row[name].reshape(-1) if row else torch.zeros_like(pack.flat[0]) for row in rows]
                    ).to(pack.flat.device)
                )
            self.steps[p] = torch.tensor([float(row["step"]) if row else 0.0 for row in rows])
        for k, opt in enumerate(optimizers):
            for p in range(len(packs)):
                opt.state[flats[k][p]] = {
                    "step": self.steps[p, k],
                    "exp_avg": self.exp_avg[p][k],
                    "exp_avg_sq": self.exp_avg_sq[p][k],
                }

    def clip_and_check(self, max_norm: torch.Tensor) -> torch.Tensor:
        """Clip each member's gradient to its global norm ``max_norm`` (K,) as
        ``nn.utils.clip_grad_norm_`` does for one; returns each member's norm before clipping."""
        grads = [pack.flat.grad for pack in self.packs if pack.flat.grad is not None]
        norms = torch.stack([grad.square().sum(dim=1) for grad in grads]).sum(dim=0).sqrt()
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0).unsqueeze(1)
        for grad in grads:
            grad.mul_(scale)
        return norms

    @torch.no_grad()
    def step(self, lr: torch.Tensor, eps: torch.Tensor, active: torch.Tensor) -> None:
        """One Adam step of the members where ``active`` (K,) is True; the others keep their
        parameters, moments and step counts. ``lr`` and ``eps`` are (K,)."""
        beta1, beta2 = ADAM_BETAS
        every = bool(active.all())  # the common case: moments updated in place, nothing masked
        keep = ~active.unsqueeze(1)
        for p, pack in enumerate(self.packs):
            grad = pack.flat.grad
            if grad is None:  # no loss term reached this network: Adam leaves it alone
                continue
            steps = self.steps[p] + active.to(self.steps.dtype)
            if every:
                exp_avg = self.exp_avg[p].lerp_(grad, 1 - beta1)
                exp_avg_sq = self.exp_avg_sq[p].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            else:
                exp_avg = torch.lerp(self.exp_avg[p], grad, 1 - beta1)
                exp_avg_sq = self.exp_avg_sq[p] * beta2 + (1 - beta2) * grad.square()
            bias1 = 1 - beta1 ** steps.clamp(min=1)
            bias2_sqrt = (1 - beta2 ** steps.clamp(min=1)).sqrt()
            denom = (exp_avg_sq.sqrt() / bias2_sqrt.unsqueeze(1)).add_(eps.unsqueeze(1))
            update = (exp_avg / denom).mul_((lr / bias1).unsqueeze(1))
            if not every:
                update.masked_fill_(keep, 0.0)
                self.exp_avg[p].copy_(torch.where(keep, self.exp_avg[p], exp_avg))
                self.exp_avg_sq[p].copy_(torch.where(keep, self.exp_avg_sq[p], exp_avg_sq))
            pack.flat.data.sub_(update)
            self.steps[p].copy_(steps)

    def zero_grad(self) -> None:
        for pack in self.packs:
            pack.flat.grad = None
