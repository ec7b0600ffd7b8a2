"""`ercflow recipe NAME`: start from a paper's settings. A recipe (recipes/NAME.yaml) holds only what differs
from the current params file; it is merged into it (mappings merge key by key, lists and values are replaced)
and the result, checked, is written back (or to --out). `ercflow recipe --list` lists them."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import yaml

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def apply_recipe(name: str, params: dict) -> dict:
    path = RECIPES / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no recipe '{name}'; known: {', '.join(recipe_names())}")
    return merge(params, yaml.safe_load(path.read_text()) or {})


def add_arguments(parser) -> None:
    parser.add_argument("name", nargs="?", help="the recipe (see --list)")
    parser.add_argument("--list", action="store_true", help="list the recipes and their first line")
    parser.add_argument("--params", default="params.yaml", help="the params file to start from (default: %(default)s)")
    parser.add_argument("--out", default=None, help="where to write the result (default: the --params file)")


def run(args) -> int:
    from ercflow.check import check_params
    from pipeline.store import atomic_write_text

    if args.list or not args.name:
        for name in recipe_names():
            first = (RECIPES / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
            print(f"{name:22s} {first}")
        return 0 if args.list else 2
    try:
        merged = apply_recipe(args.name, yaml.safe_load(Path(args.params).read_text()) or {})
    except (FileNotFoundError, yaml.YAMLError) as e:
        print(f"ercflow recipe: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or args.params)
    text = (f"# {args.params} with recipes/{args.name}.yaml applied (`ercflow recipe {args.name}`)\n"
            + yaml.safe_dump(merged, sort_keys=False, width=110))
    atomic_write_text(out.with_name(out.name + ".recipe"), text)
    problems = check_params(out.with_name(out.name + ".recipe"))
    Path(out.with_name(out.name + ".recipe")).unlink()
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print(f"ercflow recipe: {args.name} does not apply cleanly; {out} left as it was", file=sys.stderr)
        return 1
    atomic_write_text(out, text)
    print(f"{out}: recipe {args.name} applied; run `dvc repro` (or `dvc exp run`)")
    return 0
