//! The line number program, run one sequence at a time.
//!
//! addr2line runs a unit's whole line program for its first lookup in that unit; on a unit
//! of a few thousand functions that is most of the cost of one address. The symbol index
//! ([`super::index`]) records, for each sequence, the offset its rows can be replayed from,
//! so that a lookup runs only the sequence that covers its address. The rows are the ones
//! addr2line would keep (gimli's state machine, tombstoned addresses skipped, one row per
//! address, the last one written winning), so the answers are the same.

use gimli::{LineProgramHeader, Reader, ReaderOffset};
use thiserror::Error;

/// One row of the line table, as addr2line keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    /// The first address of the row.
    pub address: u64,
    /// The file index, as the header numbers its files.
    pub file: u64,
    /// The line, 0 when the row has none.
    pub line: u32,
    /// The column, 0 for the left edge.
    pub column: u32,
}

/// A run of rows ending in `DW_LNE_end_sequence`, and where its replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sequence {
    /// Its first row's address.
    pub start: u64,
    /// The address of its end.
    pub end: u64,
    /// The offset, from the start of the program's instructions, of the state machine's
    /// last reset before its first row.
    pub replay_from: u64,
}

/// Where a long sequence can be resumed from: the registers after one of its rows, and
/// the offset of the instruction that follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// The row's address.
    pub address: u64,
    /// The offset, from the start of the program's instructions, to resume at.
    pub offset: u64,
    /// The file register.
    pub file: u64,
    /// The line register.
    pub line: u64,
    /// The column register.
    pub column: u64,
    /// The number of its sequence among those [`scan`] gives.
    pub sequence: usize,
}

/// A checkpoint is kept every this many rows of a sequence whose addresses only grow.
pub const CHECKPOINT_ROWS: usize = 128;

/// Why a line program is not run here (the caller asks addr2line instead).
#[derive(Debug, Error)]
pub enum LineError {
    /// The program could not be read.
    #[error("invalid line program: {0}")]
    Dwarf(#[from] gimli::Error),
    /// VLIW programs (more than one operation per instruction) are left to addr2line.
    #[error("line programs of more than one operation per instruction are not run here")]
    Vliw,
    /// `DW_LNE_define_file` changes the file table as the program runs; left to addr2line.
    #[error("line programs that define files are not run here")]
    DefineFile,
}

/// The registers of the state machine that rows are made of (DWARF 5, section 6.2.2).
struct Registers {
    address: u64,
    file: u64,
    line: u64,
    column: u64,
    tombstone: bool,
    end_sequence: bool,
}

impl Registers {
    fn new() -> Registers {
        Registers {
            address: 0,
            file: 1,
            line: 1,
            column: 0,
            tombstone: false,
            end_sequence: false,
        }
    }
}

/// Runs a program from an offset, giving rows as gimli's `LineRows::next_row` does.
struct Runner<'h, R: Reader> {
    header: &'h LineProgramHeader<R>,
    /// The program's instructions from their start, for offsets.
    program: R,
    input: R,
    registers: Registers,
    /// The offset after the instruction that last reset the registers.
    reset_at: u64,
}

