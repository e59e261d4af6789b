"""Reading and writing manifest text at the speed of the C parsers.

Users feed netfence `kubectl get -o yaml|json` dumps of whole clusters (megabytes). PyYAML's
pure-Python loader takes ~12 s on a 10,000-pod dump; its libyaml binding (CSafeLoader) a
fraction of that, and `json` less again. JSON input is read as JSON; everything else as YAML
with libyaml when PyYAML was built with it (the pure-Python classes are the fallback, same
results, slower).
"""

from __future__ import annotations

import json
from typing import Any, Iterable

import yaml

SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
SafeDumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class ManifestSyntaxError(ValueError):
    """Text that is neither JSON nor YAML; the message says where."""


def load_documents(text: str) -> list[Any]:
    """The documents of a manifest: a JSON value (or several, one after another, as
    `kubectl get -o json` of separate calls concatenates them), or multi-document YAML."""
    stripped = text.lstrip()
    if stripped[:1] in ("{", "["):
        try:
            return _json_values(stripped)
        except ValueError:
            pass  # YAML flow style also starts so; YAML decides and reports
    try:
        return list(yaml.load_all(text, Loader=SafeLoader))
    except yaml.YAMLError as e:
        raise ManifestSyntaxError(f"not valid YAML or JSON: {e}") from None


def _json_values(text: str) -> list[Any]:
    decoder = json.JSONDecoder()
    values, end = [], 0
    while end < len(text):
        value, end = decoder.raw_decode(text, end)
        values.append(value)
        while end < len(text) and text[end].isspace():
            end += 1
    return values


def dump_yaml_all(documents: Iterable[Any]) -> str:
    return yaml.dump_all(documents, Dumper=SafeDumper, sort_keys=False)
