"""Console entry points: parse, call, and turn user errors into one line on stderr.

Hydra is asked to re-raise instead of printing (``HYDRA_FULL_ERROR=1``) so that this module alone
decides how an error looks: bad input becomes ``ppo-train: error: <key>: <problem>`` and exit
code 2, a diverged run exit code 3, a signal 128 + its number (see ``errors.py``); anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import hydra
import yaml
from hydra._internal.utils import get_args_parser  # hydra-core is pinned to 1.3.x
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from ppo_cli import rundir
from ppo_cli.errors import ConfigError, EnvError, Interrupted, UserError
from ppo_cli.help_page import help_text
from ppo_cli.hydra_config import register_schemas, to_train_config, unknown_key_error
from ppo_cli.provenance import log_presets
from ppo_cli.signals import STOP_SIGNALS, ignore_stop_signals

# The modules that import torch and gymnasium are imported by the functions that train or evaluate:
# --help, --cfg, --info and completion queries answer without them (``answers_at_once``). For a
# run, launch.py imports them up front.
if TYPE_CHECKING:
    from ppo_cli import sweep
    from ppo_cli.config import TrainConfig
    from ppo_cli.distributed import DataParallel

log = logging.getLogger(__name__)


def find_config_dir() -> str:
    """``ppo_cli/configs`` in an installed wheel, ``<repo>/configs`` in a source checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "configs", package.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise RuntimeError(f"ppo-cli's config tree is missing next to {package}")


def refuse_hidden_configs(argv: list[str]) -> None:
    """Refuse a ``--config-dir`` file that ppo-train's config of the same name hides.

    Hydra searches ppo-cli's own config tree before a ``--config-dir``, so there a ``train.yaml``
    or an ``env/CartPole.yaml`` is never read: the run would silently use ours. A copy identical
    to ours changes nothing and passes. The user's file is kept rather than used in place of ours:
    ours holds the defaults list, the schema and the Hydra settings every run needs, and another
    root config is one ``--config-name`` away.
    """
    args = get_args_parser().parse_args(argv)  # Hydra's own command-line parser
    config_dir = args.config_dir
    if config_dir is None or args.config_path is not None:  # --config-path: a tree instead of ours
        return
    ours = Path(find_config_dir())
    for own in sorted(ours.rglob("*.yaml")):
        name = own.relative_to(ours)
        theirs = Path(config_dir) / name
        if not theirs.is_file() or theirs.read_bytes() == own.read_bytes():
            continue
        if name.parent == Path():
            fix = (
                f"name yours otherwise and pass --config-name <that name> (begin it with "
                f"'defaults: [{name.stem}, _self_]' to build on ppo-train's)"
            )
        else:
            group, option = name.parent.as_posix(), f"my_{name.stem}"
            fix = f"rename yours (e.g. {group}/{option}.yaml) and select it with {group}={option}"
        raise UserError(f"{theirs}: never read, ppo-train's own {name.as_posix()} comes first; {fix}")


