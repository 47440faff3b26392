//! The bounds the CRD schema puts on every string, list and number of a CrashReport, so that
//! the API server refuses what the operator could not read. The agent's own truncation
//! caps must stay at or below these.

/// The most hex digits of an address: a `u64`.
pub const ADDRESS_DIGITS: usize = 16;
/// The largest pid Linux can hand out (`PID_MAX_LIMIT`, 2^22).
pub const PID_MAX: u32 = 4_194_304;
/// The most CPUs a kernel can be built for (`NR_CPUS` ≤ 8192).
pub const CPU_MAX: u32 = 8_192;
/// A task name (`comm` is 15 bytes; escaped bytes may take 4 characters each).
pub const COMM_LEN: usize = 64;
/// A path (`PATH_MAX`).
pub const PATH_LEN: usize = 4_096;
/// A GNU build-id in hex (SHA-1 is 40 digits; 128 leaves room for any hash).
pub const BUILD_ID_LEN: usize = 128;
/// A short word: an error bit, a device, a wait channel, a timestamp.
pub const WORD_LEN: usize = 256;
/// One kernel log line (a record holds at most 1024 bytes; escaping may grow it).
pub const LINE_LEN: usize = 4_096;
/// A free text: an explanation, an instruction, a `Code:` line, a location.
pub const TEXT_LEN: usize = 8_192;
/// The kernel lines of one event.
pub const RAW_LINES: usize = 128;
/// The kernel stack of one hang or oops.
pub const KERNEL_STACK_FRAMES: usize = 128;
/// The source frames of one address (or of a whole stack).
pub const FRAMES: usize = 256;
/// The decoded bits of one error code.
pub const ERROR_BITS: usize = 32;
/// The time buckets a report keeps (see `report::add_to_buckets`).
pub const BUCKETS: usize = 256;
/// A Kubernetes object name (a DNS subdomain).
pub const NAME_LEN: usize = 253;
/// A namespace or container name (a DNS label).
pub const LABEL_LEN: usize = 63;
/// A container id (`containerd://` and 64 hex digits, with room).
pub const CONTAINER_ID_LEN: usize = 256;
/// The entries of one list in a RemediationPolicy's `match`.
pub const MATCH_ITEMS: usize = 256;
