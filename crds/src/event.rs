//! The `CrashEvent`: one recognised crash or hang, as pure data.
//!
//! Field names are camelCase, addresses are `0x…` hex strings, and absent facts are omitted
//! rather than faked.

use std::fmt;

use std::borrow::Cow;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What kind of fault or hang the kernel reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum EventKind {
    /// A user-space page fault that killed the task (`segfault at …`, arm64 translation faults).
    Segfault,
    /// A general protection fault in user space (`traps: … general protection fault`).
    GeneralProtection,
    /// An integer divide error (`trap divide error`).
    DivideError,
    /// An invalid opcode (`trap invalid opcode`, for example `ud2` or `__builtin_trap()`).
    InvalidOpcode,
    /// A breakpoint instruction with no debugger attached (`trap int3`).
    Breakpoint,
    /// A process that aborted itself (`SIGABRT`: `abort()`, a failed `assert`); seen only
    /// by the core handler, since the kernel logs nothing for it.
    Abort,
    /// A bus error (`SIGBUS`: a truncated mapped file, a misaligned access); seen only by the
    /// core handler.
    BusError,
    /// A task stuck in uninterruptible sleep.
    HungTask,
    /// An error from the nbd block driver.
    NbdError,
    /// A process killed by the OOM killer.
    OomKill,
    /// A fault inside the kernel itself; never a user-space crash.
    KernelOops,
}

impl EventKind {
    /// The name used in JSON, metrics labels and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Segfault => "Segfault",
            EventKind::GeneralProtection => "GeneralProtection",
            EventKind::DivideError => "DivideError",
            EventKind::InvalidOpcode => "InvalidOpcode",
            EventKind::Breakpoint => "Breakpoint",
            EventKind::Abort => "Abort",
            EventKind::BusError => "BusError",
            EventKind::HungTask => "HungTask",
            EventKind::NbdError => "NbdError",
            EventKind::OomKill => "OomKill",
            EventKind::KernelOops => "KernelOops",
        }
    }

    /// Whether this kind is a user-space crash (a fatal signal from a fault or trap).
    pub fn is_user_crash(self) -> bool {
        matches!(
            self,
            EventKind::Segfault
                | EventKind::GeneralProtection
                | EventKind::DivideError
                | EventKind::InvalidOpcode
                | EventKind::Breakpoint
                | EventKind::Abort
                | EventKind::BusError
        )
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a hang was detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum DetectedBy {
    /// The kernel's hung-task detector (khungtaskd) printed a report.
    KernelReport,
    /// The agent's own `/proc` scan found the task in uninterruptible sleep.
    ProcScan,
}

/// A 64-bit address, serialized as a `0x…` lowercase hex string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Address(pub u64);

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl JsonSchema for Address {
    fn schema_name() -> Cow<'static, str> {
        "Address".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": "^0x[0-9a-f]{1,16}$",
            "maxLength": 2 + crate::bounds::ADDRESS_DIGITS,
            "description": "An address or offset in hexadecimal, such as 0x7f3a12c4d1c7."
        })
    }
}

impl Serialize for Address {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let digits = text.strip_prefix("0x").ok_or_else(|| {
            serde::de::Error::custom(format!("address {text:?} lacks the 0x prefix"))
        })?;
        u64::from_str_radix(digits, 16)
            .map(Address)
            .map_err(|e| serde::de::Error::custom(format!("address {text:?}: {e}")))
    }
}

/// One source-level frame of a symbolized address; inlined frames come first.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Frame {
    /// The file name of the module (executable or shared library) the frame's code is in;
    /// set on the frames of a whole stack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::bounds::PATH_LEN))]
    pub module: Option<String>,
    /// The (demangled) function name.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::bounds::TEXT_LEN))]
    pub function: Option<String>,
    /// The source file.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::bounds::PATH_LEN))]
    pub file: Option<String>,
    /// The source line.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = u32::MAX))]
    pub line: Option<u32>,
    /// The source column.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = u32::MAX))]
    pub column: Option<u32>,
    /// Whether this frame was inlined into the next one.
    #[serde(default)]
    pub inlined: bool,
}

