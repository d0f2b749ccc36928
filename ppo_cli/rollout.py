"""Preallocated rollout storage and the loop that fills it.

One iteration collects ``num_steps`` x ``num_envs`` transitions. Storage is allocated once, on the
training device, and overwritten in place every iteration.

Two autoreset conventions are handled (see ``envs.py``):

* ``SAME_STEP`` (sync/async vector envs): a finished episode's last observation arrives in
  ``info["final_obs"]``; when the episode was *truncated*, V(final_obs) is computed here and used as
  that step's bootstrap value.
* ``NEXT_STEP`` (numpy-vectorised envs): the step after an episode end is a fake transition (action
  ignored, reward 0). It is stored with ``valid = False`` and never reaches a loss. Conveniently, the
  observation stored for the fake step *is* the final observation, so the ordinary
  ``next_values[t] = values[t + 1]`` already bootstraps a truncation correctly.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import numpy as np
import torch
from gymnasium.vector import VectorEnv

from ppo_cli import env_state
from ppo_cli.acting import Acting, ActingBuffers, make_acting
from ppo_cli.agent import ActorCritic
from ppo_cli.envs import action_masks, env_failure, finished_episodes, uses_next_step_autoreset
from ppo_cli.episodes import EpisodeCounter, EpisodeLog
from ppo_cli.errors import NonFiniteError
from ppo_cli.normalization import RewardScaler

T = TypeVar("T")


class RolloutStorage:
    """(T, N, ...) tensors for one iteration of experience, shaped for ``agent``.

    What the envs return (rewards, terminations, truncations) is first written into numpy arrays
    on the host, one row per step, and moved into the device tensors once per rollout by
    :meth:`upload_env_outputs`: per step that costs a numpy assignment instead of a tensor
    operation (or, on a GPU, a host-to-device copy).
    """

    def __init__(self, num_steps: int, num_envs: int, agent: ActorCritic, device: torch.device) -> None:
        shape = (num_steps, num_envs)
        dist = agent.dist
        self.obs = torch.zeros((*shape, agent.obs_dim), dtype=agent.obs_dtype, device=device)
        self.actions = torch.zeros((*shape, *dist.action_shape), dtype=dist.action_dtype, device=device)
        # [actor output, V(s)] per step, as acting.py writes them.
        self.outputs = torch.zeros((*shape, agent.actor_out_dim + 1), device=device)
        self.log_probs = torch.zeros(shape, device=device)
        self.policy_params = torch.zeros((*shape, dist.param_dim), device=device)
        self.next_values = torch.zeros(shape, device=device)
        self.rewards = torch.zeros(shape, device=device)
        self.terminated = torch.zeros(shape, dtype=torch.bool, device=device)
        self.truncated = torch.zeros(shape, dtype=torch.bool, device=device)
        self.valid = torch.ones(shape, dtype=torch.bool, device=device)
        self.host_rewards = np.zeros(shape, dtype=np.float32)
        self.host_terminated = np.zeros(shape, dtype=bool)
        self.host_truncated = np.zeros(shape, dtype=bool)
        self.host_valid = np.ones(shape, dtype=bool)
        self.action_masks: torch.Tensor | None = None  # (T, N, actions) once track_action_masks
        # A recurrent agent's sequences (trunk.py): its state before each step, and the steps
        # where an episode starts (the state is zeroed there first).
        recurrent = agent.core is not None
        self.states = torch.zeros((*shape, agent.state_dim), device=device) if recurrent else None
        self.starts = torch.zeros(shape, dtype=torch.bool, device=device) if recurrent else None
        self.num_steps = num_steps

    def track_action_masks(self) -> None:
        """Also store, at every step, which discrete actions the envs allowed (True = allowed)."""
        shape = (*self.log_probs.shape, self.outputs.shape[-1] - 1)
        self.action_masks = torch.ones(shape, dtype=torch.bool, device=self.obs.device)

    @property
    def values(self) -> torch.Tensor:
        """V(s_t) as estimated while acting, (T, N)."""
        return self.outputs[..., -1]

    def copy_envs(self, source: RolloutStorage, envs: np.ndarray, from_envs: np.ndarray) -> None:
        """Overwrite the columns ``envs`` (every step) with the columns ``from_envs`` of
        ``source``, a storage of the same shape: every (T, N, ...) array and tensor held."""
        for name, mine in vars(self).items():
            if isinstance(mine, np.ndarray):
                mine[:, envs] = getattr(source, name)[:, from_envs]
            elif isinstance(mine, torch.Tensor):
                mine[:, torch.from_numpy(envs)] = getattr(source, name)[:, torch.from_numpy(from_envs)]

    def upload_env_outputs(self) -> None:
        """Copy the host arrays the envs' results were written into to the device tensors."""
        for tensor, array in (
            (self.rewards, self.host_rewards),
            (self.terminated, self.host_terminated),
            (self.truncated, self.host_truncated),
            (self.valid, self.host_valid),
        ):
            tensor.copy_(torch.from_numpy(array))


