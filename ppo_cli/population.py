"""Population training: several runs of one shape (a seed sweep, a sweep over scalar
hyperparameters) trained in one process, their updates batched.

On the small networks of the PPO family an update costs the overhead of each tensor operation
more than its arithmetic, so K members' updates as one batched operation each cost little more
than one member's (``benchmarks/RESULTS.md``, "Population training"). Each member is an ordinary
run (``train.Run``): its own envs, collector, normalisation statistics, random generators,
checkpoints, TensorBoard events, evaluations and ``summary.json``, written as a single run writes
them, so ppo-eval, load_agent, ppo-compare and resume read it as one. What is shared is only the
update (``population_update.py``): the members' networks and Adam state are rows of stacked
tensors (``stacked.py``) of which each member's agent and optimizer hold views.

One iteration of the population:

    for each member (with its random generators): learning rate -> collect -> advantages -> batch
    all members at once: the update (one batched forward, backward and Adam step per minibatch)
    for each member: report -> log -> [evaluate] -> [checkpoint]

Members are independent: nothing reduces across them (``stacked.py``), each one draws from its
own generators (the process's global ones, swapped in while it runs: :class:`MemberRandomness`),
so a member trains the same whoever its neighbours are. A member that fails (a non-finite loss,
an env that raises) ends with its error in its own summary while the others go on; SIGINT /
SIGTERM stop them all after the iteration, each with its checkpoint written.
"""

from __future__ import annotations

import logging
import os
import random
import signal
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from ppo_cli import rundir
from ppo_cli.acting import Acting, NumpyActing, PopulationActing
from ppo_cli.config import TrainConfig
from ppo_cli.errors import EnvError, Interrupted, NonFiniteError
from ppo_cli.evaluate import EVAL_SEED_OFFSET, ActionRequest, Episodes, evaluating
from ppo_cli.iteration import (
    IterationResult,
    PreparedUpdate,
    TrainingState,
    batch_of,
    finish_iteration,
    start_iteration,
)
from ppo_cli.population_update import PopulationUpdate
from ppo_cli.rollout import Rollout, run_through
from ppo_cli.signals import GracefulStop, training_stop
from ppo_cli.stacked import StackedAdam, StackedAgents
from ppo_cli.train import Run

log = logging.getLogger(__name__)

CUDA = torch.cuda.is_available()  # checked once: each member's generator swap would ask again


@dataclass(frozen=True)
class MemberJob:
    """One run of a population."""

    cfg: TrainConfig  # the job's checked config
    run_dir: Path  # its run directory
    label: str = ""  # prefix of its progress lines
    swept: Sequence[str] = ()  # the sweep's varying keys (HParams' first columns)


class MemberRandomness:
    """A member's own state of the global generators (Python's, numpy's, torch's and CUDA's),
    swapped in while the member runs, so that the single-run code it calls draws from it."""

    def __init__(self) -> None:
        self.saved: list[Any] | None = None

    @contextmanager
    def active(self) -> Iterator[None]:
        outer = _capture()
        if self.saved is not None:
            _restore(self.saved)
        try:
            yield
        finally:
            self.saved = _capture()
            _restore(outer)

    @contextmanager
    def torch_active(self) -> Iterator[None]:
        """:meth:`active` for code that draws from torch's generators alone: cheaper."""
        assert self.saved is not None, "the member's generators are set when its run opens"
        outer = torch.get_rng_state(), _cuda_states()
        _restore_torch(self.saved[2], self.saved[3])
        try:
            yield
        finally:
            self.saved[2:] = [torch.get_rng_state(), _cuda_states()]
            _restore_torch(*outer)


def _cuda_states() -> list[torch.Tensor] | None:
    return torch.cuda.get_rng_state_all() if CUDA else None


def _capture() -> list[Any]:
    return [random.getstate(), np.random.get_state(), torch.get_rng_state(), _cuda_states()]


def _restore(state: list[Any]) -> None:
    python, numpy, torch_state, cuda = state
    random.setstate(python)
    np.random.set_state(numpy)
    _restore_torch(torch_state, cuda)


