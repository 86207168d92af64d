"""The documentation: the configuration reference is current and every config field documents itself."""

import dataclasses
from pathlib import Path

from vae_scale.config import Config
from vae_scale.config_reference import field_docs, missing_docs, reference

ROOT = Path(__file__).resolve().parents[1]


def test_the_configuration_reference_is_current():
    written = (ROOT / "docs" / "configuration.md").read_text()
    assert written == reference(), "docs/configuration.md is stale: run `make docs`"


def test_every_config_field_has_a_docstring():
    assert missing_docs() == []
    # and the reference shows each key, with its docstring
    text = reference()
    for section in dataclasses.fields(Config):
        for name, doc in field_docs(section.default_factory).items():
            assert f"`{section.name}.{name}`" in text
            assert doc.replace("|", "\\|").replace("<", "\\<") in text, f"{section.name}.{name}"


@dataclasses.dataclass
class _Example:
    documented: int = 1
    """Has a docstring."""
    undocumented: str = "x"
    also_documented: list[int] = dataclasses.field(default_factory=list)
    """Spans
    two lines."""


def test_field_docs_finds_a_missing_docstring():
    """The check above can fail: a field with no string after it is missing, the others are read whole."""
    assert field_docs(_Example) == {"documented": "Has a docstring.", "also_documented": "Spans two lines."}
