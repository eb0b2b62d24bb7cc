import XCTest
@testable import EdgeKVCore

final class ManifestTests: XCTestCase {
    /// Fixtures/edgekv.json is a real `edgekv export --target coreml` manifest (tiny Llama); the
    /// Python tests check it still validates against exporter/edgekv.schema.json.
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
        XCTAssertThrowsError(try Manifest.decode(Data("{\"format_version\": 3}".utf8))) {
            guard case .corrupt = $0 as? ManifestError else { return XCTFail("\($0)") }
        }
    }
}
