//! The process's allocator: the system allocator, plus a hint to the kernel that large
//! blocks (the wallet table, the idempotency key table) should be backed by 2 MiB huge
//! pages. The writer touches those tables at random; with 4 KiB pages nearly every
//! touch misses the TLB, and under virtualization each miss is a two-level page walk.
//!
//! Only blocks allocated while the process starts (loading the state, reserving the key
//! table) get the hint. Once it serves ([`serving`]), a fault in a hinted block may make
//! the kernel compact memory to find a free huge page, synchronously, on the writer's
//! thread: measured stalls of up to 266 ms under an open-loop load, which no request
//! should wait for. Later blocks get ordinary pages.

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks at least this large get the huge-page hint; smaller ones are not worth it.
const HUGE_PAGE_HINT_BYTES_MIN: usize = 4 << 20;
const HUGE_PAGE_BYTES: usize = 2 << 20;

pub struct HugePageHinting;

/// 0 unknown, 1 on, 2 off (`TALLY_HUGE_PAGES=off`, or serving). Read with getenv, which does not
/// allocate: this runs inside the allocator.
static ENABLED: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

fn enabled() -> bool {
    use std::sync::atomic::Ordering;
    match ENABLED.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            // SAFETY: getenv with a NUL-terminated literal; the result is only compared.
            let value = unsafe { libc::getenv(c"TALLY_HUGE_PAGES".as_ptr()) };
            // SAFETY: a non-null getenv result points to a NUL-terminated string.
            let off = !value.is_null() && unsafe { std::ffi::CStr::from_ptr(value) }.to_bytes() == b"off";
            ENABLED.store(if off { 2 } else { 1 }, Ordering::Relaxed);
            !off
        }
    }
}

/// From now on, new blocks get no huge-page hint (see the module documentation).
pub fn serving() {
    ENABLED.store(2, std::sync::atomic::Ordering::Relaxed);
}

fn hint(pointer: *mut u8, size: usize) {
    if pointer.is_null() || size < HUGE_PAGE_HINT_BYTES_MIN || !enabled() {
        return;
    }
    // Only whole 2 MiB pages inside the block can become huge pages.
    let start = (pointer as usize).next_multiple_of(HUGE_PAGE_BYTES);
    let end = (pointer as usize + size) & !(HUGE_PAGE_BYTES - 1);
    if end > start {
        // SAFETY: the range lies inside a block we just allocated; madvise with
        // MADV_HUGEPAGE changes no contents and at worst fails, which is harmless.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged; the hint only
// advises the kernel about memory the allocation owns.
unsafe impl GlobalAlloc for HugePageHinting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let pointer = unsafe { System.alloc(layout) };
        hint(pointer, layout.size());
        pointer
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let pointer = unsafe { System.alloc_zeroed(layout) };
        hint(pointer, layout.size());
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        unsafe { System.dealloc(pointer, layout) }
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let moved = unsafe { System.realloc(pointer, layout, new_size) };
        hint(moved, new_size);
        moved
    }
}
