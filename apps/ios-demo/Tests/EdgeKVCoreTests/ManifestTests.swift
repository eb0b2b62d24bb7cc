import XCTest
@testable import EdgeKVCore

final class ManifestTests: XCTestCase {
    /// Fixtures/edgekv.json is a real `edgekv export --target coreml` manifest (tiny Llama); the
    /// Python tests check it still validates against runtimes/edgekv.schema.json.
    func fixture() throws -> Data {
        let url = try XCTUnwrap(Bundle.module.url(forResource: "edgekv", withExtension: "json", subdirectory: "Fixtures"))
        return try Data(contentsOf: url)
    }

    func testDecodesAnExportedManifest() throws {
        let m = try Manifest.decode(fixture())
        try m.checkRunnableOnCoreML()
        XCTAssertEqual(m.formatVersion, Manifest.supportedFormatVersion)
        XCTAssertEqual(m.geometry, CacheGeometry(sink: m.sink, window: m.window))
        XCTAssertEqual(try m.tensor(.cache, in: m.state).dtype, "float16")
        XCTAssertEqual(try m.tensor(.tokens, in: m.inputs).shape.first, .fixed(1))
        XCTAssertEqual(try m.tensor(.tokens, in: m.inputs).shape.last, .symbolic("T"))
        XCTAssertNotEqual(m.entries.decode, m.entries.prefill)
    }

    func testHybridModelsLocalRingSizesTheCache() throws {
        var json = try XCTUnwrap(JSONSerialization.jsonObject(with: fixture()) as? [String: Any])
        let plain = try Manifest.decode(fixture())
        XCTAssertNil(plain.local)
        XCTAssertEqual(plain.cacheSlots, plain.sink + plain.window)
        json["local"] = ["window": plain.sink + plain.window + 5, "layers": [0]]  // wider than S + W: it sizes the cache
        let hybrid = try Manifest.decode(JSONSerialization.data(withJSONObject: json))
        XCTAssertEqual(hybrid.local, Manifest.Local(window: plain.sink + plain.window + 5, layers: [0]))
        XCTAssertEqual(hybrid.cacheSlots, plain.sink + plain.window + 5)
    }

    func testRefusesOtherVersionsAndTargetsWithAClearMessage() throws {
        var json = try XCTUnwrap(JSONSerialization.jsonObject(with: fixture()) as? [String: Any])
        json["format_version"] = 1
        XCTAssertThrowsError(try Manifest.decode(JSONSerialization.data(withJSONObject: json))) {
            XCTAssertEqual($0 as? ManifestError, .unsupportedVersion(1))
        }
        json["format_version"] = Manifest.supportedFormatVersion
        json["target"] = "onnx"
        let onnx = try Manifest.decode(JSONSerialization.data(withJSONObject: json))
        XCTAssertThrowsError(try onnx.checkRunnableOnCoreML()) {
            XCTAssertEqual($0 as? ManifestError, .wrongTarget("onnx"))
        }
        XCTAssertThrowsError(try Manifest.decode(Data("{\"format_version\": 4}".utf8))) {
            guard case .corrupt = $0 as? ManifestError else { return XCTFail("\($0)") }
        }
    }

    func testWhatTheAppShowsAndKeysComeFromTheManifest() throws {
        let m = try Manifest.decode(fixture())
        XCTAssertEqual(m.title, "llama · S=4 W=28")
        XCTAssertEqual(m.stopTokens, [])
        XCTAssertEqual(try Fixture.manifest(eos: 2).stopTokens, [2])
        // The compiled package is cached under its digest's first 16 hex digits.
        XCTAssertEqual(m.compiledModelKey, String(try XCTUnwrap(m.digests["model.mlpackage"]).dropFirst(7).prefix(16)))
        XCTAssertEqual(m.compiledModelKey.count, 16)
        let named = Manifest.SpecialTokens(bos: 1, eos: 2, pad: nil, unk: 0).templateNames
        XCTAssertEqual(named.map { "\($0.name)=\($0.id)" }, ["bos_token=1", "eos_token=2", "unk_token=0"])
    }
}
