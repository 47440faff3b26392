//! Variables, their locations and their types, from DWARF: the facts the member analysis
//! of [`crate::explain::access`] asks for.

use std::ops::Range;

use gimli::{
    AttributeValue, DebuggingInformationEntry, DwTag, EntriesTreeNode, Operation, Reader as _,
    UnitOffset, UnitRef,
};

use super::dwarf::{DebugInfo, Reader};
use crate::explain::access::{DebugFacts, Typed};

/// How many typedef/const/volatile layers, abstract origins or nested members are followed.
const MAX_INDIRECTIONS: usize = 16;

/// How many namespaces and classes nested below the unit's top level wait to be searched.
const MAX_NESTED_SCOPES: usize = 4096;

/// How deep namespaces and classes are followed. The walk over them recurses, and a stack
/// overflow aborts the agent whatever `catch_unwind` does; hostile DWARF can nest them
/// without limit (compilers stop far lower: gcc at 255 namespaces).
const MAX_SCOPE_DEPTH: usize = 256;

/// How deep subprograms, inlined subroutines and lexical blocks are followed.
const MAX_BLOCK_DEPTH: usize = 64;

/// The DWARF of the unit holding one address.
pub struct UnitFacts<'a> {
    unit: UnitRef<'a, Reader>,
    debug: &'a DebugInfo,
    /// The subprogram holding the address, when addr2line found it: variables are looked
    /// for below it rather than from the unit's top level.
    function: Option<UnitOffset>,
}

impl<'a> UnitFacts<'a> {
    /// The facts of the unit that covers `pc`, with the address range of the function
    /// part (`DW_AT_ranges` entry) that contains it.
    pub fn at(debug: &'a DebugInfo, pc: u64) -> Option<(UnitFacts<'a>, Range<u64>)> {
        let unit = debug.unit_at(pc)?;
        let mut facts = UnitFacts {
            unit,
            debug,
            function: None,
        };
        // The subprogram addr2line found for the frames: read directly, without walking
        // the unit's top level.
        if let Some(offset) = debug.function_at(pc)
            && let Ok(entry) = facts.unit.entry(offset)
            && entry.tag() == gimli::DW_TAG_subprogram
            && let Ok(Some(range)) = facts.range_containing(&entry, pc)
        {
            facts.function = Some(offset);
            return Some((facts, range));
        }
        let range = facts.function_range(pc).ok()??;
        Some((facts, range))
    }

    /// The range of the subprogram holding `pc`, looking through the unit's top level and,
    /// for C++, the namespaces and classes that nest functions.
    fn function_range(&self, pc: u64) -> gimli::Result<Option<Range<u64>>> {
        let mut scopes = vec![(None, 0)]; // None: the unit's root
        while let Some((scope, depth)) = scopes.pop() {
            let mut tree = self.unit.entries_tree(scope)?;
            let mut children = tree.root()?.children();
            while let Some(child) = children.next()? {
                let entry = child.entry();
                match entry.tag() {
                    gimli::DW_TAG_subprogram => {
                        if let Some(range) = self.range_containing(entry, pc)? {
                            return Ok(Some(range));
                        }
                    }
                    gimli::DW_TAG_namespace
                    | gimli::DW_TAG_structure_type
                    | gimli::DW_TAG_class_type
                        if depth < MAX_SCOPE_DEPTH
                            && (scope.is_none() || scopes.len() < MAX_NESTED_SCOPES) =>
                    {
                        scopes.push((Some(entry.offset()), depth + 1));
                    }
                    _ => {}
                }
            }
        }
        Ok(None)
    }