def _restore_torch(torch_state: torch.Tensor, cuda: list[torch.Tensor] | None) -> None:
    torch.set_rng_state(torch_state)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class Member:
    """One run of the population and what the population keeps of it."""

    def __init__(self, job: MemberJob) -> None:
        self.job = job
        self.randomness = MemberRandomness()
        self._run: Run | None = None
        self.outcome: dict[str, Any] | BaseException | None = None
        # The iteration in flight: its learning rate, how it acts, its collection, its batch.
        self.learning_rate = 0.0
        self.acting: Acting | None = None
        self.steps: Generator[int, None, Rollout] | None = None
        self.prepared: PreparedUpdate | None = None

    @property
    def run(self) -> Run:
        assert self._run is not None, "start() the member first"
        return self._run

    @property
    def ended(self) -> bool:
        return self.outcome is not None

    def start(self) -> None:
        """Hold the run's directory and open the run (``train.Run``) with the member's own
        generators; what refuses it (another process there, a resume that does not fit) ends
        this member only."""
        try:
            self._run = Run(self.job.cfg, self.job.run_dir, self.job.label, self.job.swept)
        except Exception as exc:  # the directory is not ours: nothing to write there
            self.outcome = exc
            return
        try:
            with self.randomness.active(), rundir.logging_for(self.job.run_dir):  # its train.log
                self.run.open()
        except Exception as exc:
            if isinstance(exc, Interrupted):
                raise
            self.end(exc)

    def end(self, exc: BaseException | None) -> None:
        """Close the run: its summary records ``exc`` (None: completed)."""
        if self._run is None:
            self.outcome = self.outcome or exc
            return
        try:
            self.run.close(exc)
        finally:
            self.outcome = self.run.summary if exc is None else exc


def train_population(
    jobs: Sequence[MemberJob], threads: int | None = None
) -> list[dict[str, Any] | BaseException]:
    """Train ``jobs`` as one population; per job, its final summary (what ``train()`` returns)
    or the exception that ended it (its ``summary.json`` records it as failed, and the other
    members go on). SIGINT / SIGTERM: every member's checkpoint is written, then ``Interrupted``
    propagates, as from ``train()``.

    The jobs must have one shape (``grouping.py`` forms such groups): the same env, networks,
    rollout and minibatch sizes and variant; they may differ in seed and in the numbers of their
    algorithm's keys. ``threads``: torch's intra-op threads while they train (0: one per core;
    None: as the members' ``torch_threads`` set them)."""
    members: list[Member] = []
    try:
        with training_stop(distributed=False) as stop:
            for job in jobs:
                members.append(Member(job))
                members[-1].start()
            if threads is not None:  # after the members' own setting, which opening them applies
                torch.set_num_threads(threads or os.cpu_count() or 1)
            training = [m for m in members if not m.ended]
            for member in training:
                if not member.run.training:  # resumed after it had completed
                    member.end(None)
            _Population([m for m in training if not m.ended]).train(stop)
            stop.graceful = False
    except BaseException as exc:
        for member in members:
            if not member.ended:
                member.end(exc)
        raise
    return [m.outcome for m in members]  # type: ignore[misc]


