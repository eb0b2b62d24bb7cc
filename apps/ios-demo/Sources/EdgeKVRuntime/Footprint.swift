#if canImport(Darwin)
import Darwin

/// The app's memory footprint as iOS counts it against its limit (`phys_footprint`, what Xcode's
/// memory gauge shows), or nil if the kernel does not answer.
public func memoryFootprintBytes() -> UInt64? {
    var info = task_vm_info_data_t()
    var count = mach_msg_type_number_t(MemoryLayout<task_vm_info_data_t>.size / MemoryLayout<integer_t>.size)
    let result = withUnsafeMutablePointer(to: &info) { pointer in
        pointer.withMemoryRebound(to: integer_t.self, capacity: Int(count)) { raw in
            task_info(mach_task_self_, task_flavor_t(TASK_VM_INFO), raw, &count)
        }
    }
    return result == KERN_SUCCESS ? info.phys_footprint : nil
}
#else
public func memoryFootprintBytes() -> UInt64? { nil }
#endif
