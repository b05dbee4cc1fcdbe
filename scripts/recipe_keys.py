"""Write docs/recipe-keys.md, the reference of every recipe key, from the pydantic schema in edgekd/recipe.py.

    .venv/bin/python scripts/recipe_keys.py
"""

from pathlib import Path

from edgekd.fileio import write_text
from edgekd.recipe import recipe_key_reference

OUT = Path(__file__).resolve().parents[1] / "docs" / "recipe-keys.md"

if __name__ == "__main__":
    write_text(OUT, recipe_key_reference())
    print(f"wrote {OUT}")
