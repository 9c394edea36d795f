//! The process's allocator: jemalloc, for two measured reasons.
//!
//! - Speed. The bus allocates a message on one thread and frees it on
//!   another (a publisher's session, the registry, each subscriber's
//!   session); glibc's malloc serialises such frees on the allocating
//!   arena's lock. With glibc, registrations cost 11.6 ms of CPU per 1,000
//!   and ran at 1.21 × Mosquitto's rate; with jemalloc, 8-9 ms and
//!   1.65 × (`cargo bench --bench bench -- --only 1`, docs/BENCHMARKS.md).
//! - Giving memory back. Once clients have gone, [`purge`] returns every
//!   arena's unused pages to the system at once (glibc's `malloc_trim`
//!   did the same, slower, for its heap), and a background thread returns
//!   what bursts leave behind within about a second, without a purge.

use std::ffi::c_char;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once at start-up: purge freed pages from a
/// background thread, after a second unused (default: ten seconds, and only
/// when the arena is next used).
#[used]
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &u8 = &b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0"[0];

/// Returns every arena's unused pages to the system (blocking: call it off
/// the executor).
pub fn purge() {
    // `arena.<MALLCTL_ARENAS_ALL>.purge`: MALLCTL_ARENAS_ALL is 4096.
    let name = b"arena.4096.purge\0";
    // SAFETY: a void control command: no old or new value is read or
    // written, and the name is NUL-terminated.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr() as *const c_char,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
    }
}

/// The value of a boolean option (`opt.background_thread`), for tests.
pub fn option(name: &str) -> Option<bool> {
    let name = std::ffi::CString::new(name).ok()?;
    let mut value = false;
    let mut len = std::mem::size_of::<bool>();
    // SAFETY: `value` is a bool of `len` bytes, as the option is.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            &mut value as *mut bool as *mut _,
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    (rc == 0).then_some(value)
}

#[cfg(test)]
mod tests {
    #[test]
    fn options_are_read_and_purge_runs() {
        assert_eq!(super::option("opt.background_thread"), Some(true));
        let v: Vec<u8> = vec![1; 10 << 20];
        drop(v);
        super::purge();
    }
}
