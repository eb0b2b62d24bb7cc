// swift-tools-version:6.0
// The model-independent logic (EdgeKVCore) builds and tests anywhere `swift test` runs, Linux
// included; EdgeKVRuntime binds it to Core ML, swift-transformers' Tokenizers and swift-jinja.
import PackageDescription

let package = Package(
    name: "EdgeKVDemo",
    platforms: [.iOS(.v18), .macOS(.v15)],
    products: [
        .library(name: "EdgeKVCore", targets: ["EdgeKVCore"]),
        .library(name: "EdgeKVRuntime", targets: ["EdgeKVRuntime"]),
    ],
    dependencies: [
        .package(url: "https://github.com/huggingface/swift-transformers", from: "1.0.0"),
        .package(url: "https://github.com/huggingface/swift-jinja", from: "2.0.0"),
    ],
    targets: [
        .target(name: "EdgeKVCore"),
        .target(
            name: "EdgeKVRuntime",
            dependencies: [
                "EdgeKVCore",
                .product(name: "Tokenizers", package: "swift-transformers"),
                .product(name: "Hub", package: "swift-transformers"),
                .product(name: "Jinja", package: "swift-jinja"),
            ]
        ),
        .testTarget(
            name: "EdgeKVCoreTests",
            dependencies: ["EdgeKVCore"],
            resources: [.copy("Fixtures")]
        ),
    ],
    swiftLanguageModes: [.v5]
)
