"""README.md's promises about itself: its flags block is `python train_gpt.py --help`'s, its lines fit in 120
characters (as do the other guides'), and it stays under 2,500 words."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
GUIDES = [README, REPO / "records" / "README.md", REPO / "data" / "README.md", REPO / "docs" / "reference.md"]
MAX_WORDS = 2500

_spec = importlib.util.spec_from_file_location("readme_flags", REPO / "scripts" / "readme_flags.py")
readme_flags = importlib.util.module_from_spec(_spec)
sys.modules["readme_flags"] = readme_flags
_spec.loader.exec_module(readme_flags)


def test_flags_block_is_help_output():
    readme = README.read_text()
    expected = readme_flags.with_flags_block(readme, readme_flags.flags_block(readme_flags.help_output()))
    assert readme == expected, "README.md's flags block differs from --help: run python scripts/readme_flags.py"


def test_flags_block_keeps_every_word_of_help_and_fits():
    help_text = "usage line\nEnv flags (x):\n  NAME" + " " * 20 + "default" + " " * 30 + "word " * 60 + "\nlast\n"
    lines = readme_flags.flag_lines(help_text)
    assert lines[0] == "Env flags (x):" and lines[-1] == "last"
    assert all(len(line) <= readme_flags.MAX_LINE for line in lines)
    assert " ".join(lines).split() == help_text[help_text.index("Env flags"):].split()
    continued = lines[2]  # the wrapped help goes on under its own column
    assert continued.startswith(" " * lines[1].index("word")) and continued.strip().startswith("word")


def test_check_names_the_command_when_readme_differs(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "README.md"
    stale.write_text(f"intro\n{readme_flags.BEGIN}\n```text\nold\n```\n{readme_flags.END}\nend\n")
    monkeypatch.setattr(readme_flags, "README", stale)
    monkeypatch.setattr(readme_flags, "help_output", lambda: "Env flags (x):\n  NAME  1  help\n")
    assert readme_flags.main(["--check"]) == 1
    assert capsys.readouterr().out.strip().endswith("run python scripts/readme_flags.py")
    assert readme_flags.main([]) == 0 and "  NAME  1  help" in stale.read_text()
    assert stale.read_text().startswith("intro\n") and stale.read_text().endswith("\nend\n")
    assert readme_flags.main(["--check"]) == 0


def test_missing_markers_are_an_error():
    with pytest.raises(RuntimeError, match="no flags block"):
        readme_flags.with_flags_block("no markers here\n", "block")


@pytest.mark.parametrize("guide", GUIDES, ids=lambda path: str(path.relative_to(REPO)))
def test_lines_within_120_characters(guide):
    long_lines = [f"{guide.name}:{number}: {len(line)}" for number, line in enumerate(guide.read_text().splitlines(), 1)
                  if len(line) > 120]
    assert not long_lines, f"lines over 120 characters: {long_lines}"


def test_readme_under_2500_words():
    words = len(README.read_text().split())
    assert words < MAX_WORDS, f"README.md has {words} words; move reference material to docs/reference.md"