def slug(text: str) -> str:
    """A string safe as one path component: 'pkg.mod:Env-v0' -> 'pkg.mod_Env-v0'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


register_schemas()
OmegaConf.register_new_resolver("slug", slug, replace=True)


@hydra.main(version_base="1.3", config_path=find_config_dir(), config_name="train")
def _train_task(cfg: DictConfig) -> float | None:
    """One Hydra job: hold the run directory, validate, train, return the final evaluation mean
    (the sweepers' objective).

    In a multirun a failing job does not stop the others: its error goes to its summary.json and
    the sweep's record of its jobs (``sweep.py``), its traceback to its log, and it returns NaN
    (a failed trial, for Optuna).

    Under torchrun every rank runs this; rank 0's Hydra chose the run directory, the others' made
    none (see ``distributed.py``), and only rank 0 holds it and reports.
    """
    from ppo_cli.distributed import DataParallel

    hydra_cfg = cast(DictConfig, HydraConfig.get())
    parallel = DataParallel.current()
    try:
        with job_setup(cfg, parallel) as job:
            summary = job.train()
    except Exception as exc:
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return failed_job(hydra_cfg, exc)
        # In a single run, report here: past this function Hydra prints its own banner first.
        _exit_if_expected(exc, "ppo-train")
        raise
    if not parallel.is_main:
        return None
    return job_result(job.run_dir, summary)


@dataclass(frozen=True)
class Job:
    """One job of ppo-train, set up by :func:`job_setup` and ready to train."""

    cfg: TrainConfig  # checked, and adapted to a sweep (``sweep.configure_job``)
    run_dir: Path
    directory: rundir.RunDirectory
    label: str  # the prefix of its progress lines ("" outside a sweep)
    swept: list[str]  # the keys its sweep varies (HParams' first columns)

    def train(self) -> dict[str, Any]:
        """Train one seed (``train`` accepts the run once its checks pass) or several (each in a
        directory of its own); the job's summary."""
        from ppo_cli import sweep
        from ppo_cli.train import train

        if self.cfg.seeds_per_job > 1:
            self.directory.accept()
            return sweep.train_seeds(self.cfg, self.run_dir, self.label, self.swept)
        return train(self.cfg, self.run_dir, self.label, self.swept)


@contextmanager
def job_setup(cfg: DictConfig, parallel: DataParallel) -> Iterator[Job]:
    """Everything around one job's training, for the block: its run directory held, its
    ``train.log`` (deferred until the run is accepted, as ``.hydra/`` is), the preset line, the
    config checked (a refused one recorded as a failed run where no run was before); in a
    multirun, a failure raised in the block logged with the job's number.

    Hydra's per-job config (``HydraConfig``, a process-wide singleton) is read here only, on entry:
    the population launcher sets up its members one after another, each while its own config is
    current, and trains them together afterwards.
    """
    from ppo_cli import sweep

    hydra_root = HydraConfig.instance().cfg  # {"hydra": ...}, as .hydra/hydra.yaml holds it
    hydra_conf = HydraConfig.get()
    hydra_cfg = cast(DictConfig, hydra_conf)
    run_dir = parallel.main_run_dir(Path(hydra_cfg.runtime.output_dir))
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    with ExitStack() as stack:
        directory = stack.enter_context(rundir.hold(run_dir, lock=parallel.is_main))
        if parallel.is_main:
            stack.enter_context(rundir.deferred_log(run_dir, directory))
            with rundir.logging_for(run_dir):
                log_presets(hydra_conf)
            directory.when_accepted(partial(_record_command, run_dir, cfg, cast(DictConfig, hydra_root)))
        try:
            train_cfg = _checked_config(cfg, run_dir, directory, parallel)
            label = sweep.configure_job(train_cfg, hydra_cfg) if multirun else ""
            swept = sweep.job_swept_keys(hydra_cfg) if multirun else []
            yield Job(train_cfg, run_dir, directory, label, swept)
        except Exception as exc:
            if multirun:
                log_job_failure(hydra_cfg, run_dir, exc)
            raise


def log_job_failure(hydra_cfg: DictConfig, run_dir: Path, exc: BaseException) -> None:
    """``job N failed: <one line>`` in the job's log; a bug's traceback with it."""
    with rundir.logging_for(run_dir):
        if expected_outcome(exc) is None:
            log.error("job %s failed", hydra_cfg.job.num, exc_info=exc)
        else:
            log.error("job %s failed: %s", hydra_cfg.job.num, one_line_error(exc) + env_traceback(exc))


def failed_job(hydra_cfg: DictConfig, exc: BaseException) -> float:
    """A failed job of a multirun: why, in the sweep's record of its jobs; NaN, its result."""
    from ppo_cli import sweep

    sweep.record_failure(hydra_cfg, one_line_error(exc))
    return math.nan


def job_result(run_dir: Path, summary: dict[str, Any]) -> float | None:
    """Print where a job ran and how it scored; its result, the sweepers' objective: its final
    evaluation mean (or recent return)."""
    print(f"run dir: {run_dir}")
    if "eval_std" in summary:
        print(f"evaluation: {summary['eval_mean']:.2f} +/- {summary['eval_std']:.2f}")
    elif "eval_mean" in summary:
        print(f"evaluation: {summary['eval_mean']:.2f} (mean over seeds {', '.join(summary['seeds'])})")
    return summary.get("eval_mean", summary.get("recent_episodic_return"))


def _checked_config(
    cfg: DictConfig, run_dir: Path, directory: rundir.RunDirectory, parallel: DataParallel
) -> TrainConfig:
    """The job's checked config. One that is refused is recorded as a failed run only where no
    run was before."""
    from ppo_cli.logger import write_summary

    try:
        train_cfg = to_train_config(cfg)
        if parallel.active and train_cfg.seeds_per_job > 1:
            raise ConfigError("seeds_per_job", "must be 1 under torchrun, whose ranks train one run")
    except Exception as exc:
        if parallel.is_main and not rundir.holds_run(run_dir):
            directory.accept()
            write_summary(run_dir, {"status": "failed", "global_step": 0, "error": one_line_error(exc)})
        raise
    return train_cfg


def _record_command(run_dir: Path, cfg: DictConfig, hydra_root: DictConfig) -> None:
    """``<run dir>/.hydra/``: the composed config, Hydra's own (``hydra_root``, the job's, taken
    when it was set up), and the overrides typed (which ``resume=`` reads back), as Hydra would
    write them, but only once the run is accepted."""
    out = run_dir / ".hydra"
    out.mkdir(exist_ok=True)
    rundir.write_text_atomic(out / "config.yaml", OmegaConf.to_yaml(cfg))
    rundir.write_text_atomic(out / "hydra.yaml", OmegaConf.to_yaml(hydra_root))
    rundir.write_text_atomic(out / "overrides.yaml", OmegaConf.to_yaml(hydra_root.hydra.overrides.task))


def expected_outcome(exc: BaseException) -> tuple[str, int] | None:
    """(one-line report, exit code) if ``exc`` is an outcome we report plainly: a signal, bad
    input, a diverged run, a file that cannot be written. None if it is a bug (traceback kept)."""
    chain = _chain(exc)
    for err in chain:
        if isinstance(err, Interrupted):
            return str(err), err.exit_code
        if isinstance(err, KeyboardInterrupt):
            return "interrupted", 128 + signal.SIGINT
    for err in chain:
        if isinstance(err, UserError):
            return f"error: {err}", err.exit_code
    if any(isinstance(err, HydraException | OmegaConfBaseException | yaml.YAMLError) for err in chain):
        return f"error: {one_line_error(exc)}", UserError.exit_code
    for err in chain:
        if isinstance(err, OSError) and err.filename:  # e.g. a run dir that cannot be created
            return f"error: {err.filename}: {err.strerror or err}", UserError.exit_code
    return None


def _exit_if_expected(exc: BaseException, prog: str) -> None:
    outcome = expected_outcome(exc)
    if outcome is not None:
        report, code = outcome
        if code in {128 + signum for signum in STOP_SIGNALS}:
            ignore_stop_signals()
        print(f"{prog}: {report}{env_traceback(exc)}", file=sys.stderr)
        sys.exit(code)


def env_traceback(exc: BaseException) -> str:
    """The traceback of the env's own code behind ``exc`` (the user's code: shown below the one
    line, see ``EnvError``), on lines of its own; empty for every other error."""
    for err in _chain(exc):
        if isinstance(err, EnvError) and err.details:
            return "\n" + err.details.rstrip("\n")
    return ""


def one_line_error(exc: BaseException) -> str:
    """Condense a config/Hydra/user error into ``<key>: <problem>``; unknown errors as their text."""
    for err in _chain(exc):
        if isinstance(err, UserError):
            return str(err)
    for err in _chain(exc):
        if isinstance(err, MissingConfigException):
            return _missing_option(err)
        if isinstance(err, yaml.MarkedYAMLError):
            return _yaml_error(err)
        if isinstance(err, OmegaConfBaseException) and getattr(err, "full_key", None):
            return _omegaconf_error(err)
    first = str(exc).strip().splitlines()
    return first[0] if first else type(exc).__name__


def _chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _missing_option(err: MissingConfigException) -> str:
    text = str(err)
    match = re.search(r"Could not find '([^']+)'", text)
    missing = match.group(1) if match else "config"
    group, _, option = missing.rpartition("/")
    options = err.options or []
    if group:
        return f"{group}={option}: no such option; available: {', '.join(sorted(options))}"
    return f"{missing}: no such config file"


def _yaml_error(err: yaml.MarkedYAMLError) -> str:
    """``<file>: YAML syntax error at line L, column C: <problem> (<context> at ...)``, counted
    from 1 as editors count (PyYAML's marks count from 0)."""
    mark = err.problem_mark or err.context_mark
    problem = err.problem or err.context or type(err).__name__
    if mark is None:
        return f"YAML syntax error: {problem}"
    where = f"{mark.name}: YAML syntax error at line {mark.line + 1}, column {mark.column + 1}"
    context = err.context if err.problem and err.context else None
    if context and err.context_mark is not None and err.context_mark is not mark:
        context += f" started at line {err.context_mark.line + 1}, column {err.context_mark.column + 1}"
    return f"{where}: {problem}" + (f" ({context})" if context else "")


def _omegaconf_error(err: OmegaConfBaseException) -> str:
    key = str(getattr(err, "full_key", ""))
    if isinstance(err, MissingMandatoryValue) and not key.endswith(str(getattr(err, "key", ""))):
        key = f"{key}.{err.key}" if key else str(err.key)
    message = str(getattr(err, "msg", "") or err).strip().splitlines()[0]
    if re.search(r"not in struct|not in '|not found", message, re.IGNORECASE):
        return str(unknown_key_error(key, getattr(err, "object_type", None)))
    if "missing mandatory value" in message.lower():
        return f"{key}: missing value; set it on the command line ({key}=...)"
    return f"{key}: {message}"


def _run_cli(task: Callable[[], Any], prog: str) -> None:
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        task()
    except BaseException as exc:
        if not isinstance(exc, SystemExit):
            _exit_if_expected(exc, prog)
        raise


def _train_with_resume() -> None:
    if answers_at_once(sys.argv[1:]):
        _answer(sys.argv[1:])
        return
    from ppo_cli import sweep
    from ppo_cli.distributed import process_group
    from ppo_cli.resume import expand_resume_argv

    argv = expand_resume_argv(sys.argv[1:])
    refuse_hidden_configs(argv)
    with process_group(argv) as parallel:  # a group of one, outside torchrun
        sys.argv = [sys.argv[0], *argv, *parallel.hydra_overrides()]
        try:
            _train_task()
        except Exception as exc:
            launcher_gave_up = expected_outcome(exc) is None
            outcome = sweep.finish(launcher_gave_up)
            if outcome is None or not outcome.failed or not launcher_gave_up:
                raise
            # The launcher gave up on a job whose process died (Ray, joblib): a failed job.
            _exit_with_failed_jobs(outcome, f" ({one_line_error(exc)})")
    outcome = sweep.finish()
    if outcome is not None and outcome.failed:
        _exit_with_failed_jobs(outcome)


def answers_at_once(argv: list[str]) -> bool:
    """Whether ppo-train's command line only asks Hydra a question (``--help``, ``--hydra-help``,
    ``--cfg``, ``--info``, ``--shell-completion``), which Hydra answers from the configs alone:
    then neither torch nor gymnasium is imported, so the answer comes at once (a completion query
    runs at every TAB). With ``resume=``, all but ``--help`` take the long way: the answer depends
    on the overrides read from the run."""
    args, _ = get_args_parser().parse_known_args(argv)
    asks = args.hydra_help or args.cfg or args.info or args.shell_completion
    return args.help or (bool(asks) and not any(arg.startswith("resume=") for arg in argv))


COMPLETION_COMMANDS = ("install", "uninstall", "query")


def _answer(argv: list[str]) -> None:
    """Let Hydra answer the question on ``argv`` (see :func:`answers_at_once`)."""
    refuse_hidden_configs(argv)
    args = get_args_parser().parse_args(argv)
    commands = [o for o in args.overrides if o.partition("=")[0] in COMPLETION_COMMANDS]
    if args.shell_completion and len(commands) != 1:  # Hydra's own answer is a traceback
        raise UserError(
            "--shell-completion: add one of install=bash|zsh|fish, uninstall=<shell>, query=<shell>; "
            'to install it for bash: eval "$(ppo-train -sc install=bash)"'
        )
    if args.help:  # ppo-train's own page (help_page.py), not Hydra's
        extra = [Path(args.config_dir)] if args.config_dir else []
        print(help_text([Path(find_config_dir()), *extra]))
        return
    if args.shell_completion and commands[0].startswith("query="):
        with contextlib.redirect_stdout(io.StringIO()) as answer:
            _train_task()
        print(_without_internal_groups(answer.getvalue()), end="")
        return
    _train_task()


def _without_internal_groups(completions: str) -> str:
    """Hydra's completion candidates (space-separated, one line for bash, one per line for fish)
    less the groups that only load presets (``tuned=``, ``schemas/...``): not a user's to pick."""
    lines = []
    for line in completions.splitlines():
        words = [w for w in line.split(" ") if w != "tuned=" and not w.startswith("schemas/")]
        if any(words):
            lines.append(" ".join(words))
    return "".join(f"{line}\n" for line in lines)


def _exit_with_failed_jobs(outcome: sweep.SweepOutcome, cause: str = "") -> None:
    from ppo_cli.sweep import SUMMARY_MD

    print(
        f"ppo-train: error: {outcome.failed} of {outcome.jobs} jobs did not complete{cause}; "
        f"see {outcome.sweep_dir / SUMMARY_MD}",
        file=sys.stderr,
    )
    sys.exit(1)


def train_main() -> None:
    """``ppo-train``: compose the config from the command line and train."""
    _run_cli(_train_with_resume, "ppo-train")


def _eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ppo-eval",
        description="Play a trained agent for N episodes and report its returns (also written to eval.json).",
    )
    parser.add_argument(
        "path", type=Path, help="a run directory (its checkpoints/last.pt) or a checkpoint file"
    )
    parser.add_argument(
        "--checkpoint",
        choices=("last", "best"),  # checkpoint.CHOSEN, written out: importing it imports torch
        default="last",
        help="of a run directory: last (default; its newest readable checkpoint) or best (best.pt, "
        "the agent of its best evaluation during training)",
    )
    parser.add_argument("--episodes", type=int, default=10, help="complete episodes to play (default 10)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--stochastic",
        dest="deterministic",
        action="store_false",
        default=None,
        help="sample actions instead of taking the mode (default: as the run's eval.deterministic)",
    )
    mode.add_argument("--deterministic", action="store_true", help="take the mode (argmax / mean)")
    parser.add_argument("--video", action="store_true", help="record every episode to <run dir>/videos/*.mp4")
    parser.add_argument(
        "--video-episodes",
        type=int,
        metavar="N",
        help="record only the first N episodes (implies --video; all episodes are still scored)",
    )
    parser.add_argument("--seed", type=int, default=None, help="env seed (default: the run's seed + 10000)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--import",
        dest="modules",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first (for env ids of the form module:Env; never done implicitly)",
    )
    return parser


