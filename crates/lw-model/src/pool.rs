//! The threads that share a forward pass's products, waiting for work by
//! spinning rather than sleeping.
//!
//! A decoded token of a small model is a few hundred parallel loops of tens
//! of microseconds each. A pool whose idle threads sleep (rayon's) pays a
//! wake-up per loop, a system call and, on a virtual machine, an
//! inter-processor interrupt: measured on SmolLM2-135M, a fifth of the
//! token's time went to the scheduler. Here a worker that has finished a
//! loop spins on the next loop's number for a while ([`SPIN`]) and only then
//! sleeps, so back-to-back loops start at once; the calling thread takes
//! pieces too. Pieces are handed out one at a time from a shared counter,
//! and each piece writes only its own outputs, so results do not depend on
//! which thread ran what. The caller waits for pieces, never for a worker:
//! where another process holds the cores, a worker that has not woken
//! claims nothing, and the caller runs the pieces itself.
//!
//! One loop runs at a time: a loop started while another runs (another
//! model on another thread) or from inside a piece runs on its caller
//! alone, in order. Rayon stays for the work outside the forward pass.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps: longer than the gaps
/// between the loops of one forward pass, short enough that an idle
/// process stops using the cores at once to a person.
const SPIN: Duration = Duration::from_millis(2);

/// A loop's body as the workers see it: a pointer to the caller's
/// `&dyn Fn(usize)`, valid while the loop runs.
type Body<'a> = &'a (dyn Fn(usize) + Sync);

struct Shared {
    /// The running loop's number (high 32 bits) and its next piece to hand
    /// out (low 32 bits), in one word: a worker claims a piece with one
    /// compare-and-swap that also checks that the loop is the one it saw,
    /// so a worker that wakes late claims nothing of a loop that has ended.
    claim: AtomicU64,
    /// The running loop's body (`*const Body`) and its number of pieces,
    /// written before its number is published.
    body: AtomicPtr<()>,
    pieces: AtomicUsize,
    /// Pieces of the running loop that have returned.
    done: AtomicUsize,
    /// Set where a piece panicked; the caller panics in turn.
    panicked: AtomicBool,
    /// Sleeping workers wait here for a new loop.
    sleep: Mutex<()>,
    wake: Condvar,
}

struct Pool {
    shared: &'static Shared,
    workers: usize,
    /// Held by the thread whose loop is running.
    running: Mutex<()>,
}

static POOL: OnceLock<Pool> = OnceLock::new();
/// Threads asked for by [`set_threads`] (the pool starts on first use).
static THREADS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Set on the pool's workers, and on a caller while its loop runs.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// Sets the number of threads (the caller included) the loops use. Takes
/// effect if no loop has run yet.
pub(crate) fn set_threads(n: usize) {
    THREADS.store(n.max(1), Ordering::Relaxed);
}

fn pool() -> &'static Pool {
    POOL.get_or_init(|| {
        let threads = match THREADS.load(Ordering::Relaxed) {
            0 => rayon::current_num_threads(),
            n => n,
        };
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            claim: AtomicU64::new(0),
            body: AtomicPtr::new(std::ptr::null_mut()),
            pieces: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
        }));
        let workers = threads.max(1) - 1;
        for i in 0..workers {
            std::thread::Builder::new()
                .name(format!("lw-kernel-{i}"))
                .spawn(move || work(shared))
                .expect("the kernel threads start");
        }
        Pool {
            shared,
            workers,
            running: Mutex::new(()),
        }
    })
}

/// Calls `f(i)` for every `i < pieces`, spread over the pool's threads (the
/// caller's included); returns when all have returned.
pub(crate) fn for_each(pieces: usize, f: impl Fn(usize) + Sync) {
    if pieces == 0 {
        return;
    }
    let pool = pool();
    let guard = if pieces > 1 && pool.workers > 0 && !INSIDE.get() {
        pool.running.try_lock().ok()
    } else {
        None
    };
    let Some(_guard) = guard else {
        (0..pieces).for_each(f);
        return;
    };
    let body: Body = &f;
    let s = pool.shared;
    INSIDE.set(true);
    s.body
        .store(&body as *const Body as *mut (), Ordering::Relaxed);
    s.pieces.store(pieces, Ordering::Relaxed);
    s.done.store(0, Ordering::Relaxed);
    // Release: a worker that sees the new loop's number sees the fields
    // above. Only this thread writes a new number (it holds `running`).
    let epoch = ((s.claim.load(Ordering::Relaxed) >> 32) + 1) & 0xFFFF_FFFF;
    s.claim.store(epoch << 32, Ordering::Release);
    drop(s.sleep.lock().unwrap_or_else(|e| e.into_inner()));
    s.wake.notify_all();
    {
        let _wait = Finish { shared: s, pieces };
        take_pieces(s, epoch);
    }
    if s.panicked.swap(false, Ordering::Relaxed) {
        panic!("a piece of a parallel loop panicked (its message is above)");
    }
}