/// A memory access in source terms: which member was read or written through which
/// pointer expression.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PointerAccess {
    /// The C expression of the pointer, for example `bs->drv`, when it could be traced.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::bounds::TEXT_LEN))]
    pub pointer: Option<String>,
    /// The member accessed through it, for example `bdrv_co_flush` or `stats.writes`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::bounds::TEXT_LEN))]
    pub member: Option<String>,
    /// The offset of the access from the pointer.
    pub offset: Address,
    /// Whether the access wrote (else it read).
    #[serde(default)]
    pub write: bool,
}

/// The pod a process ran in (from its cgroup), when it ran in one.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    /// The pod's namespace.
    #[schemars(length(max = crate::bounds::LABEL_LEN))]
    pub namespace: String,
    /// The pod's name.
    #[schemars(length(max = crate::bounds::NAME_LEN))]
    pub name: String,
    /// The pod's uid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::bounds::NAME_LEN))]
    pub uid: Option<String>,
}

/// The container a process ran in, when it ran in one.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContainerRef {
    /// The container's name in its pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::bounds::LABEL_LEN))]
    pub name: Option<String>,
    /// The runtime's container id, for example `containerd://…`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::bounds::CONTAINER_ID_LEN))]
    pub id: Option<String>,
    /// The container's image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::bounds::PATH_LEN))]
    pub image: Option<String>,
}

/// One recognised crash or hang, built from one or more kernel log records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CrashEvent {
    /// What happened.
    pub kind: EventKind,
    /// The task name (`task->comm`, at most 15 bytes; the thread name for threads).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::bounds::COMM_LEN))]
    pub comm: Option<String>,
    /// The id the kernel printed: for threads this is the thread id.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = crate::bounds::PID_MAX))]
    pub pid: Option<u32>,
    /// The faulting data address (CR2 on x86, FAR on arm64).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault_address: Option<Address>,
    /// The user instruction pointer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<Address>,
    /// The user stack pointer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sp: Option<Address>,
    /// The architectural error code (x86 page-fault error code, arm64 ESR).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<u64>,
    /// The decoded error code, for example `["user", "read", "not-present"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = crate::bounds::ERROR_BITS), inner(length(max = crate::bounds::WORD_LEN)))]
    pub error_bits: Vec<String>,
    /// powerpc: the next-instruction pointer the kernel printed (`nip`), also in `ip`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nip: Option<Address>,
    /// powerpc: the link register (`lr`), the return address of the faulting function.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<Address>,
    /// The signal's `si_code` the kernel printed (riscv `code 0x1`, powerpc `code 1`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub si_code: Option<u64>,
    /// arm64: the Exception Syndrome Register (also in `errorCode`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub esr: Option<u64>,
    /// s390: the program interruption code (`interruption code 0038`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interruption_code: Option<u64>,
    /// s390: the instruction length code (`ilc:3`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ilc: Option<u64>,
    /// The file name the kernel printed in brackets after ` in `.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::bounds::PATH_LEN))]
    pub module: Option<String>,
    /// The file offset of `ip` inside `module`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub module_offset: Option<Address>,
    /// The start of the mapping that contains `ip`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vma_start: Option<Address>,
    /// The length of that mapping.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vma_size: Option<Address>,
    /// The CPU the fault was taken on.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = crate::bounds::CPU_MAX))]
    pub cpu: Option<u32>,
    /// The `Code:` bytes as printed, with the faulting byte in `<…>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::bounds::TEXT_LEN))]
    pub code: Option<String>,
    /// How long a hung task had been blocked when it was reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked_seconds: Option<u64>,
    /// Where a hung task sleeps in the kernel (`/proc/PID/wchan`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::bounds::WORD_LEN))]
    pub wchan: Option<String>,
    /// The kernel stack of a hung task or an oops, innermost first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = crate::bounds::KERNEL_STACK_FRAMES), inner(length(max = crate::bounds::LINE_LEN)))]
    pub kernel_stack: Vec<String>,
    /// How a hang was detected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detected_by: Option<DetectedBy>,
    /// The block device of an nbd error, for example `nbd0`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::bounds::WORD_LEN))]
    pub device: Option<String>,
    /// The pid the OOM killer killed.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = crate::bounds::PID_MAX))]
    pub victim_pid: Option<u32>,
    /// The name of the process the OOM killer killed.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::bounds::COMM_LEN))]
    pub victim_comm: Option<String>,
    /// The path of the binary used for symbolization.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::bounds::PATH_LEN))]
    pub binary_path: Option<String>,
    /// The GNU build-id of that binary, in hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::bounds::BUILD_ID_LEN), regex(pattern = r"^[0-9a-f]*$"))]
    pub build_id: Option<String>,
    /// Whether the `Code:` bytes equal the binary's bytes at `moduleOffset`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub binary_matches: Option<bool>,
    /// Source frames, innermost first: those of `ip` (its inlined frames first), then, when
    /// the stack was unwound at crash time, those of each caller, each naming its module.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = crate::bounds::FRAMES))]
    pub frames: Vec<Frame>,
    /// The faulting instruction in Intel syntax.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::bounds::TEXT_LEN))]
    pub instruction: Option<String>,
    /// What the faulting instruction accessed, in source terms, when debug information
    /// tells.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access: Option<PointerAccess>,
    /// One or two plain sentences saying what went wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::bounds::TEXT_LEN))]
    pub explanation: Option<String>,
    /// When the first record of the event was logged (RFC 3339), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::bounds::WORD_LEN))]
    pub timestamp: Option<String>,
    /// The `/dev/kmsg` sequence number of the event's first record, when read from there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kmsg_seq: Option<u64>,
    /// The pod the process ran in; absent for a process on the host, outside any pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    /// The container the process ran in; absent for a process on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerRef>,
    /// The kernel lines the event was built from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = crate::bounds::RAW_LINES), inner(length(max = crate::bounds::LINE_LEN)))]
    pub raw: Vec<String>,
}

