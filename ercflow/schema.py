"""`ercflow schema`: write the JSON Schema of params.yaml (pipeline/params/schema.py's model, head options
included). The repository keeps it as params.schema.json, for editors (yaml-language-server) and review."""
from __future__ import annotations

import json
import sys
from pathlib import Path

SCHEMA_FILE = "params.schema.json"


def schema_text() -> str:
    from ercflow.check import params_schema

    return json.dumps(params_schema(), indent=2, sort_keys=True) + "\n"


def add_arguments(parser) -> None:
    parser.add_argument("--out", default=SCHEMA_FILE, help="where to write it; '-' for stdout (default: %(default)s)")


def run(args) -> int:
    text = schema_text()
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"{args.out}: JSON Schema of params.yaml written")
    return 0
