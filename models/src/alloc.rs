//! The memory allocator for the toolchain's Candle binaries (trainer, exporter, benchmarks).
//!
//! A forward pass allocates and frees buffers of tens to hundreds of MiB, layer after layer.
//! glibc's allocator hands such buffers back to the kernel on `free` and gets fresh ones, zeroed
//! page by page, on the next `malloc`: up to 15% of a forward pass went to page faults. mimalloc
//! keeps them, once told not to purge freed memory. A binary opts in with
//!
//! ```ignore
//! #[global_allocator]
//! static GLOBAL: models::alloc::Allocator = models::alloc::Allocator;
//! fn main() { models::alloc::keep_freed_memory(); /* ... */ }
//! ```

pub use mimalloc::MiMalloc as Allocator;

/// mimalloc's `mi_option_purge_delay` (v2 and v3 headers: the 16th option).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells mimalloc never to return freed memory to the kernel, so that the next layer's buffers
/// reuse pages that are already mapped. Harmless when mimalloc is not the global allocator.
pub fn keep_freed_memory() {
    // SAFETY: setting an option is a plain store in mimalloc's option table.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}