impl CrashEvent {
    /// A new event of `kind` with every fact absent.
    pub fn new(kind: EventKind) -> Self {
        CrashEvent {
            kind,
            comm: None,
            pid: None,
            fault_address: None,
            ip: None,
            sp: None,
            error_code: None,
            error_bits: Vec::new(),
            nip: None,
            lr: None,
            si_code: None,
            esr: None,
            interruption_code: None,
            ilc: None,
            module: None,
            module_offset: None,
            vma_start: None,
            vma_size: None,
            cpu: None,
            code: None,
            blocked_seconds: None,
            wchan: None,
            kernel_stack: Vec::new(),
            detected_by: None,
            device: None,
            victim_pid: None,
            victim_comm: None,
            binary_path: None,
            build_id: None,
            binary_matches: None,
            frames: Vec::new(),
            instruction: None,
            access: None,
            explanation: None,
            timestamp: None,
            kmsg_seq: None,
            pod: None,
            container: None,
            raw: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_as_prefixed_hex() {
        let mut event = CrashEvent::new(EventKind::Segfault);
        event.ip = Some(Address(0x561c_8817_d1c7));
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["ip"], "0x561c8817d1c7");
        assert_eq!(json["kind"], "Segfault");
        assert!(json.get("sp").is_none(), "absent facts are omitted: {json}");
        let back: CrashEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, event);
    }

    #[test]
    fn an_address_without_prefix_is_rejected() {
        let err = serde_json::from_str::<Address>("\"1234\"").unwrap_err();
        assert!(err.to_string().contains("0x prefix"), "{err}");
    }
}
