"""pydantic's validation errors as params problems: one line each, its params path first, then what is wrong
in words (an unknown key lists the known ones and the closest, a bad value names the allowed ones)."""
from __future__ import annotations

import difflib
from typing import Any

from pydantic import ValidationError

from pipeline.configs import DEFAULT_FINETUNE_KIND


def validation_problems(error: ValidationError, prefix: str, data: Any, schema: dict) -> list[str]:
    """One line per pydantic error: the params path, then what is wrong (unknown keys list the known ones)."""
    return [_problem(e, prefix, data, schema) for e in error.errors(include_url=False)]


def _problem(e: dict, prefix: str, data: Any, schema: dict) -> str:
    loc, shown = list(e["loc"]), []
    node = data
    for el in loc:   # drop the union tags pydantic puts in `loc` (encoders.<name>.<kind>.x)
        if isinstance(node, dict) and el not in node and el in (node.get("kind", DEFAULT_FINETUNE_KIND),
                                                                node.get("head")):
            continue
        shown.append(el)
        node = node.get(el) if isinstance(node, dict) else (
            node[el] if isinstance(node, list) and isinstance(el, int) and el < len(node) else None)
    kind, ctx, value = e["type"], e.get("ctx") or {}, e.get("input")

    def join(parts) -> str:
        out = prefix
        for p in parts:
            out = f"{out}[{p}]" if isinstance(p, int) else (f"{out}.{p}" if out else str(p))
        return out

    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        parent, key = join(shown[:-1]), shown[-1]
        known = _known_keys(schema, loc[:-1])
        what = "top-level section" if not parent else "option" if parent.endswith(".options") else "key"
        hint = difflib.get_close_matches(str(key), known, n=1)
        return (f"{parent or key}: unknown {what}{'' if not parent else f' {key!r}'} (known: {', '.join(known)})"
                + (f"; did you mean {hint[0]!r}?" if hint else ""))
    path = join(shown)
    if shown and shown[-1] == "[key]" and kind == "literal_error":   # a key from a fixed vocabulary (a modality)
        return f"{join(shown[:-2] + [value])}: unknown key {value!r} (one of {ctx.get('expected')})"
    if shown and shown[-1] == "[key]":
        return f"{join(shown[:-1])}: {value!r} is not a valid name (letters, digits, _ . -; not starting with _ . -)"
    if kind == "missing":
        return f"{path}: missing (required)"
    if kind == "string_pattern_mismatch" and _walk(schema, loc).get("description"):
        return f"{path}: {value!r} is not valid ({_walk(schema, loc)['description']})"
    if kind == "literal_error":
        return f"{path}: {value!r} is not one of {ctx.get('expected')}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        key = str(ctx.get("discriminator", "")).strip("'").removesuffix("()").replace("_finetune_kind", "kind")
        expected = ", ".join(sorted(t.strip().strip("'") for t in str(ctx.get("expected_tags", "")).split(",")))
        if kind == "union_tag_not_found":
            if not expected:
                expected = ", ".join(_tags(schema, loc))
            return f"{path}.{key}: missing (one of: {expected})"
        return f"{path}.{key}: unknown {key} {ctx.get('tag')!r} (known: {expected})"
    msg = e["msg"]
    if kind == "value_error":
        return f"{path}: {msg.removeprefix('Value error, ')}"
    msg = msg[:1].lower() + msg[1:]
    shown_value = repr(value)
    if len(shown_value) > 60:
        shown_value = shown_value[:57] + "..."
    return f"{path}: {msg} (got {shown_value})"


def _resolve(schema: dict, node: dict) -> dict:
    while isinstance(node, dict) and "$ref" in node:
        node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def _walk(schema: dict, loc: list) -> dict:
    node = _resolve(schema, schema)
    for el in loc:
        node = _resolve(schema, node)
        if "anyOf" in node:   # Optional[...]: the non-null branch
            node = _resolve(schema, next((b for b in node["anyOf"] if b.get("type") != "null"), {}))
        if "discriminator" in node and el in node["discriminator"].get("mapping", {}):
            node = _resolve(schema, {"$ref": node["discriminator"]["mapping"][el]})
        elif "oneOf" in node and el in _variants(schema, node):
            node = _variants(schema, node)[el]
        elif el in node.get("properties", {}):
            node = node["properties"][el]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        elif node.get("patternProperties"):
            node = next(iter(node["patternProperties"].values()))
        elif isinstance(node.get("items"), dict):
            node = node["items"]
        else:
            return {}
    node = _resolve(schema, node)
    if "anyOf" in node:
        node = _resolve(schema, next((b for b in node["anyOf"] if b.get("type") != "null"), {}))
    return node


def _variants(schema: dict, node: dict) -> dict[str, dict]:
    """tag -> variant of a `oneOf` whose variants have a constant `kind` (a union with a callable discriminator)."""
    out = {}
    for v in node.get("oneOf", []):
        v = _resolve(schema, v)
        const = v.get("properties", {}).get("kind", {}).get("const")
        if const is not None:
            out[const] = v
    return out


def _known_keys(schema: dict, loc: list) -> list[str]:
    return sorted(_walk(schema, loc).get("properties", {}))


def _tags(schema: dict, loc: list) -> list[str]:
    return sorted(_walk(schema, loc).get("discriminator", {}).get("mapping", {}))