impl<'h, R: Reader> Runner<'h, R> {
    fn new(header: &'h LineProgramHeader<R>, from: u64) -> Result<Runner<'h, R>, LineError> {
        if header.line_encoding().maximum_operations_per_instruction != 1 {
            return Err(LineError::Vliw);
        }
        let program = header.raw_program_buf();
        let mut input = program.clone();
        input.skip(R::Offset::from_u64(from)?)?;
        Ok(Runner {
            header,
            program,
            input,
            registers: Registers::new(),
            reset_at: from,
        })
    }

    fn offset(&self) -> u64 {
        self.input.offset_from(&self.program).into_u64()
    }

    /// The next row, with whether it ends its sequence; tombstoned rows are skipped.
    fn next_row(&mut self) -> Result<Option<(Row, bool)>, LineError> {
        self.reset();
        while !self.input.is_empty() {
            if self.execute()? {
                if self.registers.tombstone {
                    self.reset();
                    continue;
                }
                let r = &self.registers;
                let row = Row {
                    address: r.address,
                    file: r.file,
                    line: r.line as u32,
                    column: r.column as u32,
                };
                return Ok(Some((row, r.end_sequence)));
            }
        }
        Ok(None)
    }

    /// After a row: a new sequence starts from fresh registers.
    fn reset(&mut self) {
        if self.registers.end_sequence {
            self.registers = Registers::new();
            self.reset_at = self.offset();
        }
    }

    fn advance(&mut self, operations: u64) -> Result<(), LineError> {
        if self.registers.tombstone {
            return Ok(());
        }
        let length = u64::from(self.header.line_encoding().minimum_instruction_length);
        self.registers.address = add_sized(
            self.registers.address,
            length.wrapping_mul(operations),
            self.header.address_size(),
        )?;
        Ok(())
    }

    fn advance_line(&mut self, by: i64) {
        let line = &mut self.registers.line;
        if by < 0 {
            *line = line.saturating_sub(by.unsigned_abs());
        } else {
            *line = line.wrapping_add(by as u64);
        }
    }

    /// Reads and executes one instruction; true when it makes a row.
    fn execute(&mut self) -> Result<bool, LineError> {
        let encoding = self.header.line_encoding();
        let opcode_base = self.header.opcode_base();
        let opcode = self.input.read_u8()?;
        if opcode >= opcode_base {
            let adjusted = opcode - opcode_base;
            self.advance_line(
                i64::from(encoding.line_base) + i64::from(adjusted % encoding.line_range),
            );
            self.advance(u64::from(adjusted / encoding.line_range))?;
            return Ok(true);
        }
        match opcode {
            0 => {
                let length = self.input.read_uleb128()?;
                let mut rest = self.input.split(R::Offset::from_u64(length)?)?;
                match gimli::DwLne(rest.read_u8()?) {
                    gimli::DW_LNE_end_sequence => {
                        self.registers.end_sequence = true;
                        return Ok(true);
                    }
                    gimli::DW_LNE_set_address => {
                        let address = rest.read_address(self.header.address_size())?;
                        let registers = &mut self.registers;
                        registers.tombstone = address < registers.address
                            || address >= min_tombstone(self.header.address_size());
                        if !registers.tombstone {
                            registers.address = address;
                        }
                    }
                    gimli::DW_LNE_define_file if self.header.version() <= 4 => {
                        return Err(LineError::DefineFile);
                    }
                    _ => {}
                }
            }
            1 => return Ok(true), // DW_LNS_copy
            2 => {
                let operations = self.input.read_uleb128()?;
                self.advance(operations)?;
            }
            3 => {
                let by = self.input.read_sleb128()?;
                self.advance_line(by);
            }
            4 => self.registers.file = self.input.read_uleb128()?,
            5 => self.registers.column = self.input.read_uleb128()?,
            6 | 7 | 10 | 11 => {} // is_stmt, basic_block, prologue_end, epilogue_begin
            8 => {
                // DW_LNS_const_add_pc: the address advance of special opcode 255.
                let adjusted = 255 - opcode_base;
                self.advance(u64::from(adjusted / encoding.line_range))?;
            }
            9 => {
                let by = self.input.read_u16()?;
                if !self.registers.tombstone {
                    self.registers.address = add_sized(
                        self.registers.address,
                        u64::from(by),
                        self.header.address_size(),
                    )?;
                }
            }
            12 => {
                self.input.read_uleb128()?; // DW_LNS_set_isa
            }
            _ => {
                let mut lengths = self.header.standard_opcode_lengths().clone();
                lengths.skip(R::Offset::from_u8(opcode - 1))?;
                for _ in 0..lengths.read_u8()? {
                    self.input.read_uleb128()?;
                }
            }
        }
        Ok(false)
    }
}

/// `address + by` in an address of `size` bytes, as gimli computes it.
fn add_sized(address: u64, by: u64, size: u8) -> gimli::Result<u64> {
    let sum = address
        .checked_add(by)
        .ok_or(gimli::Error::AddressOverflow)?;
    if sum & !address_mask(size) != 0 {
        return Err(gimli::Error::AddressOverflow);
    }
    Ok(sum)
}

/// The lowest address gimli treats as a tombstone: -2 in the address size.
fn min_tombstone(size: u8) -> u64 {
    (-2i64 as u64) & address_mask(size)
}

/// The bits an address of `size` bytes has.
fn address_mask(size: u8) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * u32::from(size))) - 1
    }
}