class _Population:
    """The members still training, their stacked networks and their batched update."""

    def __init__(self, members: list[Member]) -> None:
        self.members = members
        if not members:
            return
        states = [m.run.state for m in members]
        self.agents = StackedAgents([state.agent for state in states])
        self.adam = StackedAdam(self.agents.packs, [state.optimizer for state in states])
        # Envs that reset on the step after an episode ends leave that step out of the batch
        # (rollout.py), whole-episode rollouts their steps after the episode's end: the
        # members' batches then differ in size, and are padded.
        collector = states[0].collector
        steps = collector.storage.num_steps * collector.envs.num_envs
        padded_to = steps if collector.next_step_autoreset or not collector.lockstep else None
        self.update = PopulationUpdate(
            [state.updater for state in states], self.agents, self.adam, self._draw_orders, padded_to
        )
        self.device = self.agents.actor.flat.device
        self.evaluations = _Evaluations(self)
        if self.evaluations.batched:
            for index, member in enumerate(members):
                member.run.evaluator.play = partial(self.evaluations.returns, index)

    def _draw_orders(self, sizes: Sequence[int]) -> list[torch.Tensor]:
        """Each member's random order of its ``sizes[k]`` samples, from its own torch generator."""
        orders = []
        for member, size in zip(self.members, sizes, strict=True):
            with member.randomness.torch_active():
                orders.append(torch.randperm(size, device=self.device))
        return orders

    def train(self, stop: GracefulStop) -> None:
        """Iterate until every member has spent its budget (or failed); on a stop signal, every
        member saves its checkpoint, then :class:`Interrupted` is raised."""
        while any(not m.ended for m in self.members):
            signum = self._iteration(stop)
            if signum is not None:
                for member in self.members:
                    if not member.ended:
                        member.end(member.run.interruption(signum))
                raise Interrupted(
                    signum,
                    f"stopped by {signal.Signals(signum).name}: every member still training saved "
                    "its checkpoint",
                )
            for member in self.members:
                if not member.ended and not member.run.training:
                    self._guarded(member, member.run.finish)
                    if not member.ended:
                        member.end(None)

    def _guarded(self, member: Member, action: Callable[[], Any], draws: bool = True) -> None:
        """Run one member's ``action`` (with its generators swapped in, if it ``draws`` from
        them); what it raises ends that member only."""
        try:
            randomness = member.randomness.active() if draws else nullcontext()
            with randomness, rundir.logging_for(member.job.run_dir):
                action()
        except Exception as exc:
            if isinstance(exc, NonFiniteError | EnvError):
                exc = member.run.located_error(exc)
            member.end(exc)

    def _iteration(self, stop: GracefulStop) -> int | None:
        """One iteration of every member still training; returns the stop signal, if one came."""
        self._collect()
        active = torch.tensor([not m.ended for m in self.members], device=self.device)
        if not bool(active.any()):
            return stop.signum
        prepared = [m.prepared for m in self.members]
        template = next(p.batch for p, m in zip(prepared, self.members, strict=True) if not m.ended and p)
        batches = [
            template if m.ended or p is None else p.batch for p, m in zip(prepared, self.members, strict=True)
        ]
        results = self.update.update(batches, active)
        # Every member's iteration is counted before any member logs, evaluates or saves: the
        # members' evaluations play together, each at its member's new step (_Evaluations).
        finished: dict[int, IterationResult] = {}
        for k, (member, result) in enumerate(zip(self.members, results, strict=True)):
            if member.ended or result is None:
                continue
            if isinstance(result, NonFiniteError):
                member.end(member.run.located_error(result))
                continue
            assert member.prepared is not None
            finished[k] = finish_iteration(member.run.state, member.prepared, result)
        for k, iteration in finished.items():
            self._guarded(self.members[k], partial(self.members[k].run.report, iteration))
        signum = stop.signum  # read once: every member saves, or none does
        for k in finished:
            if not self.members[k].ended:
                self._guarded(self.members[k], partial(self.members[k].run.checkpoint, signum is not None))
        return signum

    def _collect(self) -> None:
        """Every member still training starts its iteration and collects its rollout, all in
        lockstep: at each step the members act in one batched pass (``acting.PopulationActing``,
        when every member acts in numpy), then each steps its own envs; then each builds its batch.
        Collectors that do not step in lockstep (``Collector.lockstep``) collect one after the other."""
        members = [m for m in self.members if not m.ended]
        if members and not members[0].run.state.collector.lockstep:
            for member in members:
                self._guarded(member, partial(self._collect_alone, member))
            return
        for member in members:
            self._guarded(member, partial(self._start, member))
        members = [m for m in members if not m.ended]
        actings = [m.acting for m in members if m.acting is not None]
        batched = None
        if all(isinstance(acting, NumpyActing) for acting in actings):
            batched = PopulationActing(cast(list[NumpyActing], actings))
        collectors = [m.run.state.collector for m in members]
        for k, (member, collector) in enumerate(zip(members, collectors, strict=True)):
            member.steps = collector.collecting(actings[k] if batched is None else batched.member(k))
        for t in range(collectors[0].storage.num_steps if members else 0):
            for member in members:
                if not member.ended:
                    # Stepping the envs draws nothing: the noise was drawn by acting() in _start.
                    self._guarded(member, partial(next, member.steps), draws=False)
            if batched is not None:
                batched.act(t, [collector.obs for collector in collectors])
        for member in members:
            if not member.ended:
                self._guarded(member, partial(self._finish_collection, member))

    @staticmethod
    def _collect_alone(member: Member) -> None:
        """A member whose collector does not step in lockstep (whole episodes) collects its
        rollout whole, acting alone."""
        state = member.run.state
        learning_rate = start_iteration(state)
        member.prepared = batch_of(state, learning_rate, state.collector.collect())

    @staticmethod
    def _start(member: Member) -> None:
        member.learning_rate = start_iteration(member.run.state)
        member.acting = member.run.state.collector.acting()  # draws the rollout's noise

    @staticmethod
    def _finish_collection(member: Member) -> None:
        assert member.steps is not None
        rollout = run_through(member.steps)
        member.prepared = batch_of(member.run.state, member.learning_rate, rollout)