/// Ends the caller's part of a loop, also when one of its pieces panics:
/// the body lives on the caller's frame, so it waits until every piece has
/// returned (pieces no worker has claimed are the caller's, so it never
/// waits for a worker that has not woken).
struct Finish {
    shared: &'static Shared,
    pieces: usize,
}

impl Drop for Finish {
    fn drop(&mut self) {
        INSIDE.set(false);
        // A piece of this thread's that panicked is not counted: take the
        // rest of the claims so the count can finish.
        let s = self.shared;
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) < self.pieces {
            if std::thread::panicking() {
                break;
            }
            spins = spins.wrapping_add(1);
            if spins > 256 {
                // Another process holds the core the worker needs.
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

/// [`for_each`] over `out` in chunks of `size` (the last may be shorter):
/// `f(i, chunk)` for chunk `i`.
pub(crate) fn for_each_chunk<T: Send>(
    out: &mut [T],
    size: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let size = size.max(1);
    let len = out.len();
    let at = Ptr(out.as_mut_ptr());
    for_each(len.div_ceil(size), |i| {
        let start = i * size;
        let n = size.min(len - start);
        // SAFETY: the chunks do not overlap, each is handed to one piece, and
        // `out` is borrowed until every piece has returned.
        let chunk = unsafe { std::slice::from_raw_parts_mut(at.get().add(start), n) };
        f(i, chunk)
    });
}

/// A pointer that pieces on other threads may use (each on its own part).
struct Ptr<T>(*mut T);

impl<T> Ptr<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

// SAFETY: used only as `for_each_chunk` says, one chunk per piece.
unsafe impl<T: Send> Sync for Ptr<T> {}

/// `f` with this thread's value of `key`: buffers kept per thread and reused
/// (a decoded token allocates nothing once they have grown). Where the
/// value is already in use further up this thread's stack (a pool thread
/// waiting inside a step may take up another: rayon lends idle threads
/// work), `f` gets a fresh one.
pub(crate) fn with_local<T: Default + 'static, R>(
    key: &'static std::thread::LocalKey<std::cell::RefCell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut held) => f(&mut held),
        Err(_) => f(&mut T::default()),
    })
}

/// Runs pieces of loop `epoch` until none are left (or it has ended).
fn take_pieces(s: &Shared, epoch: u64) {
    loop {
        let c = s.claim.load(Ordering::Acquire);
        if c >> 32 != epoch {
            return;
        }
        let i = (c & 0xFFFF_FFFF) as usize;
        // The loop is `epoch` and its piece `i` unclaimed: its body and
        // piece count are that loop's, and stay so until its pieces are
        // done.
        if i >= s.pieces.load(Ordering::Relaxed) {
            return;
        }
        if s.claim
            .compare_exchange_weak(c, c + 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            continue;
        }
        // SAFETY: piece `i` of the running loop is claimed and not done, so
        // the loop's caller is waiting and its body is alive.
        let body: Body = unsafe { *(s.body.load(Ordering::Relaxed) as *const Body) };
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(i)));
        if ran.is_err() {
            s.panicked.store(true, Ordering::Relaxed);
        }
        s.done.fetch_add(1, Ordering::Release);
    }
}

/// A worker: waits for each new loop (spinning, then asleep), takes pieces.
fn work(s: &'static Shared) {
    INSIDE.set(true);
    let mut seen = 0u64;
    loop {
        let started = Instant::now();
        let mut spins = 0u32;
        let epoch = loop {
            let e = s.claim.load(Ordering::Acquire) >> 32;
            if e != seen {
                break e;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && started.elapsed() > SPIN {
                let mut lock = s.sleep.lock().unwrap_or_else(|e| e.into_inner());
                while s.claim.load(Ordering::Acquire) >> 32 == seen {
                    lock = s.wake.wait(lock).unwrap_or_else(|e| e.into_inner());
                }
                break s.claim.load(Ordering::Acquire) >> 32;
            }
            if spins > 4096 {
                // A gap longer than a step's: let another thread (of this
                // process, or another's) have the core meanwhile.
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        };
        seen = epoch;
        take_pieces(s, epoch);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Every piece runs exactly once, loop after loop, and nested or
    /// concurrent loops run on their callers.
    #[test]
    fn every_piece_runs_once() {
        for pieces in [0, 1, 2, 7, 100] {
            for _ in 0..50 {
                let counts: Vec<AtomicUsize> = (0..pieces).map(|_| AtomicUsize::new(0)).collect();
                super::for_each(pieces, |i| {
                    counts[i].fetch_add(1, Ordering::Relaxed);
                    super::for_each(3, |_| {
                        counts[i].fetch_add(1, Ordering::Relaxed);
                    });
                });
                assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 4));
            }
        }
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..100 {
                        super::for_each(10, |i| {
                            total.fetch_add(i, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 100 * 45);
    }
}

/// The output buffer, shared by blocks that write disjoint parts of it.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: only used for disjoint writes while the buffer is borrowed.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// `i` is within the buffer.
    pub(crate) unsafe fn at(self, i: usize) -> *mut f32 {
        self.0.add(i)
    }
}