    fn range_containing(
        &self,
        entry: &DebuggingInformationEntry<Reader>,
        pc: u64,
    ) -> gimli::Result<Option<Range<u64>>> {
        // gimli's `die_ranges` adds `DW_AT_low_pc` and an offset `DW_AT_high_pc` unchecked,
        // which overflows on hostile DWARF (found by cargo fuzz): single ranges are read here.
        if entry.attr_value(gimli::DW_AT_ranges).is_none() {
            let Some(begin) = entry
                .attr_value(gimli::DW_AT_low_pc)
                .map(|low| self.unit.attr_address(low))
                .transpose()?
                .flatten()
            else {
                return Ok(None);
            };
            let end = match entry.attr_value(gimli::DW_AT_high_pc) {
                Some(AttributeValue::Udata(size)) => begin.checked_add(size),
                Some(high) => self.unit.attr_address(high)?,
                None => None,
            };
            return Ok(end
                .filter(|&end| begin <= pc && pc < end)
                .map(|end| begin..end));
        }
        let mut ranges = self.unit.die_ranges(entry)?;
        while let Some(range) = ranges.next()? {
            if range.begin <= pc && pc < range.end {
                return Ok(Some(range.begin..range.end));
            }
        }
        Ok(None)
    }

    /// Visits the scopes around `pc` below `node`, keeping the deepest variable in
    /// `register`. Two different variables at the same depth make the answer ambiguous.
    /// `depth` counts the blocks entered, `scope_depth` the namespaces and classes; both
    /// are bounded, so the recursion is.
    fn find_variable(
        &self,
        node: EntriesTreeNode<'_, '_, Reader>,
        pc: u64,
        register: u16,
        (depth, scope_depth): (usize, usize),
        best: &mut Option<(usize, Option<Typed<UnitOffset>>)>,
    ) -> gimli::Result<()> {
        let mut children = node.children();
        while let Some(child) = children.next()? {
            let entry = child.entry();
            match entry.tag() {
                gimli::DW_TAG_subprogram
                | gimli::DW_TAG_inlined_subroutine
                | gimli::DW_TAG_lexical_block
                    if depth < MAX_BLOCK_DEPTH && self.range_containing(entry, pc)?.is_some() =>
                {
                    self.find_variable(child, pc, register, (depth + 1, scope_depth), best)?;
                }
                gimli::DW_TAG_namespace
                | gimli::DW_TAG_structure_type
                | gimli::DW_TAG_class_type
                    if depth == 0 && scope_depth < MAX_SCOPE_DEPTH =>
                {
                    self.find_variable(child, pc, register, (depth, scope_depth + 1), best)?;
                }
                gimli::DW_TAG_variable | gimli::DW_TAG_formal_parameter if depth > 0 => {
                    if self.in_register_at(entry, pc)? != Some(register) {
                        continue;
                    }
                    let Some(found) = self.name_and_type(entry) else {
                        continue;
                    };
                    match best {
                        Some((d, _)) if *d > depth => {}
                        Some((d, Some(previous))) if *d == depth => {
                            if previous.name != found.name {
                                *best = Some((depth, None));
                            }
                        }
                        Some((d, None)) if *d == depth => {}
                        _ => *best = Some((depth, Some(found))),
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The DWARF register holding the variable at `pc`, when its whole location is one.
    fn in_register_at(
        &self,
        entry: &DebuggingInformationEntry<Reader>,
        pc: u64,
    ) -> gimli::Result<Option<u16>> {
        let Some(location) = entry.attr_value(gimli::DW_AT_location) else {
            return Ok(None);
        };
        let encoding = self.unit.encoding();
        let only_register = |expression: gimli::Expression<Reader>| -> gimli::Result<Option<u16>> {
            let mut operations = expression.operations(encoding);
            match (operations.next()?, operations.next()?) {
                (Some(Operation::Register { register }), None) => Ok(Some(register.0)),
                _ => Ok(None),
            }
        };
        if let AttributeValue::Exprloc(expression) = location {
            return only_register(expression);
        }
        let Some(mut locations) = self.unit.attr_locations(location)? else {
            return Ok(None);
        };
        while let Some(entry) = locations.next()? {
            if entry.range.begin <= pc && pc < entry.range.end {
                return only_register(entry.data);
            }
        }
        Ok(None)
    }

    /// The name and type of a variable, member or parameter, through abstract origins.
    fn name_and_type(
        &self,
        entry: &DebuggingInformationEntry<Reader>,
    ) -> Option<Typed<UnitOffset>> {
        let mut name = None;
        let mut ty = None;
        let mut current = entry.clone();
        for _ in 0..MAX_INDIRECTIONS {
            if name.is_none()
                && let Some(value) = current.attr_value(gimli::DW_AT_name)
            {
                name = self.unit.attr_string(value).ok().map(|s| {
                    s.to_string_lossy()
                        .map(|s| s.into_owned())
                        .unwrap_or_default()
                });
            }
            if ty.is_none()
                && let Some(AttributeValue::UnitRef(offset)) = current.attr_value(gimli::DW_AT_type)
            {
                ty = Some(offset);
            }
            if name.is_some() && ty.is_some() {
                break;
            }
            match current.attr_value(gimli::DW_AT_abstract_origin) {
                Some(AttributeValue::UnitRef(origin)) => current = self.unit.entry(origin).ok()?,
                _ => break,
            }
        }
        Some(Typed { name: name?, ty })
    }

    /// The type under typedefs and qualifiers, with its tag.
    fn strip(&self, mut ty: UnitOffset) -> Option<(DebuggingInformationEntry<Reader>, DwTag)> {
        for _ in 0..MAX_INDIRECTIONS {
            let entry = self.unit.entry(ty).ok()?;
            match entry.tag() {
                gimli::DW_TAG_typedef
                | gimli::DW_TAG_const_type
                | gimli::DW_TAG_volatile_type
                | gimli::DW_TAG_restrict_type
                | gimli::DW_TAG_atomic_type => match entry.attr_value(gimli::DW_AT_type) {
                    Some(AttributeValue::UnitRef(next)) => ty = next,
                    _ => return None, // void
                },
                tag => return Some((entry, tag)),
            }
        }
        None
    }

    /// The size of a type in bytes.
    fn byte_size(&self, ty: UnitOffset, depth: usize) -> Option<u64> {
        let (entry, tag) = self.strip(ty)?;
        if let Some(size) = entry
            .attr(gimli::DW_AT_byte_size)
            .and_then(|a| a.udata_value())
        {
            return Some(size);
        }
        match tag {
            gimli::DW_TAG_pointer_type
            | gimli::DW_TAG_reference_type
            | gimli::DW_TAG_rvalue_reference_type => {
                Some(u64::from(self.unit.encoding().address_size))
            }
            gimli::DW_TAG_array_type if depth < MAX_INDIRECTIONS => {
                let Some(AttributeValue::UnitRef(element)) = entry.attr_value(gimli::DW_AT_type)
                else {
                    return None;
                };
                let element_size = self.byte_size(element, depth + 1)?;
                let count = self.array_length(&entry)?;
                element_size.checked_mul(count)
            }
            _ => None,
        }
    }

    /// The element count of a one-dimensional array type.
    fn array_length(&self, array: &DebuggingInformationEntry<Reader>) -> Option<u64> {
        let mut tree = self.unit.entries_tree(Some(array.offset())).ok()?;
        let root = tree.root().ok()?;
        let mut children = root.children();
        let subrange = children.next().ok()??;
        let entry = subrange.entry();
        if let Some(count) = entry.attr(gimli::DW_AT_count).and_then(|a| a.udata_value()) {
            return Some(count);
        }
        entry
            .attr(gimli::DW_AT_upper_bound)
            .and_then(|a| a.udata_value())
            .map(|upper| upper + 1)
    }

    fn member_in(
        &self,
        aggregate: UnitOffset,
        offset: u64,
        depth: usize,
    ) -> Option<Typed<UnitOffset>> {
        if depth > MAX_INDIRECTIONS {
            return None;
        }
        let (entry, tag) = self.strip(aggregate)?;
        if !matches!(
            tag,
            gimli::DW_TAG_structure_type | gimli::DW_TAG_class_type | gimli::DW_TAG_union_type
        ) || entry.has_attr(gimli::DW_AT_declaration)
        {
            return None;
        }
        let mut tree = self.unit.entries_tree(Some(entry.offset())).ok()?;
        let root = tree.root().ok()?;
        let mut children = root.children();
        while let Some(child) = children.next().ok()? {
            let member = child.entry();
            if member.tag() != gimli::DW_TAG_member || member.has_attr(gimli::DW_AT_external) {
                continue; // static members live elsewhere
            }
            let start = match member.attr(gimli::DW_AT_data_member_location) {
                None => 0, // union members
                Some(attr) => match attr.udata_value() {
                    Some(start) => start,
                    None => continue, // a location expression (virtual bases)
                },
            };
            let Some(Typed { name, ty: Some(ty) }) = self.name_and_type(member).or_else(|| {
                // An anonymous struct or union member has a type but no name.
                match member.attr_value(gimli::DW_AT_type) {
                    Some(AttributeValue::UnitRef(ty)) => Some(Typed {
                        name: String::new(),
                        ty: Some(ty),
                    }),
                    _ => None,
                }
            }) else {
                continue;
            };
            let Some(size) = self.byte_size(ty, 0) else {
                continue;
            };
            if offset < start || offset >= start.saturating_add(size) {
                continue;
            }
            let inner = offset - start;
            let join = |inner: String| match (name.is_empty(), inner.starts_with('[')) {
                (true, _) => inner,
                (false, true) => format!("{name}{inner}"),
                (false, false) => format!("{name}.{inner}"),
            };
            if let Some(nested) = self.member_in(ty, inner, depth + 1) {
                return Some(Typed {
                    name: join(nested.name),
                    ty: nested.ty,
                });
            }
            if let Some((element, index, within)) = self.array_element(ty, inner) {
                if within == 0 {
                    return Some(Typed {
                        name: join(format!("[{index}]")),
                        ty: Some(element),
                    });
                }
                if let Some(nested) = self.member_in(element, within, depth + 1) {
                    return Some(Typed {
                        name: join(format!("[{index}].{}", nested.name)),
                        ty: nested.ty,
                    });
                }
            }
            if inner == 0 && !name.is_empty() {
                return Some(Typed { name, ty: Some(ty) });
            }
        }
        None
    }

    /// For an array type: the element type, the index holding `offset`, and the offset
    /// within that element.
    fn array_element(&self, ty: UnitOffset, offset: u64) -> Option<(UnitOffset, u64, u64)> {
        let (entry, tag) = self.strip(ty)?;
        if tag != gimli::DW_TAG_array_type {
            return None;
        }
        let Some(AttributeValue::UnitRef(element)) = entry.attr_value(gimli::DW_AT_type) else {
            return None;
        };
        let size = self.byte_size(element, 0).filter(|s| *s > 0)?;
        Some((element, offset / size, offset % size))
    }
}

impl DebugFacts for UnitFacts<'_> {
    type Type = UnitOffset;

    fn variable_in_register(&self, pc: u64, dwarf_register: u16) -> Option<Typed<UnitOffset>> {
        let mut tree = self.unit.entries_tree(self.function).ok()?;
        let root = tree.root().ok()?;
        let mut best = None;
        // Below the subprogram, its own variables are one block deep, as when the walk
        // starts at the unit and enters it.
        let depth = usize::from(self.function.is_some());
        self.find_variable(root, pc, dwarf_register, (depth, 0), &mut best)
            .ok()?;
        best.and_then(|(_, found)| found)
    }

    fn pointee(&self, pointer: UnitOffset) -> Option<UnitOffset> {
        let (entry, tag) = self.strip(pointer)?;
        match (tag, entry.attr_value(gimli::DW_AT_type)) {
            (
                gimli::DW_TAG_pointer_type
                | gimli::DW_TAG_reference_type
                | gimli::DW_TAG_rvalue_reference_type,
                Some(AttributeValue::UnitRef(target)),
            ) => Some(target),
            _ => None,
        }
    }

    fn member_at(&self, aggregate: UnitOffset, offset: u64) -> Option<Typed<UnitOffset>> {
        self.member_in(aggregate, offset, 0)
    }

    fn function_name(&self, address: u64) -> Option<String> {
        self.debug
            .symbol(address)
            .filter(|(_, offset, _)| *offset == 0)
            .map(|(name, _, _)| name)
    }
}