def _eval_task() -> None:
    from ppo_cli.checkpoint import resolve_checkpoint
    from ppo_cli.evaluate import evaluate_checkpoint, write_report

    args = _eval_parser().parse_args()
    logging.basicConfig(format="ppo-eval: %(message)s")  # warnings (a checkpoint skipped) on stderr
    video = args.video or args.video_episodes is not None
    path = resolve_checkpoint(args.path, "best") if args.checkpoint == "best" else args.path
    report = evaluate_checkpoint(
        path,
        args.episodes,
        args.deterministic,
        args.seed,
        video,
        args.device,
        tuple(args.modules),
        args.video_episodes,
    )
    mode = "deterministic" if report["deterministic"] else "stochastic"
    print(f"{report['env_id']} at step {report['global_step']} ({report['checkpoint']})")
    print(
        f"{report['episodes']} {mode} episodes: mean {report['mean']:.2f}  std {report['std']:.2f}  "
        f"min {report['min']:.2f}  max {report['max']:.2f}"
    )
    for video in report["videos"]:
        print(f"video: {video}")
    write_report(report)  # after the score is shown: a run dir that cannot be written loses nothing


def eval_main() -> None:
    """``ppo-eval <run dir or checkpoint>``: evaluate a saved agent."""
    _run_cli(_eval_task, "ppo-eval")


