//! Ctrl-C for long commands: the first press asks the work to stop at its
//! next safe point (what is finished is saved); `data build` reads the count
//! to tell a drain (first press) from a stop (second).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static PRESSES: AtomicUsize = AtomicUsize::new(0);
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    PRESSES.fetch_add(1, Ordering::SeqCst);
    STOP.store(true, Ordering::SeqCst);
}

/// Catches SIGINT from now on; the flag it sets.
pub fn install() -> &'static AtomicBool {
    // SAFETY: the handler only touches atomics.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
    }
    &STOP
}

/// Presses so far.
pub fn presses() -> usize {
    PRESSES.load(Ordering::SeqCst)
}
