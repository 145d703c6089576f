"""Every citation resolves for a reader holding the repository and the papers: no file names a document outside
the repository, every repository path a file names exists, every "docs/<note>.md §N" names a section of that
note, and every relative link of the Markdown pages leads to a file."""
import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Documents this project's authors had that its readers do not: they must never be cited.
OUTSIDE = ("STYLE.md", "shared/spec", "../shared", "user-needs.md", "sota.md", "spec/mult.md", "spec/mbmil.md",
           "spec/llcm.md")
PATH = re.compile(r"(?<![\w./-])((?:tests|bench|docs|data|plumbing|demo)/[\w/.-]*\w\.(?:py|md))")
SECTION = re.compile(r"docs/(mult|mbmil|llcm)\.md,? §(A\.\d+|\d+(?:\.\d+)?)")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def tracked(*suffixes):
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    return [f for f in files if f.endswith(suffixes) and os.path.isfile(os.path.join(REPO, f))]


def read(name):
    with open(os.path.join(REPO, name), encoding="utf-8") as f:
        return f.read()


def headings(note):
    """The section numbers of a method note: "5.4" for "### 5.4 ...", "A.2" for "## A.2 ..."."""
    return set(re.findall(r"^#+ (A\.\d+|\d+(?:\.\d+)?)[. ]", read(f"docs/{note}.md"), flags=re.M))


def test_no_document_outside_the_repository_is_cited():
    found = [(name, word) for name in tracked(".py", ".md", ".cff", ".txt") if name != "tests/test_citations.py"
             for word in OUTSIDE if word in read(name)]
    assert not found, found


def test_every_repository_path_named_exists():
    missing = sorted({(name, path) for name in tracked(".py", ".md") for path in PATH.findall(read(name))
                      if not os.path.exists(os.path.join(REPO, path))
                      and not os.path.exists(os.path.join(REPO, os.path.dirname(name), path))})
    assert not missing, missing


def test_every_section_cited_exists():
    known = {note: headings(note) for note in ("mult", "mbmil", "llcm")}
    missing = sorted({(name, f"docs/{note}.md §{sec}") for name in tracked(".py", ".md")
                      for note, sec in SECTION.findall(read(name))
                      if sec not in known[note] and sec.split(".")[0] not in known[note]})
    assert not missing, missing


@pytest.mark.parametrize("page", ["README.md"] + sorted(f"docs/{n}" for n in os.listdir(os.path.join(REPO, "docs"))
                                                          if n.endswith(".md")))
def test_every_relative_link_leads_to_a_file(page):
    folder = os.path.dirname(os.path.join(REPO, page))
    broken = [link for link in LINK.findall(read(page)) if "://" not in link
              and not os.path.exists(os.path.normpath(os.path.join(folder, link)))]
    assert not broken, broken
