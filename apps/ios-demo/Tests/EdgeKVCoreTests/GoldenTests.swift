import XCTest
@testable import EdgeKVCore

/// The vectors tests/test_ios_golden.py writes from fresh exports: every manifest the exporter wrote
/// must decode here, and the cache arithmetic taken from its geometry must reproduce the Python table.
final class GoldenTests: XCTestCase {
    struct Vectors: Decodable {
        let cases: [Case]
    }

    struct Case: Decodable {
        let manifests: [String]
        let sink: Int
        let window: Int
        let chunk: Int
        let feed: [Feed]
        let positions: [Row]
    }

    struct Feed: Decodable, Equatable {
        let tokens: Int
        let calls: [Int]
    }

    struct Row: Decodable, Equatable {
        let position: Int
        let slot: Int
        let visible: [Int]
        let held: [Int]
    }

    func fixtures() throws -> URL {
        try XCTUnwrap(Bundle.module.url(forResource: "Fixtures", withExtension: nil))
    }

    func vectors() throws -> Vectors {
        let data = try Data(contentsOf: fixtures().appendingPathComponent("golden/vectors.json"))
        return try JSONDecoder().decode(Vectors.self, from: data)
    }

    /// Every manifest in Fixtures/, as paths relative to it.
    func manifestFiles() throws -> [String] {
        let root = try fixtures().standardizedFileURL.resolvingSymlinksInPath()
        let files = try XCTUnwrap(FileManager.default.enumerator(at: root, includingPropertiesForKeys: nil))
        return files.compactMap { $0 as? URL }
            .filter { $0.pathExtension == "json" && $0.lastPathComponent != "vectors.json" }
            .map { String($0.standardizedFileURL.resolvingSymlinksInPath().path.dropFirst(root.path.count + 1)) }
            .sorted()
    }

    func testTheTableCoversEveryFixtureManifest() throws {
        let listed = try vectors().cases.flatMap(\.manifests).sorted()
        XCTAssertEqual(listed, try manifestFiles())
        XCTAssertEqual(listed, [
            "edgekv.json", "golden/llama-s4-w28-c8-onnx.json", "golden/llama-s4-w28-c8-openvino.json",
            "golden/mistral-s1-w5-c8-coreml-int4.json", "golden/qwen2-s0-w6-c1-coreml.json",
        ])
    }

    func testEveryExportedManifestDecodes() throws {
        var targets: [String] = []
        for file in try vectors().cases.flatMap(\.manifests) {
            let m = try Manifest.decode(Data(contentsOf: fixtures().appendingPathComponent(file)))
            targets.append("\(m.target) \(m.quantization.scheme)")
            if m.target == "coreml" {
                XCTAssertNoThrow(try m.checkRunnableOnCoreML(), file)
            } else {
                XCTAssertThrowsError(try m.checkRunnableOnCoreML(), file) {
                    XCTAssertEqual($0 as? ManifestError, .wrongTarget(m.target))
                }
            }
        }
        XCTAssertEqual(targets, ["coreml none", "onnx none", "openvino none", "coreml none", "coreml int4"])
    }

    func testGeometryFromEachManifestReproducesThePythonTable() throws {
        var rows = 0
        for golden in try vectors().cases {
            for file in golden.manifests {
                let m = try Manifest.decode(Data(contentsOf: fixtures().appendingPathComponent(file)))
                XCTAssertEqual([m.sink, m.window, m.chunk], [golden.sink, golden.window, golden.chunk], file)
                let g = m.geometry
                let computed = golden.positions.map {
                    Row(position: $0.position, slot: g.slot(of: $0.position), visible: g.visibleSlots(from: $0.position),
                        held: g.heldPositions(through: $0.position))
                }
                XCTAssertEqual(computed.count, golden.positions.count, file)
                if let (got, want) = zip(computed, golden.positions).first(where: { $0 != $1 }) {
                    XCTFail("\(file), position \(want.position): Swift \(got), Python \(want)")
                }
                XCTAssertEqual(golden.positions.map(\.position), Array(0..<(m.sink + 3 * m.window + 2)), file)
                let plan = golden.feed.map { Feed(tokens: $0.tokens, calls: FeedPlan.callLengths(tokens: $0.tokens, chunk: m.chunk)) }
                XCTAssertEqual(plan, golden.feed, file)
                rows += computed.count
            }
        }
        XCTAssertEqual(rows, 3 * 90 + 20 + 18)
    }
}