def _compare_parser() -> argparse.ArgumentParser:
    # Imported here, not at the top: scipy.stats alone would add a second to every ppo-train start.
    from ppo_cli.compare import DEFAULT_FINAL, DEFAULT_METRIC

    parser = argparse.ArgumentParser(
        prog="ppo-compare",
        description="Learning curves (mean over seeds, 95% bootstrap band) and a results table, "
        "grouped by config keys; writes comparison.png (or --format), comparison.md and "
        "comparison.csv, and across several envs aggregate.png, .md and .csv (IQM with stratified "
        "bootstrap CIs, performance profiles).",
    )
    parser.add_argument("paths", type=Path, nargs="+", help="run directories, or directories holding runs")
    parser.add_argument(
        "--group-by",
        nargs="+",
        metavar="KEY",
        help="config keys that define a group, e.g. algo or algo.clip_eps "
        "(default: every key that differs between runs, seed excepted)",
    )
    parser.add_argument(
        "--metric", default=DEFAULT_METRIC, help=f"scalar tag to plot (default {DEFAULT_METRIC})"
    )
    parser.add_argument(
        "--final",
        default=DEFAULT_FINAL,
        help=f"scalar tag whose last value is a run's final score (default {DEFAULT_FINAL}, "
        "or the plotted metric for runs without it)",
    )
    parser.add_argument("--threshold", type=float, help="also report steps and wall time to reach this value")
    parser.add_argument("--out", type=Path, help="output directory (default: the first path)")
    parser.add_argument(
        "--format",
        default="png",
        metavar="FORMATS",
        help="figure formats, one or several of png, pdf, svg (e.g. png,pdf; default png)",
    )
    parser.add_argument(
        "--x",
        default="steps",
        metavar="{steps,time}",
        help="x axis: steps (environment steps, default) or time (wall clock since each run's start)",
    )
    parser.add_argument(
        "--smooth",
        type=float,
        default=0.0,
        metavar="WEIGHT",
        help="smooth each run's curve as TensorBoard's slider does (debiased EMA of the logged "
        "points), weight in [0, 1), e.g. 0.6 (default 0: none); tables use the raw values",
    )
    parser.add_argument(
        "--seed-lines",
        action="store_true",
        help="also draw each run's own curve, faint, under its group's mean",
    )
    return parser