class _Evaluations:
    """The members' evaluations, played together: when one member's evaluator asks for its
    episodes, every member still training plays its own (``evaluate.evaluating``: its envs, its
    seed, its quota) in lockstep, acting in one batched pass, and the others' returns wait for
    their evaluators' call at the same step. Only deterministic evaluations are batched (a
    sampled one draws from the evaluated member's seeded generators); others play alone."""

    def __init__(self, population: _Population) -> None:
        self.population = population
        first = population.members[0].run.cfg
        self.batched = first.eval.deterministic
        # member index: (its step, its returns, or what its evaluation raised: its to raise)
        self.played: dict[int, tuple[int, np.ndarray | Exception]] = {}

    def returns(self, index: int, state: TrainingState) -> np.ndarray:
        played = self.played.pop(index, None)
        if played is None or played[0] != state.global_step:
            self._play_all()
            played = self.played.pop(index)
        if isinstance(played[1], Exception):
            raise played[1]
        return played[1]

    @torch.no_grad()
    def _play_all(self) -> None:
        population = self.population
        live = [(k, m) for k, m in enumerate(population.members) if not m.ended]
        steps = {}
        for k, member in live:
            cfg, state = member.run.cfg, member.run.state
            seed = cfg.seed + EVAL_SEED_OFFSET
            steps[k] = evaluating(state.agent, cfg.env, cfg.eval.episodes, seed, population.device)
        requests: dict[int, ActionRequest] = {}
        for k in steps:
            self._advance(k, steps, requests, None)
        dist = population.agents.template.dist
        while requests:
            template = next(iter(requests.values()))
            obs = [requests[k].obs if k in requests else template.obs for k in range(len(population.members))]
            masks = [requests[k].mask if k in requests else template.mask for k in range(len(obs))]
            stacked_masks = None if template.mask is None else torch.stack(cast(list[torch.Tensor], masks))
            actions = dist.mode(population.agents.policy_params(torch.stack(obs), stacked_masks))
            for k in list(requests):
                self._advance(k, steps, requests, actions[k])

    def _advance(
        self,
        k: int,
        steps: dict[int, Generator[ActionRequest, torch.Tensor, Episodes]],
        requests: dict[int, ActionRequest],
        action: torch.Tensor | None,
    ) -> None:
        """Member ``k``'s evaluation one step on (sent ``action``; None: its start)."""
        step = self.population.members[k].run.state.global_step
        try:
            requests[k] = next(steps[k]) if action is None else steps[k].send(action)
        except StopIteration as end:
            requests.pop(k, None)
            self.played[k] = (step, end.value.returns)
        except Exception as exc:  # the member's own envs: it fails when its evaluator asks
            requests.pop(k, None)
            self.played[k] = (step, exc)
