//! The direct baseline: io_uring straight at the target, set up the way fio sets up its own ring.

use super::*;

pub(crate) struct Aligned {
    pub(crate) ptr: *mut u8,
    pub(crate) layout: std::alloc::Layout,
}
impl Aligned {
    pub(crate) fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        Self { ptr, layout }
    }
}
impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// How a direct run sets up its io_uring.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Direct {
    /// As fio 3.33's io_uring engine runs (seen with `strace`): cooperative task running, a
    /// single issuer, task work deferred to the waiting thread; each request submitted as it
    /// is queued by an `io_uring_enter(1, 0, GETEVENTS)` that also posts what has completed,
    /// the completion ring read without a system call, and a wait (`min_complete` 1) only
    /// when it is empty; the file registered (fio's one difference: it does not).
    Tuned,
    /// `Tuned`'s ring, but every free slot submitted by one `io_uring_enter` that then waits
    /// for a completion: the harness's loop before fio's pattern was copied (`perf --baseline`
    /// shows it; on tmpfs, where io-wq workers serve every request, its thread sleeps more).
    Batched,
    /// The harness's baseline before issue 19: a plain 64-entry ring, the file not
    /// registered (`perf --baseline` shows it beside the tuned one).
    Legacy,
}

/// A direct run. Its system calls are the loop's own `io_uring_enter` calls, counted in
/// the loop (the only ones it makes), unless `perf_stat`: then `perf stat` attaches to the
/// thread as it does to blkbackd (`perf --baseline` shows what that costs).
pub(crate) fn run_direct(
    path: &Path,
    w: Workload,
    secs: f64,
    image: u64,
    kind: Direct,
    perf_stat: bool,
) -> anyhow::Result<Measured> {
    let tid = rustix::thread::gettid().as_raw_nonzero().get() as u32;
    let counter = perf_stat.then(|| SyscallCounter::start("-t", tid));
    let cpu0 = cpu_ticks("/proc/self/stat");
    let mut m = direct_loop_with(path, w, secs, Gen::new(w, image), kind)?;
    m.cpu_ticks = cpu_ticks("/proc/self/stat").zip(cpu0).map(|(a, b)| a - b);
    if let Some(c) = counter {
        m.syscalls = c.stop();
    }
    Ok(m)
}

/// The io_uring of a direct run.
pub(crate) fn direct_ring(entries: u32, kind: Direct) -> std::io::Result<io_uring::IoUring> {
    if kind != Direct::Legacy {
        let tuned = io_uring::IoUring::builder()
            .setup_coop_taskrun()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(entries);
        if let Ok(r) = tuned {
            return Ok(r);
        }
    }
    io_uring::IoUring::new(entries)
}

pub(crate) fn direct_loop(
    path: &Path,
    w: Workload,
    secs: f64,
    gen: Gen,
) -> anyhow::Result<Measured> {
    direct_loop_with(path, w, secs, gen, Direct::Tuned)
}

/// One io_uring kept `w.qd` deep on `path` for `secs`: the file registered, one clock
/// read per batch of submissions and one per batch of completions, no allocation in the
/// loop but the latency samples.
pub(crate) fn direct_loop_with(
    path: &Path,
    w: Workload,
    secs: f64,
    mut gen: Gen,
    kind: Direct,
) -> anyhow::Result<Measured> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc_o_direct())
        .open(path)?;
    let mut ring = match kind {
        Direct::Tuned | Direct::Batched => {
            direct_ring((w.qd as u32).next_power_of_two().max(8), kind)?
        }
        Direct::Legacy => direct_ring(64, kind)?,
    };
    let fixed = kind != Direct::Legacy && ring.submitter().register_files(&[f.as_raw_fd()]).is_ok();
    let mut enters = 0u64;
    let buf = Aligned::new(w.bs * w.qd);
    let mut started: Vec<Instant> = vec![Instant::now(); w.qd];
    let mut free: Vec<usize> = (0..w.qd).collect();
    let mut done: Vec<(u64, i32)> = Vec::with_capacity(w.qd);
    let mut m = Measured {
        lat_us: Vec::with_capacity((secs * 400_000.0).min(4e7) as usize),
        ..Measured::default()
    };
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    let mut now = t0;
    loop {
        if now < end {
            while let Some(i) = free.pop() {
                let (off, write) = gen.next();
                // SAFETY: slot i's part of `buf` belongs to this one operation until its CQE.
                let p = unsafe { buf.ptr.add(i * w.bs) };
                let e = match (fixed, write) {
                    (true, false) => {
                        io_uring::opcode::Read::new(io_uring::types::Fixed(0), p, w.bs as u32)
                            .offset(off)
                            .build()
                    }
                    (true, true) => {
                        io_uring::opcode::Write::new(io_uring::types::Fixed(0), p, w.bs as u32)
                            .offset(off)
                            .build()
                    }
                    (false, false) => io_uring::opcode::Read::new(
                        io_uring::types::Fd(f.as_raw_fd()),
                        p,
                        w.bs as u32,
                    )
                    .offset(off)
                    .build(),
                    (false, true) => io_uring::opcode::Write::new(
                        io_uring::types::Fd(f.as_raw_fd()),
                        p,
                        w.bs as u32,
                    )
                    .offset(off)
                    .build(),
                };
                started[i] = now;
                // SAFETY: the buffer outlives the operation (we wait for every CQE below).
                unsafe { ring.submission().push(&e.user_data(i as u64))? };
                if kind == Direct::Tuned {
                    enter(&ring, 1, 0)?;
                    enters += 1;
                }
            }
        }
        if free.len() == w.qd {
            break;
        }
        if kind != Direct::Tuned {
            ring.submit_and_wait(1)?;
            enters += 1;
        } else if ring.completion().is_empty() {
            enter(&ring, 0, 1)?;
            enters += 1;
        }
        done.clear();
        done.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        now = Instant::now();
        for &(i, res) in &done {
            let i = i as usize;
            if res != w.bs as i32 {
                bail!("direct I/O failed: {res}");
            }
            m.record(now - started[i], w.bs);
            free.push(i);
        }
    }
    m.elapsed = t0.elapsed();
    m.syscalls = Some(enters);
    Ok(m)
}

/// `IORING_ENTER_GETEVENTS` (`include/uapi/linux/io_uring.h`).
const IORING_ENTER_GETEVENTS: u32 = 1;

/// `io_uring_enter(to_submit, min_complete, IORING_ENTER_GETEVENTS)`: with deferred task
/// running, `GETEVENTS` is what posts finished requests to the completion ring.
fn enter(ring: &io_uring::IoUring, to_submit: u32, min_complete: u32) -> std::io::Result<usize> {
    // SAFETY: no argument structure is passed; the SQEs submitted were pushed with buffers
    // that outlive them (the loop waits for every CQE).
    unsafe {
        ring.submitter()
            .enter::<()>(to_submit, min_complete, IORING_ENTER_GETEVENTS, None)
    }
}

pub(crate) fn libc_o_direct() -> i32 {
    rustix::fs::OFlags::DIRECT.bits() as i32
}
