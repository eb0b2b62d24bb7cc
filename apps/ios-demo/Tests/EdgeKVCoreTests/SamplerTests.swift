import XCTest
@testable import EdgeKVCore

final class SamplerTests: XCTestCase {
    func testGreedyTakesTheFirstMaximum() {
        var sampler = Sampler(settings: .greedy)
        XCTAssertEqual(sampler.next([0.5, 2, 2, -1]), 1)
        XCTAssertEqual(Sampler.argmax([-3, -2, -2.5]), 1)
    }

    func testSplitMix64KnownSequence() {
        var g = SeededGenerator(seed: 0)
        XCTAssertEqual(g.next(), 0xE220_A839_7B1D_CDAF)
        XCTAssertEqual(g.next(), 0x6E78_9E6A_A1B9_65F4)
    }

    func testTopKAndTopPKeepTheRightTokens() {
        let logits: [Float] = [log(0.1), log(0.4), log(0.3), log(0.2)]
        let all = Sampler.distribution(logits, settings: SamplingSettings(temperature: 1))
        XCTAssertEqual(all.map(\.token), [1, 2, 3, 0])
        XCTAssertEqual(all.map(\.p)[0], 0.4, accuracy: 1e-6)
        let topK = Sampler.distribution(logits, settings: SamplingSettings(temperature: 1, topK: 2))
        XCTAssertEqual(topK.map(\.token), [1, 2])
        XCTAssertEqual(topK.map(\.p)[0], 0.4 / 0.7, accuracy: 1e-6)
        // 0.4 + 0.3 reaches 0.65 but not 0.75: two tokens, then three (renormalised).
        let nucleus = Sampler.distribution(logits, settings: SamplingSettings(temperature: 1, topP: 0.65))
        XCTAssertEqual(nucleus.map(\.token), [1, 2])
        XCTAssertEqual(nucleus[1].p, 0.3 / 0.7, accuracy: 1e-6)
        XCTAssertEqual(Sampler.distribution(logits, settings: SamplingSettings(temperature: 1, topP: 0.75)).count, 3)
    }

    func testSeededSamplingIsReproducible() {
        let logits: [Float] = (0..<50).map { Float($0 % 7) * 0.3 }
        let settings = SamplingSettings(temperature: 0.8, topK: 20, topP: 0.9, seed: 42)
        var a = Sampler(settings: settings)
        var b = Sampler(settings: settings)
        let first = (0..<100).map { _ in a.next(logits) }
        XCTAssertEqual(first, (0..<100).map { _ in b.next(logits) })
        XCTAssertGreaterThan(Set(first).count, 1)
        let allowed = Set(Sampler.distribution(logits, settings: settings).map(\.token))
        XCTAssertTrue(Set(first).isSubset(of: allowed))
    }
}
