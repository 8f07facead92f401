//! Memory the weights live in: byte ranges of a memory-mapped file (or
//! owned copies) and the kernel advice that goes with them.

use std::sync::Arc;

/// Bytes of a tensor: a range of a memory-mapped file, or owned (aligned to 8).
#[derive(Clone)]
pub enum Bytes {
    Mapped {
        map: Arc<memmap2::Mmap>,
        start: usize,
        len: usize,
    },
    Owned {
        words: Arc<Vec<u64>>,
        len: usize,
    },
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes({})", self.as_slice().len())
    }
}

impl Bytes {
    /// Bytes `start..start + len` of these: a view of the same mapping, or
    /// a copy of owned bytes.
    pub fn part(&self, start: usize, len: usize) -> Bytes {
        assert!(
            start + len <= self.as_slice().len(),
            "a part within the bytes"
        );
        match self {
            Bytes::Mapped { map, start: s, .. } => Bytes::Mapped {
                map: map.clone(),
                start: s + start,
                len,
            },
            Bytes::Owned { .. } => Bytes::owned(&self.as_slice()[start..start + len]),
        }
    }

    pub fn owned(bytes: &[u8]) -> Bytes {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        // SAFETY: `words` holds at least `bytes.len()` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                words.as_mut_ptr() as *mut u8,
                bytes.len(),
            )
        };
        Bytes::Owned {
            words: Arc::new(words),
            len: bytes.len(),
        }
    }

    /// Tells the kernel that a mapped range will not be read again, so its
    /// pages leave this process's resident set (a later read would fetch
    /// them from the file again). Owned bytes are left as they are.
    pub(crate) fn release(&self) {
        let Bytes::Mapped { map, start, len } = self else {
            return;
        };
        // Whole pages inside the range only: the ones at its ends may hold
        // other tensors.
        const PAGE: usize = 4096;
        let base = map.as_ptr() as usize;
        let first = (base + start).next_multiple_of(PAGE) - base;
        let end = (base + start + len) / PAGE * PAGE - base;
        if end > first {
            // SAFETY: the map is read-only, so dropping its pages loses
            // nothing; the range lies within it.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, first, end - first)
            };
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped { map, start, len } => &map[*start..*start + *len],
            // SAFETY: the vector holds at least `len` initialised bytes.
            Bytes::Owned { words, len } => unsafe {
                std::slice::from_raw_parts(words.as_ptr() as *const u8, *len)
            },
        }
    }
}

/// Asks for transparent huge pages over an allocation of `len` bytes at
/// `start` (2 MiB pages spare the TLB a miss every 4 KiB when decoding
/// streams every weight once per token).
#[cfg(target_os = "linux")]
pub(crate) fn advise_huge_pages(start: usize, len: usize) {
    const HUGE: usize = 2 << 20;
    if len < HUGE {
        return;
    }
    let page = 4096;
    let begin = start.div_ceil(page) * page;
    let end = (start + len) / page * page;
    if end > begin {
        // SAFETY: the range lies inside an allocation we own; the advice only
        // changes how the kernel backs it, never its contents.
        unsafe {
            libc::madvise(begin as *mut libc::c_void, end - begin, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn advise_huge_pages(_start: usize, _len: usize) {}
