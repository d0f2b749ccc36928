"""docs/algorithms.md against the config schemas: the doc names every key a variant has, and no key
that its variant lacks.

The doc is read as the user reads it: ``algo.<key>`` names a key (``algo.gae_lambda=0`` too),
``algo=<name>`` a variant, and a ``## ...`` heading that ends with (`algo=<name>`) opens that
variant's section. Sections without a variant (GAE, the KL estimators, shared trunks) describe
keys that several variants share, so a key there need only exist in some schema. A variant's
section may name another variant's key only in a paragraph that names that variant too (a command
line such as ``ppo-train algo=a2c algo.gae_lambda=0``, or a comparison), so rewrapping the prose
does not break the check but a key on the wrong variant does.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from ppo_cli.config import ALGO_SCHEMAS

DOC = Path(__file__).resolve().parents[1] / "docs" / "algorithms.md"
KEY = re.compile(r"\balgo\.([a-z_][a-z0-9_]*)")
VARIANTS = re.compile(r"\balgo=([a-z_][a-z0-9_,]*)")
VARIANT_HEADING = re.compile(r"\(`algo=([a-z_][a-z0-9_]*)`\)\s*$")
NOT_KEYS = {"name"}  # chosen as algo=<name>, not set as a key


def schema_keys(variant: str) -> set[str]:
    return {field.name for field in dataclasses.fields(ALGO_SCHEMAS[variant])} - NOT_KEYS


ALL_KEYS = set().union(*(schema_keys(variant) for variant in ALGO_SCHEMAS))


def named_variants(text: str) -> set[str]:
    return {name for match in VARIANTS.findall(text) for name in match.split(",") if name}


def sections() -> list[tuple[str, str | None, str]]:
    """(heading, the variant its heading names or None, body) of each ``## `` section; ``###``
    subsections stay in theirs."""
    found = []
    for chunk in re.split(r"^(?=## )", DOC.read_text(), flags=re.MULTILINE):
        heading, _, body = chunk.partition("\n")
        if heading.startswith("## "):
            match = VARIANT_HEADING.search(heading)
            found.append((heading, match.group(1) if match else None, body))
    return found


def test_every_key_the_doc_names_is_a_key_of_some_variant() -> None:
    named = set(KEY.findall(DOC.read_text()))
    assert not named - ALL_KEYS, f"{DOC.name} names keys that no algo schema has: {sorted(named - ALL_KEYS)}"


def test_every_key_of_every_variant_is_in_the_doc() -> None:
    named = set(KEY.findall(DOC.read_text()))
    missing = {f"{variant}: {key}" for variant in ALGO_SCHEMAS for key in schema_keys(variant) - named}
    assert not missing, f"{DOC.name} does not name these keys (as `algo.<key>`): {sorted(missing)}"


def test_every_variant_has_one_section_and_the_doc_names_no_other() -> None:
    headed = [variant for _, variant, _ in sections() if variant is not None]
    assert sorted(headed) == sorted(ALGO_SCHEMAS), "one `## ... (`algo=<name>`)` section per variant"
    unknown = named_variants(DOC.read_text()) - set(ALGO_SCHEMAS)
    assert not unknown, f"{DOC.name} names variants that do not exist: {sorted(unknown)}"


@pytest.mark.parametrize("variant", sorted(ALGO_SCHEMAS))
def test_a_variant_s_section_names_only_its_own_keys(variant: str) -> None:
    (body,) = [body for _, named, body in sections() if named == variant]
    wrong = []
    for paragraph in re.split(r"\n\s*\n", body):
        allowed = set().union(*(schema_keys(v) for v in {variant} | named_variants(paragraph)))
        wrong += [key for key in KEY.findall(paragraph) if key not in allowed]
    assert not wrong, f"the section of algo={variant} names keys it does not have: {sorted(wrong)}"
