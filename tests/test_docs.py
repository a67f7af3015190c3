"""The docs are part of the API: their code runs (every page, in the site's order), their API
table is the public surface, their weight table is the loaders', and the README's "where is
what" names files and functions that exist."""

import re
from pathlib import Path

import jaxattn.functional

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def pages_in_order() -> list[Path]:
    """The Markdown pages of the site, in the order of mkdocs.yml's nav."""
    names = re.findall(r":\s+(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.M)
    return [DOCS / name for name in names]


def python_blocks():
    return [(page.name, block) for page in pages_in_order()
            for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)]


def test_every_page_is_in_the_nav():
    assert {page.name for page in pages_in_order()} == {path.name for path in DOCS.glob("*.md")}


def test_every_python_block_runs_in_order():
    blocks = python_blocks()
    assert len(blocks) >= 5
    namespace = {}
    for number, (page, block) in enumerate(blocks, start=1):
        try:
            exec(compile(block, f"docs/{page} python block {number}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"docs/{page} python block {number} fails: {error!r}\n{block}") from error


def test_api_table_is_the_public_surface():
    text = (DOCS / "api.md").read_text()
    table = text[text.index("`jaxattn.functional` (pure JAX, no Flax)") :]
    table = table[: table.index("\n\n", table.index("| name |"))]
    documented = set()
    for row in table.splitlines()[2:]:
        first_cell = row.split("|")[1]
        documented.update(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)", first_cell))
    assert documented == set(jaxattn.functional.__all__)


def _expand_braces(name):
    match = re.search(r"\{([a-z_]+(?:,[a-z_]+)+)\}", name)  # {q,k,v,o}; {i} stays
    if not match:
        return [name]
    return [n for part in match.group(1).split(",") for n in _expand_braces(name[: match.start()] + part + name[match.end() :])]


def test_weight_name_table_is_the_loaders_table():
    from jaxattn.lm import hf

    text = (DOCS / "inspect.md").read_text()
    table = text[text.index("| checkpoint tensor | jaxattn parameter |") :]
    table = table[: table.index("\n\n")]
    documented = set()
    for row in table.splitlines()[2:]:
        for name in re.findall(r"`([A-Za-z0-9_.{},]+)`", row.split("|")[1]):
            for full in _expand_braces(name):
                if full.startswith("."):
                    continue  # "/ `.bias`" shorthand: the row's weight name with .bias
                documented.add(full)
    loader = {row.checkpoint for table_ in hf.WEIGHT_TABLES.values() for row in table_}
    undocumented = {name for name in loader if name not in documented and name.replace(".weight", ".bias") != name
                    and name.endswith(".weight")}
    assert not undocumented, f"in the loader's tables, not in docs/inspect.md: {sorted(undocumented)}"
    source = "\n".join(path.read_text() for path in Path(hf.__file__).parent.glob("*.py"))
    unknown = {name for name in documented if "." in name and name not in loader and f'"{name}' not in source
               and f"{name}" not in source}
    assert not unknown, f"in the docs' table, not in jaxattn/lm/hf/: {sorted(unknown)}"


def test_where_is_what_names_files_and_functions_that_exist():
    text = README.read_text()
    table = text[text.index("| concept | where it is implemented | where it is tested |") :]
    table = table[: table.index("\n\n")]
    root = README.parent
    rows = table.splitlines()[2:]
    assert len(rows) >= 15
    for row in rows:
        _, concept, implemented, tested, _ = row.split("|")
        for part in implemented.split(";"):
            path, _, names = part.partition(":")
            source = (root / path.strip().strip("`")).read_text()
            for name in re.findall(r"`(\w+)`", names):
                assert re.search(rf"^(def|class) {name}\b|^{name} = |\b(def|class) {name}\b", source, re.M), (concept, name)
        for path in re.findall(r"`([\w/.]+)`", tested):
            assert (root / path).is_file(), (concept, path)
