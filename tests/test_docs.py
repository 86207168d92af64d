"""The documentation: the configuration reference is current, every config field documents itself, and
every relative link in README.md and docs/ leads somewhere."""

import dataclasses
import re
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


# --------------------------------------------------------------------------------------------------------
# Links

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _anchors(page: Path) -> set[str]:
    """Heading ids as GitHub makes them: lower case, punctuation but - and _ dropped, spaces as hyphens."""
    text = FENCE.sub("", page.read_text())
    headings = re.findall(r"^#{1,6} +(.+?) *#*$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def _links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)  # a link shown as code is not a link
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_every_relative_link_resolves():
    broken = []
    for page in _pages():
        for target in _links(page):
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            name = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {name} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_link_check_sees_a_broken_link(tmp_path):
    """The checker's parts can fail: a link to nothing is found, a heading's id is GitHub's."""
    page = tmp_path / "page.md"
    page.write_text("# Scale out: DDP, FSDP\n\n[a](missing.md) [b](#scale-out-ddp-fsdp) `[c](code.md)`\n")
    assert _links(page) == ["missing.md", "#scale-out-ddp-fsdp"]
    assert _anchors(page) == {"scale-out-ddp-fsdp"}


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in _links(ROOT / "README.md")}
    orphans = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not orphans, f"docs pages the README does not link: {', '.join(orphans)}"


def test_the_readme_is_one_page_and_names_the_test_command():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 250
    assert "make test" in text  # .ci/run runs the README's test command
