"""The iOS demo app, checked with Python where the Swift compiler cannot reach. `swift build` and
`swift test` in apps/ios-demo (.ci/run) compile the package's manifest, EdgeKVCore and its tests on
Linux; EdgeKVRuntime and the app need Apple's frameworks and outside packages, so for those files
tree-sitter's Swift grammar must at least parse them. Beyond that: the Swift manifest type agrees with
the one JSON Schema the exporter's manifests validate against, no Core ML input, output, state or
function name is hard-coded in Swift, and the package declares its Apple-only parts only on Apple
systems, so it resolves offline on Linux."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
from tree_sitter import Language, Parser

from runtimes.manifest import FORMAT_VERSION, SCHEMA

APP = Path(__file__).resolve().parents[1] / "apps" / "ios-demo"
FIXTURE = APP / "Tests" / "EdgeKVCoreTests" / "Fixtures" / "edgekv.json"
SWIFT_FILES = sorted(f for f in APP.rglob("*.swift") if ".build" not in f.relative_to(APP).parts)
# Swift sources that talk to Core ML (the tests may name anything).
APP_SOURCES = [f for f in SWIFT_FILES if "Tests" not in f.relative_to(APP).parts]
# What `swift build` and `swift test` compile on Linux; the rest only Xcode compiles.
SWIFTPM_ON_LINUX = [
    f
    for f in SWIFT_FILES
    if f.name == "Package.swift"
    or f.relative_to(APP).parts[:2] == ("Sources", "EdgeKVCore")
    or f.relative_to(APP).parts[0] == "Tests"
]
XCODE_ONLY = [f for f in SWIFT_FILES if f not in SWIFTPM_ON_LINUX]


@pytest.fixture(scope="module")
def parser() -> Parser:
    import tree_sitter_swift

    return Parser(Language(tree_sitter_swift.language()))


def syntax_errors(parser: Parser, source: bytes) -> list[str]:
    errors = []

    def walk(node):
        if node.is_error or node.is_missing:
            errors.append(f"line {node.start_point[0] + 1}: {source[node.start_byte : node.end_byte][:60]!r}")
        for child in node.children:
            walk(child)

    walk(parser.parse(source).root_node)
    return errors


def test_every_file_only_xcode_compiles_parses(parser):
    assert [f.relative_to(APP).as_posix() for f in XCODE_ONLY] == [
        "App/ChatView.swift",
        "App/EdgeKVDemoApp.swift",
        "Sources/EdgeKVRuntime/ChatSession+CoreML.swift",
        "Sources/EdgeKVRuntime/CoreMLModel.swift",
        "Sources/EdgeKVRuntime/Footprint.swift",
        "Sources/EdgeKVRuntime/HFTokenizer.swift",
        "Sources/EdgeKVRuntime/JinjaChatTemplate.swift",
    ]
    assert len(SWIFTPM_ON_LINUX) == 24
    for f in XCODE_ONLY:
        assert syntax_errors(parser, f.read_bytes()) == [], f
    # The check can fail: a missing brace and a doubled keyword are both reported.
    assert syntax_errors(parser, b"struct A { let x: Int\n")
    assert syntax_errors(parser, b"if ready { start() } else else { stop() }\n")


def apple_only_part(package: str) -> tuple[str, str]:
    """Package.swift split into its `#if canImport(Darwin)` block and the rest, comments dropped."""
    code = "\n".join(line for line in package.splitlines() if not line.strip().startswith("//"))
    apple = re.search(r"#if canImport\(Darwin\)\n(.*?)\n#endif", code, re.S)
    assert apple, "Package.swift has no #if canImport(Darwin) block"
    return apple.group(1), code.replace(apple.group(0), "")


def test_the_package_needs_no_outside_package_off_apple_systems():
    """SwiftPM compiles the manifest for the host: on Linux it must declare no package to fetch and no
    target that needs one, so `swift build` works offline; Xcode (on macOS) sees everything."""
    apple, rest = apple_only_part((APP / "Package.swift").read_text())
    for name in ("swift-transformers", "swift-jinja", '"EdgeKVRuntime"', '"Tokenizers"', '"Jinja"', ".package("):
        assert name in apple and name not in rest, name
    assert '.target(name: "EdgeKVCore")' in rest and "swiftLanguageModes: [.v6]" in rest
    # The check can fail: a dependency declared for every platform is found.
    moved = (
        (APP / "Package.swift")
        .read_text()
        .replace(
            "var dependencies: [Package.Dependency] = []",
            'var dependencies: [Package.Dependency] = [.package(url: "https://github.com/huggingface/swift-jinja", '
            'from: "2.0.0")]',
        )
    )
    assert ".package(" in apple_only_part(moved)[1]


# --- the Swift Manifest type against the schema ---------------------------------------------------

SWIFT_TYPES = {  # Swift Codable type -> the schema object it decodes
    "Manifest": "#",
    "Source": "#/properties/source",
    "Architecture": "#/properties/architecture",
    "SpecialTokens": "#/properties/special_tokens",
    "Entries": "#/properties/entries",
    "Files": "#/properties/files",
    "Quantization": "#/properties/quantization",
    "TensorSpec": "#/$defs/tensor",
    "Prefix": "#/properties/prefix",
}
READS_EVERY_KEY = {
    "Manifest",
    "Source",
    "Architecture",
    "SpecialTokens",
    "Entries",
    "TensorSpec",
    "Quantization",
    "Prefix",
}


def text(node, source: bytes) -> str:
    return source[node.start_byte : node.end_byte].decode()


def swift_types(parser: Parser, source: bytes) -> dict[str, dict]:
    """Every struct and enum by name: stored properties {name: (type, optional)}, enum cases
    (their raw values), and static constants {name: source text}."""
    found = {}

    def walk(node):
        if node.type == "class_declaration":
            name = text(next(c for c in node.children if c.type == "type_identifier"), source)
            body = next((c for c in node.children if c.type in ("class_body", "enum_class_body")), None)
            info = {"props": {}, "cases": [], "static": {}}
            for member in body.children if body else []:
                if member.type == "property_declaration":
                    modifiers = text(member.children[0], source) if member.children[0].type == "modifiers" else ""
                    ident = text(next(c for c in member.children if c.type == "pattern"), source)
                    if "static" in modifiers:
                        info["static"][ident] = text(member.children[-1], source)
                    elif not any(c.type == "computed_property" for c in member.children):
                        annotation = next(c for c in member.children if c.type == "type_annotation")
                        swift_type = text(annotation, source).lstrip(":").strip()
                        info["props"][ident] = (swift_type.rstrip("?"), swift_type.endswith("?"))
                elif member.type == "enum_entry":
                    case = next(c for c in member.children if c.type == "simple_identifier")
                    raw = [c for c in member.children if c.type == "line_string_literal"]  # case a = "raw"
                    info["cases"].append(text(raw[0], source).strip('"') if raw else text(case, source))
            found[name] = info
        for child in node.children:
            walk(child)

    walk(parser.parse(source).root_node)
    return found


def coding_keys(parser: Parser, source: bytes) -> dict[str, dict[str, str]]:
    """Per type, property -> JSON key from its nested `enum CodingKeys` (raw value, else the case name)."""
    result = {}

    def walk(node, owner):
        if node.type == "class_declaration":
            name = text(next(c for c in node.children if c.type == "type_identifier"), source)
            if name == "CodingKeys" and owner:
                body = next(c for c in node.children if c.type == "enum_class_body")
                keys = {}
                for entry in (c for c in body.children if c.type == "enum_entry"):
                    case = text(next(c for c in entry.children if c.type == "simple_identifier"), source)
                    raw = next((c for c in entry.children if c.type == "line_string_literal"), None)
                    keys[case] = text(raw, source).strip('"') if raw else case
                result[owner] = keys
            owner = name
        for child in node.children:
            walk(child, owner)

    walk(parser.parse(source).root_node, None)
    return result


def resolve(schema: dict, pointer: str) -> dict:
    node = schema
    for part in pointer.lstrip("#/").split("/") if pointer != "#" else []:
        node = node[part]
    return node


def json_types(node: dict, schema: dict) -> set[str]:
    if "$ref" in node:
        node = resolve(schema, node["$ref"])
    kinds = node.get("type", "object")
    return set(kinds) if isinstance(kinds, list) else {kinds}


def expected_json_type(swift_type: str) -> str:
    if swift_type.startswith("[") and ":" in swift_type:
        return "object"
    if swift_type.startswith("["):
        return "array"
    return {"Int": "integer", "String": "string", "Bool": "boolean", "Double": "number", "TensorRole": "string"}.get(
        swift_type, "object"
    )


def test_swift_manifest_type_matches_the_schema(parser):
    source = (APP / "Sources" / "EdgeKVCore" / "Manifest.swift").read_bytes()
    types = swift_types(parser, source)
    keys = coding_keys(parser, source)
    schema = json.loads(SCHEMA.read_text())
    checked = 0
    for swift_name, pointer in SWIFT_TYPES.items():
        node = resolve(schema, pointer)
        props, required = node["properties"], set(node.get("required", []))
        mapping = keys.get(swift_name, {p: p for p in types[swift_name]["props"]})
        assert set(mapping) == set(types[swift_name]["props"]), f"{swift_name}: CodingKeys and properties differ"
        for prop, (swift_type, optional) in types[swift_name]["props"].items():
            key = mapping[prop]
            assert key in props, f"Swift {swift_name}.{prop} reads {key!r}, which the schema does not define"
            kinds = json_types(props[key], schema)
            assert expected_json_type(swift_type) in kinds, f"{swift_name}.{prop}: {swift_type} vs {kinds}"
            if not optional:  # decoding must not fail on a manifest the schema accepts
                assert key in required and "null" not in kinds, f"{swift_name}.{prop} must be optional"
            checked += 1
        if swift_name in READS_EVERY_KEY:
            unread = set(props) - set(mapping.values())
            assert not unread, f"Swift {swift_name} does not read {unread}"
    assert checked >= 35
    roles = types["TensorRole"]["cases"]
    assert roles == schema["$defs"]["tensor"]["properties"]["role"]["enum"]
    assert types["Manifest"]["static"]["supportedFormatVersion"] == str(FORMAT_VERSION)
    assert schema["properties"]["format_version"]["const"] == FORMAT_VERSION


def test_schema_check_catches_drift(parser):
    """The comparison above fails when Swift reads a key the exporter does not write."""
    source = (APP / "Sources" / "EdgeKVCore" / "Manifest.swift").read_bytes()
    drifted = source.replace(b'case vocabSize = "vocab_size"', b'case vocabSize = "vocabulary_size"')
    assert drifted != source
    keys = coding_keys(parser, drifted)
    schema = json.loads(SCHEMA.read_text())
    assert keys["Manifest"]["vocabSize"] not in schema["properties"]


def test_swift_fixture_is_a_valid_manifest():
    manifest = json.loads(FIXTURE.read_text())
    jsonschema.validate(manifest, json.loads(SCHEMA.read_text()))
    assert manifest["target"] == "coreml" and manifest["format_version"] == FORMAT_VERSION
    broken = {**manifest, "inputs": [{k: v for k, v in t.items() if k != "role"} for t in manifest["inputs"]]}
    with pytest.raises(jsonschema.ValidationError, match="role"):
        jsonschema.validate(broken, json.loads(SCHEMA.read_text()))


# --- names passed to Core ML come from the manifest -----------------------------------------------


def string_literals(parser: Parser, source: bytes) -> list[str]:
    found = []

    def walk(node):
        if node.type in ("line_string_literal", "multi_line_string_literal"):
            found.append(
                "".join(text(c, source) for c in node.children if c.type in ("line_str_text", "multi_line_str_text"))
            )
            return
        for child in node.children:
            walk(child)

    walk(parser.parse(source).root_node)
    return found


def core_ml_names(manifest: dict) -> set[str]:
    tensors = manifest["inputs"] + manifest["outputs"] + manifest["state"]
    return {t["name"] for t in tensors} | set(manifest["entries"].values())


def hard_coded(parser: Parser, source: bytes, names: set[str]) -> list[str]:
    """String literals that are exactly a Core ML name (messages that mention a name are fine)."""
    return [lit for lit in string_literals(parser, source) if lit.strip() in names]


def test_no_core_ml_name_is_hard_coded_in_swift(parser):
    names = core_ml_names(json.loads(FIXTURE.read_text()))
    assert names >= {"tokens", "input_pos", "logits", "kv_cache", "decode", "prefill"}
    assert APP_SOURCES
    for f in APP_SOURCES:
        assert hard_coded(parser, f.read_bytes(), names) == [], f"{f} hard-codes a Core ML name"
    # The check can fail: a name written into Swift is found.
    bad = b'let inputs = ["input_pos": MLFeatureValue(int64: 0)]\nlet f = configuration.functionName = "prefill"\n'
    assert hard_coded(parser, bad, names) == ["input_pos", "prefill"]
    # ... and the Core ML binding does take them from the manifest.
    binding = (APP / "Sources" / "EdgeKVRuntime" / "CoreMLModel.swift").read_text()
    for use in (
        "manifest.entries.decode",
        "manifest.entries.prefill",
        "tensor(.tokens",
        "tensor(.position",
        "tensor(.logits",
    ):
        assert use in binding


def test_xcodegen_project_points_at_what_exists():
    import yaml

    project = yaml.safe_load((APP / "project.yml").read_text())
    assert project["options"]["deploymentTarget"] == {"iOS": "18.0", "macOS": "15.0"}
    app = project["targets"]["EdgeKVDemo"]
    assert sorted(app["supportedDestinations"]) == ["iOS", "macOS"]
    assert (APP / app["sources"][0]["path"] / "EdgeKVDemoApp.swift").is_file()
    package = (APP / "Package.swift").read_text()
    for dep in app["dependencies"]:
        assert f'.library(name: "{dep["product"]}"' in package
    assert ".iOS(.v18), .macOS(.v15)" in package
