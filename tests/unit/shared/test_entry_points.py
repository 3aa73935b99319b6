"""Entry points, checked on the source: a module's `if __name__ == "__main__":` block is its last statement.

Run as a script or with `-m` (torchrun and the deepspeed launcher start `-m cadence.trainer.main`), the module
is `__main__` and the block runs while the module itself is still running: a function defined below the block
does not exist yet (NameError), while importing the module, as the CLI does, works. A helper placed below the
trainer's block failed that way on rank 0 only under torchrun.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
SOURCES = ("shared", "services", "bench", "tests")


def is_main_guard(node: ast.stmt) -> bool:
    """`if __name__ == "__main__":`."""
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    test = node.test
    sides = [test.left, *test.comparators]
    return (
        isinstance(test.ops[0], ast.Eq)
        and any(isinstance(side, ast.Name) and side.id == "__name__" for side in sides)
        and any(isinstance(side, ast.Constant) and side.value == "__main__" for side in sides)
    )


def late_entry_blocks(root: Path) -> list[str]:
    """`path:line` of every `__main__` block that has statements after it, naming the first of them."""
    found = []
    for folder in SOURCES:
        for path in sorted((root / folder).rglob("*.py")):
            body = ast.parse(path.read_text(), str(path)).body
            for index, node in enumerate(body[:-1]):
                if is_main_guard(node):
                    after = body[index + 1]
                    name = getattr(after, "name", type(after).__name__)
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {name} (line {after.lineno}) after it")
    return found


def test_every_main_block_is_last() -> None:
    late = late_entry_blocks(REPO)
    assert not late, "move these below the code they call (it does not exist yet under -m):\n" + "\n".join(late)


def test_the_check_finds_a_function_after_the_block(tmp_path: Path) -> None:
    (tmp_path / "services").mkdir()
    script = 'def main():\n    helper()\n\n\nif "__main__" == __name__:\n    main()\n\n\ndef helper():\n    pass\n'
    (tmp_path / "services" / "late.py").write_text(script)
    (tmp_path / "services" / "fine.py").write_text('if __name__ == "__main__":\n    pass\n')
    assert late_entry_blocks(tmp_path) == ["services/late.py:5: helper (line 9) after it"]