def run_through(steps: Generator[Any, None, T]) -> T:
    """Run a generator to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return cast(T, end.value)


def check_finite(field: str, values: np.ndarray) -> None:
    """Refuse a NaN or infinity in one step's ``values`` (leading dimension: env index)."""
    if np.isfinite(values).all():  # the common case, in one pass
        return
    finite = np.isfinite(values).reshape(len(values), -1).all(axis=1)
    env_index = int(np.flatnonzero(~finite)[0])
    raise NonFiniteError(f"env {env_index} returned a non-finite {field}: {values[env_index]}")


@dataclass
class Rollout:
    """What one collection produced: the filled storage (overwritten by the next collection), the
    env steps it took, the episodes that finished in it, and counts a collector reports about
    its collection (summed over ranks, logged by name: see ``tags.metric_tag``)."""

    storage: RolloutStorage
    env_steps: int
    episodes: EpisodeLog
    counts: dict[str, int] = field(default_factory=dict)


class Collector:
    """Steps a vector env with an agent and writes the transitions into a storage."""

    # Whether a population (population.py) may step this collector in lockstep with its other
    # members' through :meth:`collecting`, acting for all of them in one batched pass.
    lockstep = True

    def __init__(
        self,
        envs: VectorEnv,
        agent: ActorCritic,
        storage: RolloutStorage,
        *,
        device: torch.device,
        seed: int,
        reward_scaler: RewardScaler | None = None,
        bootstrap_truncated: bool = True,
        games_in_info: bool = False,
    ) -> None:
        """Reset ``envs`` with ``seed`` (env i gets ``seed + i``).

        ``reward_scaler`` scales the stored rewards (not the reported returns);
        ``bootstrap_truncated`` bootstraps a time-limit truncation from V(final observation);
        ``games_in_info``: the envs report whole games in their info (Atari, whose training
        episodes end at each lost life: see ``atari.py``); those are the episodes reported."""
        self.envs = envs
        self.agent = agent
        self.storage = storage
        self.reward_scaler = reward_scaler
        self.bootstrap_truncated = bootstrap_truncated
        self.device = device
        self.next_step_autoreset = uses_next_step_autoreset(envs)
        obs, info = self._reset(seed)
        self.obs = self._observe(obs)
        # Discrete actions the envs allow for the current observations, if they say (envs.py).
        self.mask = None if agent.continuous else action_masks(info, envs.num_envs, agent.actor_out_dim)
        if self.mask is not None:
            storage.track_action_masks()
        self.prev_done = np.zeros(envs.num_envs, dtype=bool)
        self.episodes = EpisodeCounter(envs.num_envs)
        self.games_in_info = games_in_info
        # A recurrent agent's state for the current observations (before any reset they need).
        self.state = agent.initial_state(envs.num_envs) if agent.core is not None else None

    def _reset(self, seed: int | list[int]) -> tuple[np.ndarray, dict[str, Any]]:
        """``envs.reset``; whatever the envs raise becomes an EnvError (see ``envs.env_failure``)."""
        try:
            return self.envs.reset(seed=seed)  # type: ignore[arg-type]  # sync and async take a list
        except Exception as exc:
            raise env_failure(self.envs, "reset", exc) from None

    def _step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        """``envs.step``; whatever the envs raise becomes an EnvError (see ``envs.env_failure``)."""
        try:
            return self.envs.step(actions)
        except Exception as exc:
            raise env_failure(self.envs, "step", exc) from None

    def _observe(self, obs: np.ndarray) -> torch.Tensor:
        """Fold fresh observations into the statistics, then normalise them."""
        check_finite("observation", obs)
        obs = obs.reshape(len(obs), -1)
        normalizer = self.agent.obs_normalizer
        if normalizer is not None:
            normalizer.stats.fold_in(obs)
            obs = normalizer.normalize_array(obs)
        return torch.as_tensor(obs, dtype=self.agent.obs_dtype, device=self.device)

    def _observe_masks(self, info: dict[str, Any]) -> None:
        """Take the action masks that came with fresh observations (all allowed if none did)."""
        if self.mask is not None:
            reported = action_masks(info, self.envs.num_envs, self.agent.actor_out_dim)
            self.mask = np.ones_like(self.mask) if reported is None else reported

    def _record_masks(self, t: int) -> None:
        """Store the current action masks as step ``t``'s, where acting reads them."""
        if self.mask is not None:
            assert self.storage.action_masks is not None  # tracked since the first reset
            self.storage.action_masks[t].copy_(torch.from_numpy(self.mask))

    def acting(self) -> Acting:
        """How the agent acts in this rollout (a snapshot of its weights; see acting.py)."""
        s = self.storage
        noise = self.agent.exploration_noise((s.num_steps, self.envs.num_envs))
        buffers = ActingBuffers(s.obs, s.outputs, s.actions, noise, s.action_masks, self.state, s.starts)
        return make_acting(self.agent, buffers)

    def _finish(self) -> None:
        """After the last step: upload what the envs returned, then record the parameters of
        pi_old(.|s) and log pi_old(a|s) for every step, in one pass each."""
        s = self.storage
        s.upload_env_outputs()
        params = self.agent.params_from_actor_output(s.outputs[..., :-1])
        s.policy_params.copy_(params)
        s.log_probs.copy_(self.agent.dist.log_prob(params, s.actions))

    def collect(self) -> Rollout:
        """Fill the storage with ``num_steps`` steps of every env."""
        return run_through(self.collecting(self.acting()))

    @torch.inference_mode()  # cheaper than no_grad; the storage it writes into stays normal
    def collecting(self, act: Acting) -> Generator[int, None, Rollout]:
        """:meth:`collect` with ``act``, step by step: it pauses before the agent acts at each
        step (yielding the step's index), so that a population (``population.py``) can act for
        all its members at once in between."""
        s, finished = self.storage, EpisodeLog()
        truncation_values: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        for t in range(s.num_steps):
            valid = s.host_valid[t]
            if self.next_step_autoreset:  # the step after an episode's end is the fake one
                np.logical_not(self.prev_done, out=valid)
            self._record_masks(t)
            if s.states is not None:  # acting zeroes the recurrent state where an episode starts
                assert self.state is not None and s.starts is not None
                s.states[t].copy_(self.state)
                s.starts[t].copy_(torch.from_numpy(self.prev_done))
            yield t
            obs, reward, terminated, truncated, info = self._step(act(t, self.obs))
            check_finite("reward", reward)
            s.host_rewards[t], s.host_terminated[t], s.host_truncated[t] = reward, terminated, truncated
            self.prev_done = terminated | truncated
            if self.games_in_info:
                finished.add(*finished_episodes(info.get("final_info", {}))[1:])
            else:
                self.episodes.step(reward, valid, self.prev_done, finished)
            if truncated.any() and "final_obs" in info and self.bootstrap_truncated:
                truncation_values.append(self._final_values(t, truncated, info["final_obs"]))
            self.obs = self._observe(obs)
            self._observe_masks(info)
        if self.reward_scaler is not None:
            dones = s.host_terminated | s.host_truncated
            s.host_rewards[:] = self.reward_scaler(s.host_rewards, dones, s.host_valid)
        self._finish()
        s.next_values[:-1] = s.values[1:]
        starts = torch.as_tensor(self.prev_done, device=self.device)
        s.next_values[-1] = self.agent.step_value(self.obs, self.state, starts)
        for t, idx, values in truncation_values:
            s.next_values[t, idx] = values
        return Rollout(s, s.num_steps * self.envs.num_envs, finished)

    def _final_values(
        self, t: int, truncated: np.ndarray, final_obs: np.ndarray
    ) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(t, env indices, V(final_obs)) for the envs cut by a time limit at step t."""
        idx = np.flatnonzero(truncated)
        final = np.stack(list(final_obs[idx]))
        check_finite("final observation", final)
        obs = self.agent.normalize(torch.as_tensor(final, dtype=self.agent.obs_dtype, device=self.device))
        state = None if self.state is None else self.state[idx]  # before the reset: same episode
        return t, torch.as_tensor(idx, device=self.device), self.agent.step_value(obs, state)

    def state_dict(self) -> dict[str, Any]:
        """What the next collection depends on: the envs' own state (None where it cannot be
        saved, see ``env_state.py``), the current observations, and which envs just finished."""
        return {
            "obs": self.obs.cpu(),  # on the host: rank 0 gathers the other ranks' (distributed.py)
            "prev_done": torch.from_numpy(self.prev_done.copy()),
            "action_mask": None if self.mask is None else torch.from_numpy(self.mask.copy()),
            "recurrent_state": None if self.state is None else self.state.cpu(),
            "episodes": self.episodes.state_dict(),
            "envs": env_state.capture(self.envs),
        }

    def load_state_dict(self, state: dict[str, Any], reset_seed: int) -> bool:
        """Continue the saved episodes; True if that was exact.

        Where the envs' state was not saved (or does not fit these envs), every env is reset
        with ``reset_seed`` instead and the episodes in flight are lost (their partial returns
        too). Call after the agent's and the reward scaler's state are loaded.
        """
        if state["envs"] is not None and env_state.restore(self.envs, state["envs"]):
            self.obs = state["obs"].to(self.device)
            self.prev_done = state["prev_done"].numpy().copy()
            self.episodes.load_state_dict(state["episodes"])
            if self.mask is not None and state.get("action_mask") is not None:
                self.mask = state["action_mask"].numpy().copy()
            if self.state is not None:
                self.state.copy_(state["recurrent_state"])
            return True
        self.restart(reset_seed)
        return False

    def restart(self, reset_seed: int) -> None:
        """Reset every env with ``reset_seed``, forgetting the episodes in flight."""
        obs, info = self._reset(reset_seed)
        self.obs = self._observe(obs)
        self._observe_masks(info)
        self.prev_done[:] = False
        self.episodes.reset()
        if self.state is not None:
            self.state.zero_()
        if self.reward_scaler is not None:
            self.reward_scaler.returns.zero_()  # the discounted returns belonged to lost episodes
