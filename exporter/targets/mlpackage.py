"""One multifunction .mlpackage from single-function packages converted from the same weights, written without
loading a weight: each function's spec is copied under its new name, and its weight blobs are pointed into one
weight.bin that holds each distinct blob once. coremltools' `save_multifunction` does the same by loading every
package into a MIL program with all its weights in memory (12.7 GB peak for a 1B int4 model whose package is
0.8 GB); this takes the memory of the specs and one read buffer.

A package: Manifest.json, Data/com.apple.CoreML/model.mlmodel (the protobuf spec) and .../weights/weight.bin. The
blob file (MIL storage format v2): a 64-byte header (uint32 blob count, uint32 version 2), then per blob a 64-byte
metadata record (uint32 sentinel 0xDEADBEEF, uint32 MIL dtype, uint64 size in bytes, uint64 data offset), its data
at that offset, each 64-byte aligned. A const's value names the file and the offset of its metadata record."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

SENTINEL = 0xDEADBEEF
ALIGN = 64
CHUNK = 1 << 24
IOS18_SPEC = 9  # the first specification version with multifunction programs


def spec_path(package: Path) -> Path:
    manifest = json.loads((package / "Manifest.json").read_text())
    return package / "Data" / manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]["path"]


def _blob_values(message) -> list:
    """(declared type, BlobFileValue) of every blob-stored value inside a protobuf message (a function's consts, in
    nested blocks too). A blob is shared only between values of one type, as coremltools' own deduplication does (and
    as a reader caching blobs by offset expects)."""
    found = []
    for field, value in message.ListFields():
        if field.type != field.TYPE_MESSAGE:
            continue
        if field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].type != field.TYPE_MESSAGE:
                continue
            items = list(value.values())
        else:
            repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
            items = list(value) if repeated else [value]
        for item in items:
            if item.DESCRIPTOR.name == "Value" and item.WhichOneof("value") == "blobFileValue":
                found.append((item.type.SerializeToString(), item.blobFileValue))
            else:
                found.extend(_blob_values(item))
    return found


def _record(fh, offset: int) -> tuple[bytes, int, int]:
    """(the 64-byte metadata record, data size, data offset) of the blob whose record is at `offset`. Its other
    fields (dtype; the padding bits of sub-byte types) are carried over as they are."""
    fh.seek(offset)
    record = fh.read(ALIGN)
    sentinel, _, size, data = struct.unpack("<IIQQ", record[:24])
    if sentinel != SENTINEL:
        raise ValueError(f"{fh.name}: no blob at offset {offset}")
    return record, size, data


def _blocks(fh, offset: int, size: int):
    """The bytes of [offset, offset + size) in blocks of at most CHUNK."""
    fh.seek(offset)
    while size:
        block = fh.read(min(CHUNK, size))
        if not block:
            raise ValueError(f"{fh.name}: a blob is cut short; the package is damaged")
        yield block
        size -= len(block)


def _digest(fh, record: bytes, size: int, data: int) -> bytes:
    h = hashlib.sha256(record[4:8] + record[24:])  # dtype and the fields after the offset, then the data
    for block in _blocks(fh, data, size):
        h.update(block)
    return h.digest()


def merge(functions: dict[str, Path], out: Path, default: str) -> None:
    """Write `out` with one function per (name -> single-function package), `default` the default function. The new
    weight.bin holds each distinct blob once, within a function too (a tied table that two consts read)."""
    import coremltools as ct

    names = list(functions)
    first = functions[names[0]]
    # The first package's spec and manifest (not the executorch_debug_handle_mapping.json a conversion leaves beside,
    # nor its weights: written anew below).
    shutil.copytree(
        first,
        out,
        ignore=lambda folder, files: [
            f for f in files if (Path(folder) == first and f not in ("Manifest.json", "Data")) or f == "weight.bin"
        ],
    )
    target_spec = spec_path(out)
    merged = ct.proto.Model_pb2.Model()
    merged.ParseFromString(target_spec.read_bytes())
    merged.mlProgram.ClearField("functions")
    merged.description.Clear()
    merged.specificationVersion = max(merged.specificationVersion, IOS18_SPEC)
    (target_spec.parent / "weights").mkdir(exist_ok=True)
    with open(target_spec.parent / "weights" / "weight.bin", "wb") as dst:
        dst.write(struct.pack("<II", 0, 2).ljust(ALIGN, b"\0"))
        index, end = {}, ALIGN  # digest -> metadata offset in the new file
        for name in names:
            source = ct.proto.Model_pb2.Model()
            source.ParseFromString(spec_path(functions[name]).read_bytes())
            merged.specificationVersion = max(merged.specificationVersion, source.specificationVersion)
            function = merged.mlProgram.functions[name]
            function.CopyFrom(source.mlProgram.functions["main"])
            with open(spec_path(functions[name]).parent / "weights" / "weight.bin", "rb") as src:
                moved = {}  # (type, offset in src) -> offset in dst
                for kind, blob in _blob_values(function):
                    if (kind, blob.offset) not in moved:
                        record, size, data = _record(src, blob.offset)
                        digest = _digest(src, record, size, data) + kind
                        if digest not in index:  # a new blob: its record, then its data, 64-byte aligned
                            data_at = end + ALIGN
                            dst.write(record[:16] + struct.pack("<Q", data_at) + record[24:])
                            for block in _blocks(src, data, size):
                                dst.write(block)
                            pad = -(data_at + size) % ALIGN
                            dst.write(b"\0" * pad)
                            index[digest], end = end, data_at + size + pad
                        moved[kind, blob.offset] = index[digest]
                    blob.offset = moved[kind, blob.offset]
            d = source.description
            merged.description.functions.add(
                name=name,
                input=d.input,
                output=d.output,
                state=d.state,
                predictedFeatureName=d.predictedFeatureName,
                predictedProbabilitiesName=d.predictedProbabilitiesName,
            )
        dst.seek(0)
        dst.write(struct.pack("<I", len(index)))
    merged.description.defaultFunctionName = default
    target_spec.write_bytes(merged.SerializeToString())
