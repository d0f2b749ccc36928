"""TRPO's second-order policy step: natural gradient by conjugate gradient, then a line search.

Schulman et al. 2015, "Trust Region Policy Optimization", appendix C. Maximise the surrogate
L(theta) = mean(rho * A) subject to mean KL(pi_old || pi_theta) <= delta:

1. g = grad L at theta_old; F = the Hessian of the mean KL at theta_old (the Fisher matrix).
2. s = (F + lambda I)^-1 g by conjugate gradient, using only damped Fisher-vector products
   (F + lambda I) v = grad((grad KL) . v) + lambda v (lambda = ``cg_damping``).
3. Scale s so that the damped quadratic model of the KL, 0.5 * s^T (F + lambda I) s, equals delta:
   step = s * sqrt(2 delta / s^T (F + lambda I) s), with the same product as the solve (as OpenAI
   baselines' trpo_mpi), so the undamped model 0.5 * step^T F step stays a little under delta.
4. Backtrack step, step/2, step/4, ... and accept the first that improves L with a measured
   KL <= delta; if none does, keep theta_old.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.nn.utils import parameters_to_vector

from ppo_cli.errors import NonFiniteError
from ppo_cli.packing import copy_into


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iterations: int, tolerance: float = 1e-10
) -> torch.Tensor:
    """Approximately solve A x = b for a symmetric positive-definite A given only x -> A x.

    Exact after n iterations for an n x n system (in exact arithmetic); stops early once the squared
    residual falls below ``tolerance``. ``b`` of shape (K, n) holds K independent systems (a
    population's members, ``population_update.py``; ``matvec`` multiplies each row by its own
    matrix): each stops on its own residual, and a stopped row is left as it is.
    """
    x = torch.zeros_like(b)
    residual = b.clone()
    direction = b.clone()
    residual_sq = _dot(residual, residual)
    for _ in range(iterations):
        running = residual_sq >= tolerance
        if not bool(running.any()):
            break
        a_direction = matvec(direction)
        alpha = torch.where(running, residual_sq / _dot(direction, a_direction), 0.0).unsqueeze(-1)
        x += alpha * direction
        residual -= alpha * a_direction
        new_residual_sq = _dot(residual, residual)
        beta = (new_residual_sq / residual_sq).unsqueeze(-1)
        direction = torch.where(running.unsqueeze(-1), residual + beta * direction, direction)
        residual_sq = torch.where(running, new_residual_sq, residual_sq)
    return x


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products over the last dimension."""
    return (a * b).sum(dim=-1)


def scaled_step(
    direction: torch.Tensor,
    fisher_vector_product: Callable[[torch.Tensor], torch.Tensor],
    max_kl: float,
) -> torch.Tensor:
    """``direction`` (rows) scaled so that the damped quadratic model of the KL,
    0.5 * s^T (F + lambda I) s, equals ``max_kl`` (step 3 above)."""
    quadratic = _dot(direction, fisher_vector_product(direction))
    return direction * torch.sqrt(2 * max_kl / quadratic.clamp_min(1e-12)).unsqueeze(-1)


def non_finite_gradient(surrogate: float) -> NonFiniteError:
    """The error of a surrogate whose gradient is not finite (a NaN surrogate has NaN gradients)."""
    return NonFiniteError(f"the TRPO surrogate's gradient is not finite (surrogate {surrogate:g})")


class TrustRegion(NamedTuple):
    """How a step is taken: delta (``max_kl``), the conjugate gradient's iterations and damping
    lambda, and the line search's tries and backtracking factor."""

    max_kl: float
    cg_iterations: int
    cg_damping: float
    line_search_steps: int
    backtrack: float


class StepResult(NamedTuple):
    """What the line search did: which fraction of the full step it took (0 = rejected)."""

    surrogate_before: float
    surrogate_after: float
    kl: float
    step_fraction: float


