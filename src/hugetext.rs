//! The executable's code and read-only data on 2 MiB pages.
//!
//! Measured in this project's benchmark (a virtual machine, docs/BENCHMARKS.md),
//! the tail of message latency follows how many distinct 4 KiB pages a
//! message touches: a message arriving after the CPU has slept pays, now and
//! then, 100-200 µs for one of them. A message through `serve` runs through
//! about 600 KiB of code; Mosquitto's through 200 KiB. On huge pages that
//! code is three pages, and the propagation p99 fell from 1.5 × Mosquitto's
//! to about 1.1 ×. Databases do the same (ClickHouse's `remap_executable`,
//! MySQL's large pages).
//!
//! How: each read-only mapping of the executable is rounded out to 2 MiB
//! boundaries over holes in the address space (the binary is linked with
//! 2 MiB segment alignment for that: `build.rs`), copied into an anonymous
//! region asked for huge pages, given the mapping's protection, and moved
//! over the original with one `mremap`. Nothing is changed until the copy
//! is ready and protected; any failure leaves the mapping as it was. Call
//! it before the runtime starts: a thread already running (jemalloc's
//! background thread may be) sees the same bytes at the same addresses
//! throughout, as the kernel makes a fault in the range wait for the
//! `mremap` to finish, but nothing should be running code there by design.
//!
//! The cost: the code is a private copy (up to 6 MiB of resident memory
//! more, not shared with the page cache), and `perf` no longer names the
//! functions in it; `huge_code_pages = false` keeps the file mapping.

/// What [`remap`] moved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    /// Mappings moved onto huge pages.
    pub mappings: usize,
    /// Their bytes, rounded to 2 MiB.
    pub bytes: usize,
}

const HUGE: usize = 2 << 20;

/// One line of `/proc/self/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mapping {
    lo: usize,
    hi: usize,
    perms: String,
    path: String,
}

fn mappings(maps: &str) -> Vec<Mapping> {
    maps.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (lo, hi) = f.next()?.split_once('-')?;
            let perms = f.next()?.to_string();
            let path = f.nth(3).unwrap_or("").to_string();
            Some(Mapping {
                lo: usize::from_str_radix(lo, 16).ok()?,
                hi: usize::from_str_radix(hi, 16).ok()?,
                perms,
                path,
            })
        })
        .collect()
}

/// `[lo, hi)` rounded out to 2 MiB where nothing else is mapped, else in:
/// `None` when that leaves nothing.
fn rounded(all: &[Mapping], lo: usize, hi: usize) -> Option<(usize, usize)> {
    let free = |a: usize, b: usize| all.iter().all(|m| m.hi <= a || m.lo >= b);
    let down = lo / HUGE * HUGE;
    let start = if free(down, lo) {
        down
    } else {
        lo.next_multiple_of(HUGE)
    };
    let up = hi.next_multiple_of(HUGE);
    let end = if free(hi, up) { up } else { hi / HUGE * HUGE };
    (start < end).then_some((start, end))
}

/// Moves the executable's read-only mappings (code, constants) onto huge
/// pages where the system has them (transparent huge pages `always` or
/// `madvise`). Linux only; elsewhere nothing is moved.
pub fn remap() -> Result<Moved, String> {
    if !cfg!(target_os = "linux") {
        return Ok(Moved::default());
    }
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .map_err(|e| format!("transparent huge pages: {e}"))?;
    if thp.contains("[never]") {
        return Err("transparent huge pages are off (`never`)".into());
    }
    let exe = std::fs::read_link("/proc/self/exe").map_err(|e| format!("/proc/self/exe: {e}"))?;
    let exe = exe.to_string_lossy().into_owned();
    let mut moved = Moved::default();
    loop {
        // Read again after each move: a moved range shows as anonymous.
        let maps = std::fs::read_to_string("/proc/self/maps")
            .map_err(|e| format!("/proc/self/maps: {e}"))?;
        let all = mappings(&maps);
        let next = all.iter().find_map(|m| {
            let read_only = m.perms.starts_with('r') && m.perms.as_bytes().get(1) == Some(&b'-');
            if m.path != exe || !read_only {
                return None;
            }
            let (start, end) = rounded(&all, m.lo, m.hi)?;
            Some((m.clone(), start, end))
        });
        let Some((m, start, end)) = next else {
            return Ok(moved);
        };
        // SAFETY: see `move_onto_huge_pages`; [start, end) holds only `m`
        // (and holes), which is read-only and not writable by anyone.
        unsafe { move_onto_huge_pages(&m, start, end)? };
        moved.mappings += 1;
        moved.bytes += end - start;
    }
}