/// Every sequence of the program, as addr2line groups its rows: a sequence starts at its
/// first row, ends at the next end of sequence, and is kept when it covers an address.
pub fn sequences<R: Reader>(header: &LineProgramHeader<R>) -> Result<Vec<Sequence>, LineError> {
    Ok(scan(header)?.0)
}

/// The sequences of the program, and checkpoints in its long sequences whose addresses
/// only grow (there, the row holding an address is the last one at or before it, found by
/// running on from the checkpoint before it).
pub fn scan<R: Reader>(
    header: &LineProgramHeader<R>,
) -> Result<(Vec<Sequence>, Vec<Checkpoint>), LineError> {
    let mut runner = Runner::new(header, 0)?;
    let mut sequences = Vec::new();
    let mut checkpoints = Vec::new();
    let mut first: Option<(u64, u64)> = None;
    let mut pending: Vec<Checkpoint> = Vec::new();
    let (mut rows, mut last, mut growing) = (0usize, 0u64, true);
    while let Some((row, end)) = runner.next_row()? {
        if end {
            if let Some((start, replay_from)) = first.take()
                && start < row.address
            {
                sequences.push(Sequence {
                    start,
                    end: row.address,
                    replay_from,
                });
                if growing {
                    checkpoints.append(&mut pending);
                }
            }
            pending.clear();
            (rows, growing) = (0, true);
            continue;
        }
        if first.is_none() {
            first = Some((row.address, runner.reset_at));
        } else if row.address < last {
            growing = false;
        }
        last = row.address;
        rows += 1;
        if rows % CHECKPOINT_ROWS == 0 {
            let r = &runner.registers;
            pending.push(Checkpoint {
                address: r.address,
                offset: runner.offset(),
                file: r.file,
                line: r.line,
                column: r.column,
                sequence: sequences.len(),
            });
        }
    }
    Ok((sequences, checkpoints))
}

/// The row holding `probe`, running on from `checkpoint` (one of its sequence's, at or
/// before `probe`) to the sequence's end or the first row past it.
pub fn row_from<R: Reader>(
    header: &LineProgramHeader<R>,
    checkpoint: &Checkpoint,
    probe: u64,
) -> Result<Option<Row>, LineError> {
    let mut runner = Runner::new(header, checkpoint.offset)?;
    runner.registers = Registers {
        address: checkpoint.address,
        file: checkpoint.file,
        line: checkpoint.line,
        column: checkpoint.column,
        tombstone: false,
        end_sequence: false,
    };
    let mut found = (checkpoint.address <= probe).then_some(Row {
        address: checkpoint.address,
        file: checkpoint.file,
        line: checkpoint.line as u32,
        column: checkpoint.column as u32,
    });
    while let Some((row, end)) = runner.next_row()? {
        if end || row.address > probe {
            break;
        }
        found = Some(row);
    }
    Ok(found)
}

/// The rows of the sequence replayed from `from`, one per address (the last written wins),
/// as addr2line keeps them.
pub fn rows<R: Reader>(header: &LineProgramHeader<R>, from: u64) -> Result<Vec<Row>, LineError> {
    let mut runner = Runner::new(header, from)?;
    let mut rows: Vec<Row> = Vec::new();
    while let Some((row, end)) = runner.next_row()? {
        if end {
            break;
        }
        match rows.last_mut() {
            Some(last) if last.address == row.address => *last = row,
            _ => rows.push(row),
        }
    }
    Ok(rows)
}