def trust_region_step(
    params: list[torch.nn.Parameter],
    surrogate: Callable[[], torch.Tensor],
    mean_kl: Callable[[], torch.Tensor],
    region: TrustRegion,
    average: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
) -> StepResult:
    """Move ``params`` by one TRPO step; ``surrogate`` and ``mean_kl`` recompute from the current params.

    ``region.cg_damping`` adds lambda * I to F so the solve stays well-posed when F is near singular.
    ``average`` turns a local quantity into the mean over data-parallel ranks (see
    ``distributed.py``): the gradient, every Fisher-vector product and the line search's
    measurements, so that every rank computes the same step.
    """
    surrogate_before = surrogate()
    grad = average(parameters_to_vector(torch.autograd.grad(surrogate_before, params)))
    if not bool(torch.isfinite(grad).all()):
        raise non_finite_gradient(float(surrogate_before.detach()))
    kl_grad = parameters_to_vector(torch.autograd.grad(mean_kl(), params, create_graph=True))

    def fisher_vector_product(v: torch.Tensor) -> torch.Tensor:
        hv = torch.autograd.grad(kl_grad @ v, params, retain_graph=True)
        return average(parameters_to_vector(hv)) + region.cg_damping * v

    direction = conjugate_gradient(fisher_vector_product, grad, region.cg_iterations)
    full_step = scaled_step(direction, fisher_vector_product, region.max_kl)
    old = parameters_to_vector(params).detach()
    before = float(average(surrogate_before.detach()))
    with torch.no_grad():
        for k in range(region.line_search_steps):
            fraction = region.backtrack**k
            copy_into(old + fraction * full_step, params)
            after, kl = average(torch.stack([surrogate(), mean_kl()])).tolist()
            if kl <= region.max_kl and after > before:
                return StepResult(before, after, kl, fraction)
        copy_into(old, params)
    return StepResult(before, before, 0.0, 0.0)


def batched_trust_region_step(
    flat: torch.Tensor,
    surrogate: Callable[[], torch.Tensor],
    mean_kl: Callable[[], torch.Tensor],
    region: TrustRegion,
    running: torch.Tensor,
) -> tuple[list[StepResult], torch.Tensor]:
    """:func:`trust_region_step` for the K members of a population at once (``population_update.py``).

    Row k of the leaf ``flat`` (K, P) holds member k's policy parameters; ``surrogate`` and
    ``mean_kl`` give every member's value (K,) from the current rows. Each member's problem is
    its own: the gradient of the members' summed surrogates with respect to row k is member k's
    gradient alone, likewise every Fisher-vector product, the conjugate gradient stops per row, and
    each member's line search accepts its own fraction. Only the ``running`` (K,) members move.
    Returns each member's result, and which members' surrogate gradient was not finite (those
    are left unmoved).
    """
    surrogate_before = surrogate()
    (grad,) = torch.autograd.grad(surrogate_before.sum(), flat)
    finite = torch.isfinite(grad).all(dim=1)
    running = running & finite
    (kl_grad,) = torch.autograd.grad(mean_kl().sum(), flat, create_graph=True)

    def fisher_vector_product(v: torch.Tensor) -> torch.Tensor:
        (hv,) = torch.autograd.grad((kl_grad * v).sum(), flat, retain_graph=True)
        return hv + region.cg_damping * v

    # A member that does not move solves for nothing: its residual starts at 0.
    gradient = torch.where(running.unsqueeze(1), grad, 0.0)
    direction = conjugate_gradient(fisher_vector_product, gradient, region.cg_iterations)
    full_step = scaled_step(direction, fisher_vector_product, region.max_kl)
    old = flat.detach().clone()
    before = surrogate_before.detach()
    after, kl, fraction = before.clone(), torch.zeros_like(before), torch.zeros_like(before)
    accepted = torch.zeros_like(running)
    with torch.no_grad():
        for k in range(region.line_search_steps):
            pending = running & ~accepted
            if not bool(pending.any()):
                break
            step_fraction = region.backtrack**k
            flat.copy_(torch.where(pending.unsqueeze(1), old + step_fraction * full_step, flat))
            tried, tried_kl = surrogate(), mean_kl()
            # Compared as the single run compares: the KL in float64 against max_kl.
            good = pending & (tried_kl.double() <= region.max_kl) & (tried > before)
            after, kl = torch.where(good, tried, after), torch.where(good, tried_kl, kl)
            fraction = torch.where(good, step_fraction, fraction)
            accepted |= good
        flat.copy_(torch.where(accepted.unsqueeze(1), flat, old))
    rows = zip(before.tolist(), after.tolist(), kl.tolist(), fraction.tolist(), strict=True)
    return [StepResult(*row) for row in rows], ~finite