/// Copies `m` into a new anonymous region of huge pages covering
/// [start, end) and moves that region over it.
///
/// # Safety
/// [start, end) must hold nothing but `m` and unmapped holes, and `m` must
/// be read-only (its bytes cannot change while they are copied).
unsafe fn move_onto_huge_pages(m: &Mapping, start: usize, end: usize) -> Result<(), String> {
    let len = end - start;
    let prot = if m.perms.contains('x') {
        libc::PROT_READ | libc::PROT_EXEC
    } else {
        libc::PROT_READ
    };
    // SAFETY: plain calls on a region this function maps; the copy reads
    // `m`, which is mapped and readable, and writes inside the new region.
    unsafe {
        let raw = libc::mmap(
            std::ptr::null_mut(),
            len + HUGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if raw == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        // Keep the aligned part only.
        let tmp = (raw as usize).next_multiple_of(HUGE);
        if tmp > raw as usize {
            libc::munmap(raw, tmp - raw as usize);
        }
        let slack_end = raw as usize + len + HUGE;
        if slack_end > tmp + len {
            libc::munmap((tmp + len) as *mut libc::c_void, slack_end - tmp - len);
        }
        let give_back = || libc::munmap(tmp as *mut libc::c_void, len);
        // Asked before the first touch: the copy faults in huge pages.
        if libc::madvise(tmp as *mut libc::c_void, len, libc::MADV_HUGEPAGE) != 0 {
            let e = std::io::Error::last_os_error();
            give_back();
            return Err(format!("madvise: {e}"));
        }
        let (from, to) = (m.lo.max(start), m.hi.min(end));
        std::ptr::copy_nonoverlapping(
            from as *const u8,
            (tmp + from - start) as *mut u8,
            to - from,
        );
        if libc::mprotect(tmp as *mut libc::c_void, len, prot) != 0 {
            let e = std::io::Error::last_os_error();
            give_back();
            return Err(format!("mprotect: {e}"));
        }
        let at = libc::mremap(
            tmp as *mut libc::c_void,
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            start as *mut libc::c_void,
        );
        if at == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            give_back();
            return Err(format!("mremap: {e}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(lo: usize, hi: usize) -> Mapping {
        Mapping {
            lo,
            hi,
            perms: "r-xp".into(),
            path: "/x".into(),
        }
    }

    #[test]
    fn ranges_round_out_over_holes_and_in_against_neighbours() {
        const M: usize = HUGE;
        // Holes on both sides: out to the boundaries.
        let all = [m(M + 0x1000, 2 * M + 0x5000)];
        assert_eq!(rounded(&all, M + 0x1000, 2 * M + 0x5000), Some((M, 3 * M)));
        // Neighbours on both sides: in, to what whole huge pages fit.
        let all = [
            m(0, M + 0x1000),
            m(M + 0x1000, 4 * M + 0x10),
            m(4 * M + 0x10, 5 * M),
        ];
        assert_eq!(
            rounded(&all, M + 0x1000, 4 * M + 0x10),
            Some((2 * M, 4 * M))
        );
        // Too small for one huge page between neighbours.
        let all = [
            m(0, M + 0x1000),
            m(M + 0x1000, M + 0x9000),
            m(M + 0x9000, 3 * M),
        ];
        assert_eq!(rounded(&all, M + 0x1000, M + 0x9000), None);
    }

    #[test]
    fn maps_lines_are_read() {
        let maps = "55d0a4200000-55d0a4400000 r--p 00000000 fd:00 12 /usr/bin/homicro\n\
                    7ffd1c000000-7ffd1c021000 rw-p 00000000 00:00 0 \n";
        let v = mappings(maps);
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].lo, 0x55d0a4200000);
        assert_eq!(v[0].path, "/usr/bin/homicro");
        assert_eq!(v[1].perms, "rw-p");
        assert_eq!(v[1].path, "");
    }
}
