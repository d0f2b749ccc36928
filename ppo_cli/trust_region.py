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
    residual falls below ``tolerance``.
    """
    x = torch.zeros_like(b)
    residual = b.clone()
    direction = b.clone()
    residual_sq = residual @ residual
    for _ in range(iterations):
        if residual_sq < tolerance:
            break
        a_direction = matvec(direction)
        alpha = residual_sq / (direction @ a_direction)
        x += alpha * direction
        residual -= alpha * a_direction
        new_residual_sq = residual @ residual
        direction = residual + (new_residual_sq / residual_sq) * direction
        residual_sq = new_residual_sq
    return x


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
    max_kl: float,
    cg_iterations: int,
    cg_damping: float,
    line_search_steps: int,
    backtrack: float,
    average: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
) -> StepResult:
    """Move ``params`` by one TRPO step; ``surrogate`` and ``mean_kl`` recompute from the current params.

    ``cg_damping`` adds lambda * I to F so the solve stays well-posed when F is near singular.
    ``average`` turns a local quantity into the mean over data-parallel ranks (see
    ``distributed.py``): the gradient, every Fisher-vector product and the line search's
    measurements, so that every rank computes the same step.
    """
    surrogate_before = surrogate()
    grad = average(parameters_to_vector(torch.autograd.grad(surrogate_before, params)))
    if not bool(torch.isfinite(grad).all()):  # a NaN surrogate has NaN gradients too
        value = float(surrogate_before.detach())
        raise NonFiniteError(f"the TRPO surrogate's gradient is not finite (surrogate {value:g})")
    kl_grad = parameters_to_vector(torch.autograd.grad(mean_kl(), params, create_graph=True))

    def fisher_vector_product(v: torch.Tensor) -> torch.Tensor:
        hv = torch.autograd.grad(kl_grad @ v, params, retain_graph=True)
        return average(parameters_to_vector(hv)) + cg_damping * v

    direction = conjugate_gradient(fisher_vector_product, grad, cg_iterations)
    quadratic = direction @ fisher_vector_product(direction)
    full_step = direction * torch.sqrt(2 * max_kl / quadratic.clamp_min(1e-12))
    old = parameters_to_vector(params).detach()
    before = float(average(surrogate_before.detach()))
    with torch.no_grad():
        for k in range(line_search_steps):
            fraction = backtrack**k
            copy_into(old + fraction * full_step, params)
            after, kl = average(torch.stack([surrogate(), mean_kl()])).tolist()
            if kl <= max_kl and after > before:
                return StepResult(before, after, kl, fraction)
        copy_into(old, params)
    return StepResult(before, before, 0.0, 0.0)
