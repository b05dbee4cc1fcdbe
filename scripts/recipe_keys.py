"""Write docs/recipe-keys.md, the reference of every recipe key, from the pydantic schema in edgekd/recipe.py.

    .venv/bin/python scripts/recipe_keys.py [--check]
"""

import argparse
import sys
from pathlib import Path

from edgekd.fileio import write_text
from edgekd.recipe import recipe_key_reference

OUT = Path(__file__).resolve().parents[1] / "docs" / "recipe-keys.md"

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only say whether the file is up to date (exit 1 if not)")
    args = ap.parse_args()
    text = recipe_key_reference()
    if args.check:
        current = OUT.read_text(encoding="utf-8") if OUT.is_file() else ""
        print(f"{OUT}: {'up to date' if current == text else 'out of date: run scripts/recipe_keys.py'}")
        sys.exit(0 if current == text else 1)
    write_text(OUT, text)
    print(f"wrote {OUT}")
