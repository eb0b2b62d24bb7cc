import XCTest
@testable import EdgeKVCore

final class CacheGeometryTests: XCTestCase {
    func testSlotsFollowTheContractAcrossWraps() {
        let g = CacheGeometry(sink: 4, window: 5)
        XCTAssertEqual(g.capacity, 9)
        // Positions 0...21: sinks, then the ring of 5 wraps three times.
        XCTAssertEqual((0...21).map(g.slot(of:)),
                       [0, 1, 2, 3, 4, 5, 6, 7, 8, 4, 5, 6, 7, 8, 4, 5, 6, 7, 8, 4, 5, 6])
        XCTAssertEqual([0, 9, 10, 14, 15, 20].map(g.wraps(after:)), [0, 0, 1, 1, 2, 3])
        XCTAssertEqual([0, 3, 9, 50].map(g.filledSlots(after:)), [0, 3, 9, 9])
    }

    func testNoSinkIsAPlainRing() {
        let g = CacheGeometry(sink: 0, window: 3)
        XCTAssertEqual((0...7).map(g.slot(of:)), [0, 1, 2, 0, 1, 2, 0, 1])
    }

    func testVisiblePositionsAreSinksAndTheLastWindow() {
        let g = CacheGeometry(sink: 2, window: 3)
        XCTAssertEqual(g.visiblePositions(from: 0), [0])
        XCTAssertEqual(g.visiblePositions(from: 4), [0, 1, 2, 3, 4])
        XCTAssertEqual(g.visiblePositions(from: 10), [0, 1, 8, 9, 10])
    }

    func testFeedPlanUsesFullChunksThenSingleTokens() {
        XCTAssertEqual(FeedPlan.callLengths(tokens: 130, chunk: 64), [64, 64, 1, 1])
        XCTAssertEqual(FeedPlan.callLengths(tokens: 3, chunk: 64), [1, 1, 1])
        XCTAssertEqual(FeedPlan.callLengths(tokens: 3, chunk: 1), [1, 1, 1])
        XCTAssertEqual(FeedPlan.callLengths(tokens: 0, chunk: 8), [])
    }

    func testVisibleSlotsAndWhatEachSlotHolds() {
        let g = CacheGeometry(sink: 1, window: 5)
        XCTAssertEqual(g.visibleSlots(from: 2), [0, 1, 2])
        XCTAssertEqual(g.heldPositions(through: 2), [0, 1, 2, -1, -1, -1])
        // Position 8 overwrote slot 3 (position 3); slots 4 and 5 still hold 4 and 5.
        XCTAssertEqual(g.visibleSlots(from: 8), [0, 1, 2, 3, 4, 5])
        XCTAssertEqual(g.heldPositions(through: 8), [0, 6, 7, 8, 4, 5])
        XCTAssertEqual(CacheGeometry(sink: 0, window: 6).heldPositions(through: 13), [12, 13, 8, 9, 10, 11])
        XCTAssertEqual(CacheGeometry(sink: 2, window: 3).heldPositions(through: 0), [0, -1, -1, -1, -1])
    }
}

