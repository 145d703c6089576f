"""Every citation resolves for a reader holding the repository and the papers: no file names a document outside
the repository, every repository path a file names exists, every "docs/<note>.md §N" names a section of that
note, and every relative link of the Markdown pages leads to a file."""
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Any Markdown document a file names, with the folders before it ("docs/mult.md", "../notes/plan.md", "GUIDE.md").
DOCUMENT = re.compile(r"(?<![\w./-])((?:\.\./|[\w-]+/)*[\w.-]+\.md)\b")
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


def outside(name):
    """The Markdown documents file `name` names that are not in the repository (neither from its root nor from
    the file's own folder; a path that leaves the repository counts as outside even where it exists on this
    machine): notes its authors had and its readers do not."""
    def inside(doc, folder):
        path = os.path.normpath(os.path.join(REPO, folder, doc))
        return path.startswith(os.path.join(os.path.normpath(REPO), "")) and os.path.exists(path)
    return sorted({doc for doc in DOCUMENT.findall(read(name))
                   if not inside(doc, "") and not inside(doc, os.path.dirname(name))})


def test_no_document_outside_the_repository_is_cited():
    found = [(name, docs) for name in tracked(".py", ".md", ".cff", ".txt")
             if name != "tests/test_citations.py" and (docs := outside(name))]    # its examples name some
    assert not found, found


def test_a_document_outside_the_repository_is_caught(tmp_path, monkeypatch):
    """The check above finds a note kept beside the repository (though it exists on this machine), a sibling
    project's page and a bare name, and passes the repository's own notes, from the root or from their folder."""
    repo = tmp_path / "repo"
    (repo / "guide").mkdir(parents=True)
    (repo / "guide" / "method.md").write_text("# 1 Notes\n")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "plan.md").write_text("the authors' plan\n")
    (repo / "guide" / "page.md").write_text("see guide/method.md and method.md; not ../notes/plan.md, "
                                            "../../notes/plan.md, other/README.md or GUIDE.md\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", str(repo))
    assert outside(os.path.join("guide", "page.md")) == ["../../notes/plan.md", "../notes/plan.md", "GUIDE.md",
                                                        "other/README.md"]


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
