//! A global allocator for test binaries that records the largest single allocation and refuses
//! any over a bound: a decompression bomb then fails the test instead of taking the machine.
//!
//! ```ignore
//! #[global_allocator]
//! static GLOBAL: testkit::alloc::Bounded = testkit::alloc::Bounded(32 << 20);
//! ```
//!
//! A refusal makes Rust abort, except where the caller asked with `try_reserve` (`read_to_end`
//! does), which turns it into an error: [`assert_nothing_refused`] catches those.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The system allocator, refusing single allocations over `.0` bytes.
pub struct Bounded(pub usize);

static LARGEST: AtomicUsize = AtomicUsize::new(0);
static REFUSED: AtomicBool = AtomicBool::new(false);

impl Bounded {
    fn allow(&self, size: usize) -> bool {
        if size > self.0 {
            eprintln!("testkit::alloc: refused a single allocation of {size} bytes (bound {})", self.0);
            REFUSED.store(true, Ordering::SeqCst);
            return false;
        }
        LARGEST.fetch_max(size, Ordering::Relaxed);
        true
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged, or refused with a null
// pointer, which Rust turns into an abort or an error, never into a use of the pointer.
unsafe impl GlobalAlloc for Bounded {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if !self.allow(l.size()) {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if !self.allow(new) {
            return std::ptr::null_mut();
        }
        unsafe { System.realloc(p, l, new) }
    }
}

/// The largest single allocation since the last [`reset_largest`].
pub fn largest() -> usize {
    LARGEST.load(Ordering::Relaxed)
}

pub fn reset_largest() {
    LARGEST.store(0, Ordering::Relaxed);
}

/// Fails the calling test if any allocation of this binary was refused so far.
pub fn assert_nothing_refused() {
    assert!(!REFUSED.load(Ordering::SeqCst), "an allocation over the bound was attempted");
}
