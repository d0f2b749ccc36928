"""``ppo-export``: a trained policy as one self-contained file, TorchScript or ONNX.

The file computes what :meth:`ppo_cli.policy.TrainedAgent.act` computes, with nothing of ppo-cli
needed to run it: the observation normalisation (the running statistics frozen, clipped as in
training), the networks, and the action mapping (the most likely action by default: the argmax
for discrete actions, the Gaussian's mean for continuous ones, clipped to the action bounds;
sampled with ``--stochastic``), all traced from the very methods ``load_agent``'s agent calls,
so the two cannot drift apart.

Inputs and outputs carry a leading batch dimension of any size:

* ``obs`` (B, *observation shape): float32, or uint8 pixels for a CNN agent (scaled inside);
* ``state`` (B, state size), recurrent agents only: zeros at an episode's start, then the
  ``next_state`` output of the previous step;
* ``action_mask`` (B, number of actions) bool, only when exported with ``--action-mask``: the
  allowed actions, as the env reports them in ``info["action_mask"]``;
* outputs ``action`` (B,) int64, (B, components) int64 or (B, action size) float32, in the env's
  own numbering and bounds, and ``next_state`` for recurrent agents.

TorchScript files are traced with ``torch.jit.trace`` (``torch.jit.load`` reads them, in C++ too);
ONNX files are written by torch's ``torch.export``-based exporter, the one torch keeps developing
(its TorchScript-based predecessor is deprecated), which needs ``onnxscript``.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ppo_cli.agent import ActorCritic
from ppo_cli.errors import UserError
from ppo_cli.evaluate import checkpoint_to_evaluate, output_dir
from ppo_cli.policy import TrainedAgent, agent_from_checkpoint

SUFFIXES = {"torchscript": "torchscript", "onnx": "onnx"}  # format -> file suffix
EXAMPLE_BATCH = 2  # traced batch size; not 1, which torch.export would take for a fixed size


class ExportedPolicy(nn.Module):
    """``obs [, state] [, action_mask] -> action [, next_state]`` (see the module docstring).

    One forward, whatever the agent: the optional inputs follow ``obs`` positionally, so that the
    traced signature holds exactly the inputs this agent needs and no placeholder.
    """

    def __init__(self, network: ActorCritic, deterministic: bool, masked: bool) -> None:
        super().__init__()
        self.network = network
        self.deterministic = deterministic
        self.masked = masked
        self.eval()

    @property
    def input_names(self) -> list[str]:
        recurrent = self.network.core is not None
        return ["obs", *(["state"] if recurrent else []), *(["action_mask"] if self.masked else [])]

    @property
    def output_names(self) -> list[str]:
        return ["action", *(["next_state"] if self.network.core is not None else [])]

    def forward(self, obs: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        rest = iter(extra)
        # ActorCritic.act steps the state in place: a copy keeps the caller's input unchanged.
        state = next(rest).clone() if self.network.core is not None else None
        mask = next(rest) if self.masked else None
        normalized = self.network.normalize(obs.to(torch.float32))
        action = self.network.env_action_tensor(self.network.act(normalized, self.deterministic, mask, state))
        return action if state is None else (action, state)

    def example_inputs(self, obs_shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        """Inputs to trace with: shapes and dtypes are what matter, not values."""
        network = self.network
        inputs = [torch.zeros(EXAMPLE_BATCH, *obs_shape, dtype=network.obs_dtype)]
        if network.core is not None:
            inputs.append(network.initial_state(EXAMPLE_BATCH))
        if self.masked:
            inputs.append(torch.ones(EXAMPLE_BATCH, network.actor_out_dim, dtype=torch.bool))
        return tuple(inputs)

    def signature(self, example: tuple[torch.Tensor, ...]) -> str:
        """``obs (B, 4) float32 -> action (B,) int64``: the names, shapes and dtypes a user feeds
        and gets (B: any batch size), read from a call on ``example``."""
        outputs = self(*example)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)

        inputs = ", ".join(map(_described, self.input_names, example))
        return f"{inputs} -> {', '.join(map(_described, self.output_names, outputs))}"


def _described(name: str, tensor: torch.Tensor) -> str:
    """``action (B,) int64``: a batch of any size B."""
    dims = ", ".join(["B", *map(str, tensor.shape[1:])])
    return f"{name} ({dims if tensor.dim() > 1 else 'B,'}) {str(tensor.dtype).removeprefix('torch.')}"


def export_policy(
    agent: TrainedAgent, out: Path, fmt: str, deterministic: bool = True, masked: bool = False
) -> str:
    """Write ``agent``'s policy to ``out`` in format ``fmt`` (a key of :data:`SUFFIXES`), through a
    temporary file and a rename, so that ``out`` is never half written. Returns its signature
    (:meth:`ExportedPolicy.signature`)."""
    if masked and agent.network.continuous:
        raise UserError("--action-mask: the agent's actions are continuous; masks apply to discrete ones")
    if not out.parent.is_dir():  # before tracing, which takes seconds
        raise UserError(f"{out}: cannot write (no directory {out.parent})")
    # A copy, frozen: the agent stays where it is, and the traced outputs need no gradient.
    policy = ExportedPolicy(copy.deepcopy(agent.network).cpu().requires_grad_(False), deterministic, masked)
    example = policy.example_inputs(agent.obs_shape)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with _exporters_quiet():
            (_write_torchscript if fmt == "torchscript" else _write_onnx)(policy, example, tmp)
        os.replace(tmp, out)
    except OSError as exc:
        raise UserError(f"{out}: cannot write ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return policy.signature(example)


@contextmanager
def _exporters_quiet() -> Iterator[None]:
    """Hold back what torch's exporters say about themselves while they run: deprecations (torch
    calls TorchScript deprecated, yet keeps loading it), torchvision operators it skips, constants
    it folds (the action space's ``start``), axis names it merges. None of it is the user's to act
    on; that the files act as the agent does is what the round-trip tests check."""
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        onnx_log.setLevel(level)


def _write_torchscript(policy: ExportedPolicy, example: tuple[torch.Tensor, ...], path: Path) -> None:
    torch.jit.save(torch.jit.trace(policy, example, check_trace=False), str(path))


def _write_onnx(policy: ExportedPolicy, example: tuple[torch.Tensor, ...], path: Path) -> None:
    try:
        import onnxscript  # noqa: F401  (torch's exporter imports it; missing, it fails deep inside)
    except ImportError:
        raise UserError("--format onnx needs onnx and onnxscript: pip install 'ppo-cli[export]'") from None
    batch = {0: torch.export.Dim("batch", min=1)}
    # The optional inputs are one *extra tuple to torch.export: their shapes come as one tuple too.
    extra = tuple(batch for _ in example[1:])
    dynamic = (batch, extra) if extra else (batch,)
    torch.onnx.export(
        policy,
        example,
        str(path),
        dynamo=True,
        input_names=policy.input_names,
        output_names=policy.output_names,
        dynamic_shapes=dynamic,
        external_data=False,  # one file: the weights inside
        verbose=False,
    )


def export_checkpoint(
    target: Path, fmt: str, out: Path | None = None, deterministic: bool = True, masked: bool = False
) -> tuple[Path, str]:
    """Export the agent of a run directory (its newest readable checkpoint, as ``ppo-eval``
    picks it) or of a checkpoint file; by default to ``policy[-stochastic].<suffix>`` in the run
    directory. Returns the path written and its signature. Nothing is read from the run but
    weights and plain data."""
    if fmt not in SUFFIXES:
        raise UserError(f"--format: got {fmt!r}, allowed: {', '.join(SUFFIXES)}")
    checkpoint, payload = checkpoint_to_evaluate(Path(target))
    agent = agent_from_checkpoint(payload, checkpoint)
    if out is None:
        name = "policy" + ("" if deterministic else "-stochastic")
        out = output_dir(checkpoint) / f"{name}.{SUFFIXES[fmt]}"
    return out, export_policy(agent, out, fmt, deterministic, masked)
