"""Rebuild the schema files of this folder from CRD YAML files on disk (nothing is
downloaded): each CRD's ``openAPIV3Schema`` of one version, ``description`` strings removed,
written as compact JSON with sorted keys (gzip-compressed when named ``*.gz``).

    python extract_schemas.py CRD.yaml VERSION OUT.json[.gz] [CRD.yaml VERSION OUT ...]

See README.md for the sources of the files here.
"""

from __future__ import annotations

import gzip
import json
import sys
from typing import Any

import yaml


def strip_descriptions(schema: Any) -> Any:
    """The schema without its ``description`` annotations (a *property* named
    ``description`` is kept: under ``properties`` every key is a field name)."""
    if isinstance(schema, list):
        return [strip_descriptions(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "description":
            continue
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {name: strip_descriptions(s) for name, s in value.items()}
        else:
            out[key] = strip_descriptions(value)
    return out


def extract(crd_path: str, version: str) -> dict:
    with open(crd_path) as f:
        crd = yaml.safe_load(f)
    if crd.get("kind") != "CustomResourceDefinition":
        raise SystemExit(f"{crd_path}: not a CustomResourceDefinition")
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return {"group": crd["spec"]["group"], "kind": crd["spec"]["names"]["kind"], "version": version,
                    "scope": crd["spec"]["scope"],
                    "openAPIV3Schema": strip_descriptions(v["schema"]["openAPIV3Schema"])}
    raise SystemExit(f"{crd_path}: no version {version}")


def main(argv: list) -> None:
    if not argv or len(argv) % 3:
        raise SystemExit(__doc__)
    for crd_path, version, out in zip(argv[::3], argv[1::3], argv[2::3]):
        data = (json.dumps(extract(crd_path, version), separators=(",", ":"), sort_keys=True) + "\n").encode()
        if out.endswith(".gz"):
            data = gzip.compress(data, 9, mtime=0)
        with open(out, "wb") as f:
            f.write(data)
        print(f"{out}: {len(data)} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
