"""Each network's parameters packed into one contiguous tensor, for a cheaper optimizer step.

The update of these small networks costs per-tensor overhead more than arithmetic: with a dozen
weight and bias tensors, clipping the gradient norm, Adam's step and zeroing the gradients loop
over a dozen tensors, a large share of a minibatch step (``benchmarks/RESULTS.md``). Packing a network's
parameters into one tensor, which the modules keep using through views of it, turns each of those
loops into one operation on one tensor; the optimizer is given the packed tensors instead.

Autograd still writes each parameter's own ``.grad``; :meth:`PackedParameters.gather_grad`
concatenates them into the packed tensor's gradient (one operation). A network that received no
gradient in a backward pass gets none here either, so the optimizer leaves it alone, as it would
the unpacked parameters: PPO-Clip's combined loss moves both networks, a policy-only step (PG,
TRPO's critic regression, GRPO) moves one.

The views must never be replaced: assigning ``param.data`` (``vector_to_parameters`` does) or
moving the module to another device would cut a parameter loose from the packed tensor. Pack after
``.to(device)`` and write parameters in place (:func:`copy_into`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn


class PackedParameters:
    """The parameters of one network as views of a single flat tensor, :attr:`flat`."""

    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        self.params = list(params)
        self.flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in self.params]))
        self.rebind(self.flat.data)

    def rebind(self, storage: torch.Tensor) -> None:
        """Make :attr:`flat` and the parameters views of ``storage``, a flat tensor holding their
        values (a population keeps its members' packs as the rows of one tensor: ``stacked.py``)."""
        self.flat.data = storage
        offset = 0
        for param in self.params:
            param.data = storage[offset : offset + param.numel()].view_as(param)
            offset += param.numel()

    def gather_grad(self) -> None:
        """Set the packed gradient from the parameters' own: none when none of them received one."""
        grads = [param.grad for param in self.params]
        if all(grad is None for grad in grads):
            self.flat.grad = None
            return
        pieces = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads, strict=True)]
        self.flat.grad = torch.cat([piece.reshape(-1) for piece in pieces])


def copy_into(vector: torch.Tensor, params: Sequence[nn.Parameter]) -> None:
    """Write a flat ``vector`` into ``params`` in place (``vector_to_parameters`` without
    replacing the parameters' storage)."""
    with torch.no_grad():
        for param, values in zip(params, vector.split([p.numel() for p in params]), strict=True):
            param.copy_(values.view_as(param))


def packed_optimizer_state(
    state: dict[str, Any], params: Sequence[nn.Parameter], packs: Sequence[PackedParameters]
) -> dict[str, Any]:
    """An Adam ``state_dict`` saved per parameter (checkpoints of ppo-cli before packing), laid
    out for ``packs`` instead: each pack's moments are its parameters' moments, concatenated.

    ``params`` are the parameters in the order the old optimizer held them.
    """
    old = state["state"]
    index = {id(param): i for i, param in enumerate(params)}
    new: dict[int, dict[str, Any]] = {}
    for k, pack in enumerate(packs):
        entries = [old.get(index[id(param)]) for param in pack.params]
        stepped = [entry for entry in entries if entry is not None]
        if not stepped:
            continue  # this network was never stepped
        new[k] = {"step": stepped[0]["step"]}
        for moment in ("exp_avg", "exp_avg_sq"):
            pieces = [
                torch.zeros(param.numel()) if entry is None else entry[moment].reshape(-1)
                for param, entry in zip(pack.params, entries, strict=True)
            ]
            new[k][moment] = torch.cat(pieces)
    group = {**state["param_groups"][0], "params": list(range(len(packs)))}
    return {"state": new, "param_groups": [group]}
