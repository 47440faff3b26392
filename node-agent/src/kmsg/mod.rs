//! Stage 1 of the pipeline: the kernel log as a stream of trusted, sequenced records.

pub mod cursor;
pub mod inflight;
pub mod reader;
pub mod record;
pub mod sequence;

pub use cursor::{Cursor, CursorFile};
pub use reader::{KmsgReader, ReadOutcome};
pub use record::{KmsgRecord, Level, parse_record};
pub use sequence::{SeqTracker, SeqVerdict};
