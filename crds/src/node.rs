//! What the agent and the operator say to each other on a Node, outside any CRD: the
//! agent's boot id, and the operator's reboot order for one boot of the node.

use serde::{Deserialize, Serialize};

/// The Node annotation where the agent states the node's boot id.
pub const BOOT_ID_ANNOTATION: &str = "crashwatch.dev/boot-id";

/// The Node annotation where the operator orders a reboot (a [`RebootOrder`] as JSON).
pub const REBOOT_ORDER_ANNOTATION: &str = "crashwatch.dev/reboot-order";

/// The agent's Node condition that says a watched process is stuck.
pub const PROCESS_HUNG_CONDITION: &str = "ProcessHung";

/// The operator's order to reboot a node, for one boot of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RebootOrder {
    /// The policy that orders it.
    pub policy: String,
    /// The boot the order is for: once the node booted again, the order is done.
    pub boot_id: String,
    /// When it was ordered (RFC 3339).
    pub at: String,
}
