//! Carrying out a reboot the operator ordered for this node (and only this node, in this
//! boot): the kernel's sysrq path, because a normal shutdown hangs on the stuck device.

use std::io::{self, Write};
use std::path::Path;
use std::time::Duration;

pub use crds::node::{REBOOT_ORDER_ANNOTATION, RebootOrder};

/// What the agent does with an order it read on its Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Reboot now.
    Reboot,
    /// The order is for an earlier boot: it has been carried out.
    Done,
    /// The hang cleared since the order: the agent does not reboot a healthy node.
    HangCleared,
    /// This agent may not reboot (`--allow-reboot` not given).
    NotAllowed,
    /// The annotation is not an order.
    Invalid(String),
}

/// Decides on the order text `annotation` for this boot (pure).
pub fn decide(annotation: &str, own_boot_id: &str, hung: bool, allowed: bool) -> Verdict {
    let order: RebootOrder = match serde_json::from_str(annotation) {
        Ok(order) => order,
        Err(err) => return Verdict::Invalid(err.to_string()),
    };
    if order.boot_id != own_boot_id {
        Verdict::Done
    } else if !hung {
        Verdict::HangCleared
    } else if !allowed {
        Verdict::NotAllowed
    } else {
        Verdict::Reboot
    }
}

/// Reboots through `trigger` (`/proc/sysrq-trigger`): emergency sync (`s`), remount every
/// filesystem read-only (`u`), then reset (`b`), waiting `settle` after each of the first two
/// (the kernel runs them as queued work). Returns only if a write fails.
pub fn reboot_through_sysrq(trigger: &Path, settle: Duration) -> io::Result<()> {
    for key in [b"s", b"u"] {
        write_key(trigger, key)?;
        std::thread::sleep(settle);
    }
    write_key(trigger, b"b")?;
    // The reset is immediate; if this line runs, it did not happen.
    Err(io::Error::other(
        "sysrq b was written but the machine did not reset",
    ))
}

fn write_key(trigger: &Path, key: &[u8]) -> io::Result<()> {
    let mut file = std::fs::OpenOptions::new().write(true).open(trigger)?;
    file.write_all(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORDER: &str = r#"{"policy":"p","bootId":"b1","at":"2026-11-30T20:00:00Z"}"#;

    #[test]
    fn only_an_order_for_this_boot_of_a_still_hung_node_reboots() {
        assert_eq!(decide(ORDER, "b1", true, true), Verdict::Reboot);
        assert_eq!(decide(ORDER, "b2", true, true), Verdict::Done);
        assert_eq!(decide(ORDER, "b1", false, true), Verdict::HangCleared);
        assert_eq!(decide(ORDER, "b1", true, false), Verdict::NotAllowed);
        assert!(matches!(
            decide("reboot please", "b1", true, true),
            Verdict::Invalid(_)
        ));
    }
}
