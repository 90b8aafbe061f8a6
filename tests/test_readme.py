"""The guides' promises about themselves: docs/flags.md's flags block is `python train_gpt.py --help`'s, README.md
opens on what this is and stays within 1,500 words, the guides' lines fit in 120 characters, and every relative
link in a guide (README.md, docs/, data/, records/ and each record's README) reaches a file and, where it names
one, a heading of that file."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FLAGS_DOC = REPO / "docs" / "flags.md"
GUIDES = [README, REPO / "records" / "README.md", REPO / "data" / "README.md", REPO / "docs" / "reference.md",
          FLAGS_DOC]
# every markdown guide whose links must resolve (the record folders' READMEs too: their tables may be wider)
LINKED = sorted({*GUIDES, *REPO.glob("docs/*.md"), *REPO.glob("records/*/README.md")})
MAX_WORDS = 1500

_spec = importlib.util.spec_from_file_location("readme_flags", REPO / "scripts" / "readme_flags.py")
readme_flags = importlib.util.module_from_spec(_spec)
sys.modules["readme_flags"] = readme_flags
_spec.loader.exec_module(readme_flags)


def test_flags_block_is_help_output():
    assert readme_flags.FLAGS_DOC == FLAGS_DOC
    text = FLAGS_DOC.read_text()
    expected = readme_flags.with_flags_block(text, readme_flags.flags_block(readme_flags.help_output()))
    assert text == expected, "docs/flags.md's flags block differs from --help: run python scripts/readme_flags.py"


def test_readme_links_to_the_flags_instead_of_holding_them():
    readme = README.read_text()
    assert readme_flags.BEGIN not in readme and readme_flags.END not in readme
    assert "](docs/flags.md)" in readme


def test_flags_block_keeps_every_word_of_help_and_fits():
    help_text = "usage line\nEnv flags (x):\n  NAME" + " " * 20 + "default" + " " * 30 + "word " * 60 + "\nlast\n"
    lines = readme_flags.flag_lines(help_text)
    assert lines[0] == "Env flags (x):" and lines[-1] == "last"
    assert all(len(line) <= readme_flags.MAX_LINE for line in lines)
    assert " ".join(lines).split() == help_text[help_text.index("Env flags"):].split()
    continued = lines[2]  # the wrapped help goes on under its own column
    assert continued.startswith(" " * lines[1].index("word")) and continued.strip().startswith("word")


def test_check_names_the_command_when_the_flags_doc_differs(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "flags.md"
    stale.write_text(f"intro\n{readme_flags.BEGIN}\n```text\nold\n```\n{readme_flags.END}\nend\n")
    monkeypatch.setattr(readme_flags, "FLAGS_DOC", stale)
    monkeypatch.setattr(readme_flags, "help_output", lambda: "Env flags (x):\n  NAME  1  help\n")
    assert readme_flags.main(["--check"]) == 1
    out = capsys.readouterr().out.strip()
    assert out.startswith(str(stale)) and out.endswith("run python scripts/readme_flags.py")
    assert readme_flags.main([]) == 0 and "  NAME  1  help" in stale.read_text()
    assert stale.read_text().startswith("intro\n") and stale.read_text().endswith("\nend\n")
    assert readme_flags.main(["--check"]) == 0


def test_missing_markers_are_an_error():
    with pytest.raises(RuntimeError, match="docs/flags.md holds no flags block"):
        readme_flags.with_flags_block("no markers here\n", "block")


@pytest.mark.parametrize("guide", GUIDES, ids=lambda path: str(path.relative_to(REPO)))
def test_lines_within_120_characters(guide):
    long_lines = [f"{guide.name}:{number}: {len(line)}" for number, line in enumerate(guide.read_text().splitlines(), 1)
                  if len(line) > 120]
    assert not long_lines, f"lines over 120 characters: {long_lines}"


def test_readme_at_most_1500_words():
    words = len(README.read_text().split())
    assert words <= MAX_WORDS, f"README.md has {words} words; move reference material to docs/reference.md"


def test_readme_opens_on_what_it_is():
    """One sentence, then what was measured (GPU: not measured), the two commands, the file map: in that order."""
    text = README.read_text()
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    assert headings[:3] == ["What was measured", "The two commands", "Where to change what"], headings
    intro = text.split("\n## ", 1)[0].split("\n", 1)[1].strip()
    assert intro and "\n\n" not in intro, "README.md opens with one paragraph under its title"
    measured = section(text, "What was measured")
    assert "| `./run.sh` without a GPU" in measured and "not measured" in measured
    commands = section(text, "The two commands")
    assert re.search(r"^\./run\.sh +#", commands, flags=re.M)
    assert re.search(r"^\./run\.sh test +#", commands, flags=re.M)
    file_map = section(text, "Where to change what")
    tracked = ["train_gpt.py", "run.sh", "data/", "tests/", "bench/", "records/", "docs/reference.md",
               "docs/flags.md"]
    assert all(re.search(rf"^{re.escape(name)} ", file_map, flags=re.M) for name in tracked), file_map


def section(text: str, heading: str) -> str:
    """The text under `## heading` up to the next `## ` heading."""
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


# ---- links ----

_LINK = re.compile(r"\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", flags=re.M | re.S)


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a file's headings: lower case, punctuation but '-' and '_' dropped, spaces to '-'
    (a repeated heading gets -1, -2, ...)."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", _FENCE.sub("", markdown), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchor, count = slug, 0
        while anchor in anchors:
            count += 1
            anchor = f"{slug}-{count}"
        anchors.add(anchor)
    return anchors


def broken_links(guide: Path) -> list[str]:
    """guide's relative links (outside code fences) whose file is missing, or whose #anchor names no heading."""
    broken = []
    for target in _LINK.findall(_FENCE.sub("", guide.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        path = (guide.parent / path_part).resolve() if path_part else guide
        if not path.exists():
            broken.append(f"{target}: no file {path}")
        elif anchor and path.suffix == ".md" and anchor not in heading_anchors(path.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {path.name}")
    return broken


@pytest.mark.parametrize("guide", LINKED, ids=lambda path: str(path.relative_to(REPO)))
def test_every_relative_link_resolves(guide):
    assert not broken_links(guide), f"{guide.relative_to(REPO)}: broken links: {broken_links(guide)}"


def test_broken_links_are_found(tmp_path):
    (tmp_path / "docs").mkdir()
    heading = "## Setup: what `./run.sh` does\n"
    (tmp_path / "docs" / "other.md").write_text(f"# Other\n\n{heading}\n{heading}")
    guide = tmp_path / "README.md"
    guide.write_text("[ok](docs/other.md) [ok](docs/other.md#setup-what-runsh-does) [ok](docs/other.md#other)\n"
                     "[ok](docs/other.md#setup-what-runsh-does-1) [ok](#top) [web](https://example.com/x.md)\n"
                     "# Top\n```\n[in a fence](missing.md)\n```\n"
                     "[gone](docs/missing.md) [bad anchor](docs/other.md#setup) [bad self](#nowhere)\n")
    broken = broken_links(guide)
    assert [entry.split(":")[0] for entry in broken] == ["docs/missing.md", "docs/other.md#setup", "#nowhere"], broken
