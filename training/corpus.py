"""Offline English + Python text for the tiny model: pydoc pages and source of the standard library.

Everything comes from the running interpreter, so training needs no network. Modules are imported in a
child process with a fixed hash seed: imports can have side effects, and set reprs in pydoc pages would
otherwise change order from run to run. Output depends only on the interpreter, `max_chars` and `seed`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import pydoc
import random
import re
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path

# Packages and modules never imported or read: they open windows or browsers, print on import,
# write caches, or are test suites rather than documentation.
_SKIPPED_NAMES = frozenset(
    {
        "antigravity",
        "distutils",
        "ensurepip",
        "idlelib",
        "lib2to3",
        "pydoc_data",
        "readline",
        "rlcompleter",
        "site-packages",
        "test",
        "tests",
        "this",
        "tkinter",
        "turtle",
        "turtledemo",
    }
)
# Submodules worth their own page (a package's page only lists its submodules' names).
_SUBMODULES = (
    "collections.abc",
    "concurrent.futures",
    "email.message",
    "email.utils",
    "http.client",
    "http.server",
    "importlib.metadata",
    "importlib.resources",
    "json.decoder",
    "json.encoder",
    "logging.handlers",
    "os.path",
    "unittest.mock",
    "urllib.parse",
    "urllib.request",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
)
# pydoc sections dropped from pages: DATA holds live values (os.environ, sys.path), FILE holds local
# paths, MODULE REFERENCE is the same boilerplate on every page.
_DROPPED_SECTIONS = frozenset({"DATA", "FILE", "MODULE REFERENCE"})
_SECTION_RE = re.compile(r"^[A-Z][A-Z ]*$")
_ADDRESS_RE = re.compile(r" at 0x[0-9a-fA-F]+")
# Fixed hash seed: set reprs in pages keep one order from run to run.
_CHILD_ENV = {"PYTHONHASHSEED": "0", "LC_ALL": "C.UTF-8"}

DEFAULT_MAX_CHARS = 5_000_000
MAX_CHUNK_CHARS = 16_000


def documented_modules() -> list[str]:
    """Sorted names of the standard-library modules whose pydoc pages go into the corpus."""
    names = {name for name in sys.stdlib_module_names if not name.startswith("_")} | set(_SUBMODULES)
    return sorted(name for name in names if name.split(".")[0] not in _SKIPPED_NAMES)


def _clean_page(page: str) -> str:
    kept: list[str] = []
    dropping = False
    for line in page.splitlines():
        if _SECTION_RE.match(line):
            dropping = line in _DROPPED_SECTIONS
        if not dropping:
            kept.append(line.rstrip())
    return _ADDRESS_RE.sub("", "\n".join(kept)).strip() + "\n"


def render_pages(names: list[str]) -> dict[str, str]:
    """pydoc plain-text pages by module name; modules that fail to import or render are left out.

    Imports modules into this process: call it in a child process (see `pydoc_pages`).
    """
    pages: dict[str, str] = {}
    for name in names:
        # Import-time prints and warnings are noise, not documentation.
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            try:
                module = importlib.import_module(name)
                # plaintext: no backspace-overstrike bold (typeshed lacks the attribute).
                page = pydoc.render_doc(module, renderer=pydoc.plaintext)  # type: ignore[attr-defined]
            except Exception:  # any import or render failure just means "no page for this module"
                continue
        pages[name] = _clean_page(page)
    return pages


def pydoc_pages() -> dict[str, str]:
    """`render_pages(documented_modules())`, run in a child interpreter with a bare, fixed environment.

    Default values in signatures show live objects (cgi's `environ=os.environ`), so the child gets no
    inherited variables and runs in "/", and local install paths are replaced by placeholders.
    """
    repo_root = str(Path(__file__).resolve().parents[1])
    code = f"import sys; sys.path.insert(0, {repo_root!r}); from training.corpus import main; main()"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pages.json"
        cmd = [sys.executable, "-c", code, "--render-pages", str(out)]
        subprocess.run(cmd, check=True, env=_CHILD_ENV, cwd="/", stdout=subprocess.DEVNULL)
        pages: dict[str, str] = json.loads(out.read_text(encoding="utf-8"))
    return {name: _scrub_paths(page, repo_root) for name, page in pages.items()}


def _scrub_paths(page: str, repo_root: str) -> str:
    # Longest first, so the interpreter path goes before the prefix that contains it.
    local_paths = {
        sys.executable: "python",
        sys.prefix: "<prefix>",
        sys.base_prefix: "<prefix>",
        repo_root: "<repo>",
    }
    for path in sorted(local_paths, key=len, reverse=True):
        page = page.replace(path, local_paths[path])
    return page


def stdlib_sources() -> dict[str, str]:
    """Source text of the standard library's .py files by relative path, sorted, skipped dirs left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    sources: dict[str, str] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _SKIPPED_NAMES or part == "__pycache__" for part in rel.parts):
            continue
        if rel.parts[0].startswith("config-"):  # build config scripts, not library code
            continue
        try:
            sources[rel.as_posix()] = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
    return sources


def split_chunks(text: str, max_chars: int = MAX_CHUNK_CHARS) -> list[str]:
    """Splits `text` at blank lines into pieces of about `max_chars` at most (long paragraphs stay whole)."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for paragraph in text.split("\n\n"):
        if current and size + len(paragraph) > max_chars:
            chunks.append("\n\n".join(current))
            current, size = [], 0
        current.append(paragraph)
        size += len(paragraph) + 2
    if current:
        chunks.append("\n\n".join(current))
    return [chunk for chunk in chunks if chunk.strip()]


def load_corpus(max_chars: int = DEFAULT_MAX_CHARS, seed: int = 0, docs_fraction: float = 0.6) -> list[str]:
    """Shuffled documents totalling about `max_chars`: `docs_fraction` pydoc pages, the rest source code.

    Long pages and files are cut into chunks first so that no single module dominates the sample.
    """
    rng = random.Random(seed)
    doc_chunks = [chunk for page in pydoc_pages().values() for chunk in split_chunks(page)]
    source_chunks = [chunk for text in stdlib_sources().values() for chunk in split_chunks(text)]
    rng.shuffle(doc_chunks)
    rng.shuffle(source_chunks)
    documents = _take(doc_chunks, int(max_chars * docs_fraction))
    documents += _take(source_chunks, max_chars - sum(len(doc) for doc in documents))
    rng.shuffle(documents)
    return documents


def _take(chunks: list[str], budget_chars: int) -> list[str]:
    taken: list[str] = []
    for chunk in chunks:
        if budget_chars <= 0:
            break
        taken.append(chunk)
        budget_chars -= len(chunk)
    return taken


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--render-pages", type=Path, metavar="OUT_JSON", help="child mode: write pydoc pages")
    parser.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.render_pages is not None:
        args.render_pages.write_text(json.dumps(render_pages(documented_modules())), encoding="utf-8")
        return
    documents = load_corpus(args.max_chars, args.seed)
    print(f"{len(documents)} documents, {sum(len(doc) for doc in documents)} chars")


if __name__ == "__main__":
    main()
