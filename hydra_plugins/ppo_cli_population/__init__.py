"""``hydra/launcher=population``: ppo-train's Hydra launcher that trains the compatible jobs of a
sweep as populations in one process (``ppo_cli/grouping.py`` forms them, ``_core.py`` runs them).

Hydra imports every public module of the ``hydra_plugins`` namespace package at each start, even
for ``--help`` or a completion query, so these modules import nothing heavy: ``_core`` (torch,
the trainer) is imported when jobs are launched.
"""
