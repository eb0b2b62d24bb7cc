import SwiftUI

@main
struct EdgeKVDemoApp: App {
    var body: some Scene {
        WindowGroup {
            ChatView()
        }
    }
}
