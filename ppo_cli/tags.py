"""The TensorBoard section of every number an updater reports: decided here, and only here.

CleanRL's names stay where CleanRL has them (``losses/policy_loss``, ``losses/approx_kl``, ...), so
curves overlay with published runs. The rest would bury those charts: the KL estimates get a section
of their own (``kl/``), and what says how the update went rather than what it minimised
(minibatch steps taken, an early stop, TRPO's line search) goes to ``diagnostics/``.
"""

from __future__ import annotations

# Loss terms: CleanRL's names, plus the surrogate alone where a variant adds a KL term to it.
LOSSES = frozenset(
    {
        "policy_loss",
        "value_loss",
        "entropy",
        "old_approx_kl",
        "approx_kl",
        "clipfrac",
        "explained_variance",
        "surrogate_loss",
    }
)
KL_PREFIX = "kl_"  # an updater's kl_<name> (an estimate, PPO-Penalty's beta) is logged as kl/<name>


def metric_tag(name: str) -> str:
    """The tag of the updater metric ``name``: ``losses/<name>`` for a loss term,
    ``kl/<rest>`` for ``kl_<rest>``, ``diagnostics/<name>`` for everything else."""
    if name in LOSSES:
        return f"losses/{name}"
    if name.startswith(KL_PREFIX):
        return f"kl/{name.removeprefix(KL_PREFIX)}"
    return f"diagnostics/{name}"