/// The row that holds `probe`, found as addr2line finds it (a binary search by address).
pub fn row_at(rows: &[Row], probe: u64) -> Option<Row> {
    match rows.binary_search_by(|row| row.address.cmp(&probe)) {
        Ok(at) => Some(rows[at]),
        Err(0) => None,
        Err(at) => Some(rows[at - 1]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object::{Object, ObjectSection};

    /// Every unit of a real binary (this test's own, built with debug information): the
    /// sequences and rows found by replaying from the recorded offsets equal the ones gimli's
    /// own state machine gives when it runs each whole program, grouped as addr2line does.
    #[test]
    fn replayed_sequences_equal_gimli_running_each_whole_program() {
        let path = std::env::current_exe().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let object = object::File::parse(&*bytes).unwrap();
        let dwarf = gimli::Dwarf::load(|id| -> Result<_, gimli::Error> {
            let data = object
                .section_by_name(id.name())
                .and_then(|s| s.data().ok())
                .unwrap_or(&[]);
            Ok(gimli::EndianSlice::new(data, gimli::LittleEndian))
        })
        .unwrap();
        let mut headers = dwarf.units();
        let (mut units, mut compared, mut resumed) = (0, 0, 0);
        while let Some(header) = headers.next().unwrap() {
            let unit = dwarf.unit(header).unwrap();
            let Some(program) = unit.line_program.clone() else {
                continue;
            };
            units += 1;
            // gimli, grouped as addr2line groups rows.
            let mut expected: Vec<(u64, u64, Vec<Row>)> = Vec::new();
            let mut current: Vec<Row> = Vec::new();
            let mut gimli_rows = program.clone().rows();
            while let Some((_, row)) = gimli_rows.next_row().unwrap() {
                if row.end_sequence() {
                    if let Some(start) = current.first().map(|r| r.address)
                        && start < row.address()
                    {
                        expected.push((start, row.address(), std::mem::take(&mut current)));
                    }
                    current.clear();
                    continue;
                }
                let r = Row {
                    address: row.address(),
                    file: row.file_index(),
                    line: row.line().map_or(0, |l| l.get() as u32),
                    column: match row.column() {
                        gimli::ColumnType::LeftEdge => 0,
                        gimli::ColumnType::Column(c) => c.get() as u32,
                    },
                };
                match current.last_mut() {
                    Some(last) if last.address == r.address => *last = r,
                    _ => current.push(r),
                }
            }
            let (ours, checkpoints) = scan(program.header()).unwrap();
            // From every checkpoint, the row of every address up to the next one (and a
            // little past it) is the one the whole sequence gives.
            for (i, checkpoint) in checkpoints.iter().enumerate() {
                let (start, _, rows_expected) = &expected[checkpoint.sequence];
                let next = checkpoints
                    .get(i + 1)
                    .filter(|c| c.sequence == checkpoint.sequence)
                    .map_or(u64::MAX, |c| c.address);
                for row in rows_expected
                    .iter()
                    .filter(|r| r.address >= checkpoint.address && r.address <= next)
                {
                    for probe in [row.address, row.address + 1] {
                        assert_eq!(
                            row_from(program.header(), checkpoint, probe).unwrap(),
                            row_at(rows_expected, probe),
                            "probe {probe:#x} from the checkpoint at {:#x} (sequence at {start:#x})",
                            checkpoint.address
                        );
                    }
                }
                resumed += 1;
            }
            assert_eq!(
                ours.len(),
                expected.len(),
                "unit at {:?}",
                unit.header.offset()
            );
            for (sequence, (start, end, rows_expected)) in ours.iter().zip(&expected) {
                assert_eq!((sequence.start, sequence.end), (*start, *end));
                assert_eq!(
                    &rows(program.header(), sequence.replay_from).unwrap(),
                    rows_expected
                );
                compared += 1;
            }
        }
        assert!(
            units > 10 && compared > 1000 && resumed > 100,
            "{units} units, {compared} sequences, {resumed} checkpoints"
        );
    }

    #[test]
    fn the_row_at_an_address_is_the_last_one_at_or_before_it() {
        let row = |address, line| Row {
            address,
            file: 1,
            line,
            column: 0,
        };
        let rows = [row(0x10, 1), row(0x14, 2), row(0x20, 3)];
        assert_eq!(row_at(&rows, 0x0f), None);
        assert_eq!(row_at(&rows, 0x10).map(|r| r.line), Some(1));
        assert_eq!(row_at(&rows, 0x13).map(|r| r.line), Some(1));
        assert_eq!(row_at(&rows, 0x14).map(|r| r.line), Some(2));
        assert_eq!(row_at(&rows, 0x40).map(|r| r.line), Some(3));
    }
}