def _compare_task() -> None:
    from ppo_cli.compare import check_options, compare

    args = _compare_parser().parse_args()
    formats = check_options(args.format, args.x, args.smooth)
    logging.basicConfig(format="ppo-compare: %(message)s")  # warnings (a run skipped) on stderr
    results, written = compare(
        args.paths, args.group_by, args.metric, args.final, args.threshold, args.out,
        formats=formats, x=args.x, smooth=args.smooth, seed_lines=args.seed_lines,
    )  # fmt: skip
    for r in results:
        interval = "" if r.ci_low is None else f", 95% CI {r.ci_low:.2f} to {r.ci_high:.2f}"
        iqm_interval = "" if r.iqm_low is None else f", 95% CI {r.iqm_low:.2f} to {r.iqm_high:.2f}"
        print(f"{r.label}: {len(r.runs)} runs, final {r.mean:.2f}{interval} (IQM {r.iqm:.2f}{iqm_interval})")
    print(f"wrote {written[0]}, {', '.join(path.name for path in written[1:])}")


def compare_main() -> None:
    """``ppo-compare <dirs...>``: curves and tables across runs."""
    _run_cli(_compare_task, "ppo-compare")


def _export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ppo-export",
        description="Write a trained policy as one self-contained file (TorchScript or ONNX): the "
        "observation normalisation, the networks and the action mapping inside.",
    )
    parser.add_argument(
        "path", type=Path, help="a run directory (its newest readable checkpoint) or a checkpoint file"
    )
    parser.add_argument("--format", required=True, metavar="torchscript|onnx", help="the file format")
    parser.add_argument(
        "--out", type=Path, help="the file to write (default: <run dir>/policy.torchscript or policy.onnx)"
    )
    parser.add_argument(
        "--stochastic",
        dest="deterministic",
        action="store_false",
        help="sample actions instead of taking the mode (argmax / mean)",
    )
    parser.add_argument(
        "--action-mask",
        action="store_true",
        help="add an input 'action_mask' (allowed discrete actions), for agents trained with masks",
    )
    return parser


def _export_task() -> None:
    from ppo_cli.export import export_checkpoint  # torch's exporters: only when exporting

    args = _export_parser().parse_args()
    logging.basicConfig(format="ppo-export: %(message)s")  # warnings (a checkpoint skipped) on stderr
    out, signature = export_checkpoint(args.path, args.format, args.out, args.deterministic, args.action_mask)
    print(f"wrote {out}: {signature}")


def export_main() -> None:
    """``ppo-export <run dir or checkpoint> --format torchscript|onnx``: a policy for deployment."""
    _run_cli(_export_task, "ppo-export")


if __name__ == "__main__":
    train_main()
