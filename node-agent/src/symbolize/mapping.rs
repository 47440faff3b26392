//! From what the kernel printed to the link-time address symbolizers want (pure).

use thiserror::Error;

/// One `PT_LOAD` program header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadSegment {
    /// `p_offset`: where the segment starts in the file.
    pub offset: u64,
    /// `p_vaddr`: its link-time address.
    pub vaddr: u64,
    /// `p_filesz`: how many bytes come from the file.
    pub file_size: u64,
    /// Whether it is mapped executable (`PF_X`).
    pub executable: bool,
}

/// Why an address could not be mapped.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MappingError {
    /// No `PT_LOAD` contains the file offset.
    #[error("file offset {0:#x} is in no PT_LOAD segment of the binary")]
    OutsideSegments(u64),
    /// The binary has no executable segment, so an old kernel's VMA cannot be placed.
    #[error("the binary has no executable PT_LOAD segment")]
    NoExecutableSegment,
    /// Several executable segments could hold the VMA; the old format does not say which.
    #[error(
        "the binary has {0} executable PT_LOAD segments; the kernel line does not say which one was mapped at the VMA"
    )]
    Ambiguous(usize),
}

/// Maps a file offset (printed by kernels since 6.1 as `FILE[OFF,START+SIZE]`) to a link-time
/// virtual address: `vaddr = off - p_offset + p_vaddr` in the segment holding it.
pub fn file_offset_to_vaddr(
    segments: &[LoadSegment],
    file_offset: u64,
) -> Result<u64, MappingError> {
    segments
        .iter()
        .find(|s| s.offset <= file_offset && file_offset < s.offset.saturating_add(s.file_size))
        .map(|s| file_offset - s.offset + s.vaddr)
        .ok_or(MappingError::OutsideSegments(file_offset))
}

/// Maps a link-time virtual address back to its file offset (None outside the file's bytes).
pub fn vaddr_to_file_offset(segments: &[LoadSegment], vaddr: u64) -> Option<u64> {
    segments
        .iter()
        .find(|s| s.vaddr <= vaddr && vaddr < s.vaddr.saturating_add(s.file_size))
        .map(|s| vaddr - s.vaddr + s.offset)
}

/// Derives the file offset of `ip` for kernels that print only `FILE[START+SIZE]`.
///
/// `ip` lies in an executable mapping, which maps the binary's executable segment from its
/// page-aligned file offset (with `-z separate-code` that is not 0). So the file offset is
/// that page offset plus `ip - START`; it is ambiguous when there are several executable
/// segments.
pub fn vma_to_file_offset(
    segments: &[LoadSegment],
    ip: u64,
    vma_start: u64,
) -> Result<u64, MappingError> {
    let executable: Vec<_> = segments.iter().filter(|s| s.executable).collect();
    match executable.as_slice() {
        [] => Err(MappingError::NoExecutableSegment),
        [segment] => Ok((segment.offset & !0xfff) + ip.wrapping_sub(vma_start)),
        many => Err(MappingError::Ambiguous(many.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Program headers of the fault lab's builds (readelf -lW).
    const PIE: [LoadSegment; 2] = [
        LoadSegment {
            offset: 0,
            vaddr: 0,
            file_size: 0x6e0,
            executable: false,
        },
        LoadSegment {
            offset: 0x1000,
            vaddr: 0x1000,
            file_size: 0x5f5,
            executable: true,
        },
    ];
    const NOPIE: [LoadSegment; 2] = [
        LoadSegment {
            offset: 0,
            vaddr: 0x400000,
            file_size: 0x6c8,
            executable: false,
        },
        LoadSegment {
            offset: 0x1000,
            vaddr: 0x401000,
            file_size: 0x5e5,
            executable: true,
        },
    ];

    #[test]
    fn new_kernels_print_the_file_offset() {
        assert_eq!(file_offset_to_vaddr(&PIE, 0x14f0), Ok(0x14f0));
        assert_eq!(file_offset_to_vaddr(&NOPIE, 0x14e0), Ok(0x4014e0));
        assert_eq!(
            file_offset_to_vaddr(&PIE, 0x9000),
            Err(MappingError::OutsideSegments(0x9000))
        );
    }

    #[test]
    fn old_kernels_print_only_the_vma() {
        // crashy-nopie[…]: ip 4014e0 in crashy-nopie[401000+1000]
        assert_eq!(vma_to_file_offset(&NOPIE, 0x4014e0, 0x401000), Ok(0x14e0));
        // crashy[…]: ip 564bc14194f0 in crashy[564bc1419000+1000]
        assert_eq!(
            vma_to_file_offset(&PIE, 0x564b_c141_94f0, 0x564b_c141_9000),
            Ok(0x14f0)
        );
        let two = [
            PIE[1],
            LoadSegment {
                offset: 0x3000,
                vaddr: 0x3000,
                file_size: 1,
                executable: true,
            },
        ];
        assert_eq!(
            vma_to_file_offset(&two, 1, 0),
            Err(MappingError::Ambiguous(2))
        );
    }
}
