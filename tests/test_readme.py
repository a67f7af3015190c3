"""The README is part of the API: its code runs, its API table is the public surface."""

import re
from pathlib import Path

import jaxattn.functional

README = Path(__file__).parent.parent / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_every_python_block_runs_in_order():
    blocks = python_blocks()
    assert len(blocks) >= 5
    namespace = {}
    for number, block in enumerate(blocks, start=1):
        try:
            exec(compile(block, f"README.md python block {number}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"README python block {number} fails: {error!r}\n{block}") from error


def test_api_table_is_the_public_surface():
    text = README.read_text()
    table = text[text.index("`jaxattn.functional` (pure JAX, no Flax)") :]
    table = table[: table.index("\n\n", table.index("| name |"))]
    documented = set()
    for row in table.splitlines()[2:]:
        first_cell = row.split("|")[1]
        documented.update(re.findall(r"`([A-Za-z_]+)", first_cell))
    assert documented == set(jaxattn.functional.__all__)
