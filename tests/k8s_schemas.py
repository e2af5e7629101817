"""Validate Kubernetes custom resources against the CRDs of their operators, with ``jsonschema``.

The CRDs are vendored, unchanged, under ``infra/schemas/<operator>/<release>/*.yaml`` (the
operator's own CRD files of that release; ``infra/schemas/README.md`` names each file's source).
:func:`load_crd_schemas` reads every CustomResourceDefinition there and keeps, for each served
version, its ``openAPIV3Schema``, keyed by ``(apiVersion, kind)``. :func:`validate` checks one
resource against it the way the API server does with ``kubectl apply`` (strict field validation,
kubectl's default):

* a field the schema does not declare is an error (the API server rejects unknown fields under
  strict validation), except below ``x-kubernetes-preserve-unknown-fields: true``;
* ``nullable: true`` admits null, ``x-kubernetes-int-or-string`` an integer or a string;
* types, enums, required fields, patterns, lengths and bounds as JSON Schema (draft 4, the
  dialect OpenAPI v3.0 schemas are written in).

Not evaluated: CEL rules (``x-kubernetes-validations``), list-map key uniqueness, and the
operators' admission webhooks. ``DEEPCONTENT_CRD_SCHEMAS`` points the loader at another folder
of the same layout (to try the manifests against a newer operator release).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = Path(os.environ.get("DEEPCONTENT_CRD_SCHEMAS") or REPO / "infra" / "schemas")

try:  # libyaml: the KubeRay CRDs are megabytes of YAML
    _Loader = yaml.CSafeLoader
except AttributeError:  # pragma: no cover
    _Loader = yaml.SafeLoader


@dataclass(frozen=True)
class CrdSchema:
    """The schema of one served version of one custom resource kind."""

    api_version: str  # group/version, as a resource's apiVersion says it
    kind: str
    operator: str  # infra/schemas/<operator>/
    release: str  # infra/schemas/<operator>/<release>/
    source: Path  # the CRD file
    schema: dict  # openAPIV3Schema, as the CRD has it


def releases(root: Path = SCHEMAS) -> dict[str, list[str]]:
    """``{operator: [release, ...]}`` of the folders under ``root``."""
    if not root.is_dir():
        return {}
    return {op.name: sorted(r.name for r in op.iterdir() if r.is_dir() and any(r.glob("*.yaml")))
            for op in sorted(root.iterdir()) if op.is_dir()}


@lru_cache(maxsize=None)
def load_crd_schemas(root: Path = SCHEMAS) -> dict[tuple[str, str], CrdSchema]:
    """Every served version of every CRD under ``root/<operator>/<release>/*.yaml``, by
    ``(apiVersion, kind)``. Two releases defining the same kind and version is an error: the
    manifests are checked against one release of each operator."""
    found: dict[tuple[str, str], CrdSchema] = {}
    for operator, names in releases(root).items():
        for release in names:
            for path in sorted((root / operator / release).glob("*.yaml")):
                for doc in yaml.load_all(path.read_text(), Loader=_Loader):
                    if not doc or doc.get("kind") != "CustomResourceDefinition":
                        continue
                    spec = doc["spec"]
                    for version in spec["versions"]:
                        if not version.get("served", False):
                            continue
                        key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                        if key in found:
                            raise ValueError(f"{key[1]} {key[0]} is defined by both {found[key].source} and {path}; "
                                             f"keep one release of each operator under {root}")
                        found[key] = CrdSchema(key[0], key[1], operator, release, path,
                                               version["schema"]["openAPIV3Schema"])
    return found


def to_json_schema(node: dict) -> dict:
    """The OpenAPI v3 structural schema ``node`` as a draft-4 JSON Schema with Kubernetes'
    semantics (see the module docstring)."""
    node = copy.copy(node)
    for key in ("properties", "patternProperties"):
        if key in node:
            node[key] = {name: to_json_schema(sub) for name, sub in node[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            node[key] = to_json_schema(node[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in node:
            node[key] = [to_json_schema(sub) for sub in node[key]]
    if node.get("x-kubernetes-int-or-string"):
        node.pop("type", None)
        node.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    preserve = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-embedded-resource")
    if "properties" in node and "additionalProperties" not in node and not preserve:
        node["additionalProperties"] = False
    if node.get("nullable") and "type" in node:
        node["type"] = [node["type"], "null"]
    return node


@lru_cache(maxsize=None)
def _validator(api_version: str, kind: str, root: Path = SCHEMAS):
    import jsonschema

    crd = load_crd_schemas(root)[(api_version, kind)]
    schema = to_json_schema(crd.schema)
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def validate(resource: dict, root: Path = SCHEMAS) -> list[str]:
    """The schema errors of ``resource`` (``"<path>: <message>"`` each), empty when it is valid.
    A kind or apiVersion without a vendored CRD is itself an error."""
    key = (resource.get("apiVersion"), resource.get("kind"))
    if key not in load_crd_schemas(root):
        return [f"no vendored CRD for {key[1]} {key[0]} under {root} "
                f"(have: {sorted(f'{k} {v}' for v, k in load_crd_schemas(root))})"]
    errors = sorted(_validator(*key, root).iter_errors(resource), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in errors]
