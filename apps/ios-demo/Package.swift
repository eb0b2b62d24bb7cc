// swift-tools-version:6.0
// EdgeKVCore holds everything that does not need Apple's frameworks or outside packages, so it builds
// and tests with any Swift toolchain, offline, Linux included. EdgeKVRuntime binds it to Core ML,
// swift-transformers' Tokenizers and swift-jinja; it and its dependencies are declared only when the
// manifest is compiled on an Apple system (the manifest runs on the host, so Xcode always sees them).
import PackageDescription

var products: [Product] = [.library(name: "EdgeKVCore", targets: ["EdgeKVCore"])]
var dependencies: [Package.Dependency] = []
var targets: [Target] = [
    .target(name: "EdgeKVCore"),
    .testTarget(
        name: "EdgeKVCoreTests",
        dependencies: ["EdgeKVCore"],
        resources: [.copy("Fixtures")]
    ),
]

#if canImport(Darwin)
products.append(.library(name: "EdgeKVRuntime", targets: ["EdgeKVRuntime"]))
dependencies += [
    .package(url: "https://github.com/huggingface/swift-transformers", from: "1.0.0"),
    .package(url: "https://github.com/huggingface/swift-jinja", from: "2.0.0"),
]
targets.append(
    .target(
        name: "EdgeKVRuntime",
        dependencies: [
            "EdgeKVCore",
            .product(name: "Tokenizers", package: "swift-transformers"),
            .product(name: "Hub", package: "swift-transformers"),
            .product(name: "Jinja", package: "swift-jinja"),
        ],
        // Not compiled by CI (Linux): Swift 5 mode keeps the first Xcode build from failing on a
        // strict-concurrency diagnostic in code that only talks to Core ML and the tokenizer.
        swiftSettings: [.swiftLanguageMode(.v5)]
    )
)
#endif

let package = Package(
    name: "EdgeKVDemo",
    platforms: [.iOS(.v18), .macOS(.v15)],
    products: products,
    dependencies: dependencies,
    targets: targets,
    swiftLanguageModes: [.v6]
)
