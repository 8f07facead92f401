//! Huge pages.

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
