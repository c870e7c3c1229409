//! Grant mapping and copying: one suite written against `&dyn GrantMapper` and
//! `&dyn GrantCopier`, run on the simulation and, where `/dev/xen/gntdev` and
//! `/dev/xen/gntalloc` exist, on real Xen (dom0 granting to itself); then simulation-only
//! checks of Xen's exact statuses, revocation, unmap notify and domain destruction.

use std::path::Path;
use std::process::Command;

use sim::{ScratchDir, SimDomain, SimError, SimPlatform};
use xen::{
    Access, CopyOp, DomId, EventChannel, GrantAddr, GrantCopier, GrantError, GrantMapper, GrantRef,
    GrantStatus, Platform, UnmapNotify, GNTDEV_PATH,
};

/// A sim directory removed when the test ends.
fn sim_dir(name: &str) -> ScratchDir {
    ScratchDir::new(&format!("sim-{}-{name}", "grants")).expect("creating the sim directory")
}

/// The granting side, as the suite needs it.
trait Guest {
    fn domid(&self) -> DomId;
    /// Grants page `frame` to the backend. Each frame is granted at most once per suite test,
    /// before the guest touches it (gntalloc allocates the page with the grant).
    fn grant(&self, frame: u32, access: Access) -> GrantRef;
    fn write(&self, frame: u32, offset: usize, data: &[u8]);
    fn read(&self, frame: u32, offset: usize, len: usize) -> Vec<u8>;
}

struct SimGuest {
    dom: SimDomain,
    backend: DomId,
}

impl Guest for SimGuest {
    fn domid(&self) -> DomId {
        self.dom.domid()
    }

    fn grant(&self, frame: u32, access: Access) -> GrantRef {
        self.dom.grant(self.backend, frame, access).expect("grant")
    }

    fn write(&self, frame: u32, offset: usize, data: &[u8]) {
        self.dom
            .page(frame)
            .unwrap()
            .write_from(offset, data)
            .unwrap();
    }

    fn read(&self, frame: u32, offset: usize, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.dom
            .page(frame)
            .unwrap()
            .read_into(offset, &mut v)
            .unwrap();
        v
    }
}

struct Ctx<'a> {
    mapper: &'a dyn GrantMapper,
    copier: &'a dyn GrantCopier,
    guest: &'a dyn Guest,
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..4096u32)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn suite_map_shares_memory_both_ways(c: &Ctx<'_>) {
    let g = c.guest;
    let refs = [g.grant(1, Access::ReadWrite), g.grant(2, Access::ReadWrite)];
    g.write(1, 0, &pattern(1));
    g.write(2, 0, &pattern(2));
    let m = c
        .mapper
        .map(g.domid(), &refs, Access::ReadWrite)
        .expect("map");
    assert_eq!(m.pages(), 2);
    let mut got = vec![0; 8192];
    m.mem().read_into(0, &mut got).unwrap();
    assert_eq!(&got[..4096], &pattern(1)[..], "first ref is the first page");
    assert_eq!(&got[4096..], &pattern(2)[..]);
    m.writable()
        .unwrap()
        .write_from(4096 + 100, b"from the backend")
        .unwrap();
    assert_eq!(g.read(2, 100, 16), b"from the backend");
    g.write(1, 7, b"guest");
    let mut b = [0u8; 5];
    m.mem().read_into(7, &mut b).unwrap();
    assert_eq!(&b, b"guest", "the mapping is the guest's page, not a copy");
}

fn suite_readonly_grants_map_readonly_only(c: &Ctx<'_>) {
    let g = c.guest;
    let r = g.grant(3, Access::ReadOnly);
    g.write(3, 0, &pattern(3));
    assert!(
        c.mapper.map(g.domid(), &[r], Access::ReadWrite).is_err(),
        "writable map of a read-only grant"
    );
    let m = c
        .mapper
        .map(g.domid(), &[r], Access::ReadOnly)
        .expect("read-only map");
    assert_eq!(m.access(), Access::ReadOnly);
    let mut got = vec![0; 4096];
    m.mem().read_into(0, &mut got).unwrap();
    assert_eq!(got, pattern(3));
    assert!(
        m.writable().is_none(),
        "safe code gets no writable view of a read-only mapping"
    );
}

fn suite_map_batch_with_a_bad_ref_fails_whole(c: &Ctx<'_>) {
    let g = c.guest;
    let good1 = g.grant(4, Access::ReadWrite);
    let good2 = g.grant(5, Access::ReadWrite);
    let never_granted = good2 + 100;
    assert!(c
        .mapper
        .map(g.domid(), &[good1, never_granted, good2], Access::ReadWrite)
        .is_err());
    // Nothing stayed mapped: the good refs map again.
    let m = c
        .mapper
        .map(g.domid(), &[good1, good2], Access::ReadWrite)
        .expect("map after failure");
    assert_eq!(m.pages(), 2);
}

fn suite_copy_batch_with_bad_segments(c: &Ctx<'_>) {
    let g = c.guest;
    let src = g.grant(6, Access::ReadOnly);
    let dst = g.grant(7, Access::ReadWrite);
    let ro = g.grant(8, Access::ReadOnly);
    g.write(6, 0, &pattern(6));
    g.write(7, 0, &pattern(7));
    let bad = dst + 100;
    let d = g.domid();
    let at = |gref, offset| GrantAddr {
        domid: d,
        gref,
        offset,
    };
    let (mut a, mut b) = (vec![0xee; 100], vec![0xee; 100]);
    let (w1, w2) = (vec![0x11; 50], vec![0x22; 50]);
    let mut ops = [
        CopyOp::FromGuest {
            src: at(src, 10),
            dst: &mut a,
            status: GrantStatus::GeneralError,
        },
        CopyOp::FromGuest {
            src: at(bad, 10),
            dst: &mut b,
            status: GrantStatus::Okay,
        },
        CopyOp::ToGuest {
            src: &w1,
            dst: at(dst, 4000),
            status: GrantStatus::GeneralError,
        },
        CopyOp::ToGuest {
            src: &w2,
            dst: at(ro, 0),
            status: GrantStatus::Okay,
        },
    ];
    c.copier
        .copy(&mut ops)
        .expect("the batch as a whole succeeds");
    let st: Vec<GrantStatus> = ops.iter().map(CopyOp::status).collect();
    assert_eq!(st[0], GrantStatus::Okay);
    assert_ne!(st[1], GrantStatus::Okay, "never-granted ref");
    assert_eq!(st[2], GrantStatus::Okay);
    assert_ne!(st[3], GrantStatus::Okay, "write to a read-only grant");
    assert_eq!(a, pattern(6)[10..110].to_vec());
    assert_eq!(b, vec![0xee; 100], "failed segment left the buffer alone");
    assert_eq!(g.read(7, 4000, 50), vec![0x11; 50]);
    assert_eq!(
        g.read(7, 3990, 10),
        pattern(7)[3990..4000].to_vec(),
        "bytes before untouched"
    );
    assert_eq!(
        g.read(7, 4050, 46),
        pattern(7)[4050..].to_vec(),
        "bytes after untouched"
    );
    assert_eq!(g.read(8, 0, 50), vec![0; 50], "read-only page unchanged");
}

fn suite_copy_refuses_bad_lengths(c: &Ctx<'_>) {
    let g = c.guest;
    let r = g.grant(9, Access::ReadWrite);
    let at = GrantAddr {
        domid: g.domid(),
        gref: r,
        offset: 4000,
    };
    assert!(
        matches!(
            copy_one(c.copier, at, &mut [0; 100]),
            Err(GrantError::Invalid(_))
        ),
        "crosses the page"
    );
    let at0 = GrantAddr { offset: 0, ..at };
    assert!(
        matches!(
            copy_one(c.copier, at0, &mut []),
            Err(GrantError::Invalid(_))
        ),
        "zero length"
    );
}

fn suite_unknown_domain(c: &Ctx<'_>) {
    let nobody: DomId = 0x7fe0;
    let src = GrantAddr {
        domid: nobody,
        gref: 8,
        offset: 0,
    };
    assert_eq!(
        copy_one(c.copier, src, &mut [0; 8]).expect("batch"),
        GrantStatus::BadDomain
    );
    assert!(c.mapper.map(nobody, &[8], Access::ReadOnly).is_err());
}

type Suite = fn(&Ctx<'_>);
const SUITE: &[(&str, Suite)] = &[
    (
        "map_shares_memory_both_ways",
        suite_map_shares_memory_both_ways,
    ),
    (
        "readonly_grants_map_readonly_only",
        suite_readonly_grants_map_readonly_only,
    ),
    (
        "map_batch_with_a_bad_ref_fails_whole",
        suite_map_batch_with_a_bad_ref_fails_whole,
    ),
    (
        "copy_batch_with_bad_segments",
        suite_copy_batch_with_bad_segments,
    ),
    ("copy_refuses_bad_lengths", suite_copy_refuses_bad_lengths),
    ("unknown_domain", suite_unknown_domain),
];

/// A guest domain 5 with 16 pages, and the backend platform of dom0.
fn sim_setup(dir: &Path) -> (SimDomain, SimPlatform) {
    let dom = SimDomain::create(dir, 5, 16).expect("create domain");
    let backend = SimPlatform::open(dir, 0).expect("platform");
    (dom, backend)
}

#[test]
fn suite_on_simulation() {
    for (name, test) in SUITE {
        let dir = sim_dir(name);
        let (dom, backend) = sim_setup(dir.path());
        let guest = SimGuest { dom, backend: 0 };
        test(&Ctx {
            mapper: backend.grant_mapper(),
            copier: backend.grant_copier(),
            guest: &guest,
        });
    }
}

#[test]
fn suite_on_real_device() {
    if !Path::new(GNTDEV_PATH).exists() || !Path::new(gntalloc::PATH).exists() {
        sim::skip::report_skip(&format!("needs Xen: {GNTDEV_PATH} and {}", gntalloc::PATH));
        return;
    }
    let gntdev = xen::Gntdev::open().expect("open gntdev");
    for (name, test) in SUITE {
        eprintln!("real gntdev: {name}");
        let guest = gntalloc::Dom0Guest::open().expect("open gntalloc");
        test(&Ctx {
            mapper: &gntdev,
            copier: &gntdev,
            guest: &guest,
        });
    }
}

/// The real granting side for the suite: dom0 grants its own pages to itself through
/// `/dev/xen/gntalloc` (what libxengntshr does). Only compiled here: this host has no Xen.
mod gntalloc {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::os::fd::{AsFd, OwnedFd};
    use std::ptr::NonNull;

    use rustix::fs::{Mode, OFlags};
    use rustix::ioctl::{opcode, Direction, Ioctl, IoctlOutput, Opcode};
    use rustix::mm::{MapFlags, ProtFlags};
    use shmem::SharedMem;
    use xen::{Access, DomId, GrantRef};

    pub const PATH: &str = "/dev/xen/gntalloc";

    /// `struct ioctl_gntalloc_alloc_gref` with one ref.
    #[repr(C)]
    struct AllocGref {
        domid: u16,
        flags: u16,
        count: u32,
        index: u64,
        gref_ids: [u32; 1],
    }

    /// `struct ioctl_gntalloc_dealloc_gref`.
    #[repr(C)]
    #[allow(dead_code)] // Read by the kernel.
    struct DeallocGref {
        index: u64,
        count: u32,
    }

    const ALLOC: Opcode = opcode::from_components(Direction::None, b'G', 5, size_of::<AllocGref>());
    const DEALLOC: Opcode =
        opcode::from_components(Direction::None, b'G', 6, size_of::<DeallocGref>());
    const GNTALLOC_FLAG_WRITABLE: u16 = 1;

    struct Call(Opcode, *mut std::ffi::c_void);

    // SAFETY: used only with the gntalloc requests above and pointers to their structs.
    unsafe impl Ioctl for Call {
        type Output = ();
        const IS_MUTATING: bool = true;
        fn opcode(&self) -> Opcode {
            self.0
        }
        fn as_ptr(&mut self) -> *mut std::ffi::c_void {
            self.1
        }
        unsafe fn output_from_ptr(
            _: IoctlOutput,
            _: *mut std::ffi::c_void,
        ) -> rustix::io::Result<()> {
            Ok(())
        }
    }

    pub struct Dom0Guest {
        fd: OwnedFd,
        pages: RefCell<HashMap<u32, NonNull<u8>>>,
    }

    impl Dom0Guest {
        pub fn open() -> std::io::Result<Self> {
            let fd = rustix::fs::open(PATH, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())?;
            Ok(Self {
                fd,
                pages: RefCell::new(HashMap::new()),
            })
        }

        fn page(&self, frame: u32) -> SharedMem<'_> {
            let p = self.pages.borrow()[&frame];
            // SAFETY: the page stays mapped until self is dropped, which the view's lifetime
            // forbids while the view exists.
            unsafe { SharedMem::from_raw(p, 4096) }
        }
    }

    impl super::Guest for Dom0Guest {
        fn domid(&self) -> DomId {
            0
        }

        fn grant(&self, frame: u32, access: Access) -> GrantRef {
            let flags = if access == Access::ReadWrite {
                GNTALLOC_FLAG_WRITABLE
            } else {
                0
            };
            let mut a = AllocGref {
                domid: 0,
                flags,
                count: 1,
                index: 0,
                gref_ids: [0],
            };
            // SAFETY: ALLOC_GREF takes a struct ioctl_gntalloc_alloc_gref with `count` (1) ids.
            unsafe { rustix::ioctl::ioctl(&self.fd, Call(ALLOC, (&raw mut a).cast())) }
                .expect("alloc gref");
            // SAFETY: a fresh shared mapping of the page just allocated at `index`.
            let p = unsafe {
                rustix::mm::mmap(
                    std::ptr::null_mut(),
                    4096,
                    ProtFlags::READ | ProtFlags::WRITE,
                    MapFlags::SHARED,
                    self.fd.as_fd(),
                    a.index,
                )
            }
            .expect("mmap gntalloc page");
            let mut d = DeallocGref {
                index: a.index,
                count: 1,
            };
            // SAFETY: DEALLOC_GREF takes a struct ioctl_gntalloc_dealloc_gref; the page lives
            // on until munmap, as in libxengntshr.
            unsafe { rustix::ioctl::ioctl(&self.fd, Call(DEALLOC, (&raw mut d).cast())) }
                .expect("dealloc gref");
            self.pages
                .borrow_mut()
                .insert(frame, NonNull::new(p.cast()).expect("non-null"));
            a.gref_ids[0]
        }

        fn write(&self, frame: u32, offset: usize, data: &[u8]) {
            self.page(frame).write_from(offset, data).unwrap();
        }

        fn read(&self, frame: u32, offset: usize, len: usize) -> Vec<u8> {
            let mut v = vec![0; len];
            self.page(frame).read_into(offset, &mut v).unwrap();
            v
        }
    }

    impl Drop for Dom0Guest {
        fn drop(&mut self) {
            for p in self.pages.borrow().values() {
                // SAFETY: each page is a 4096-byte mapping made in `grant`, unmapped once.
                let _ = unsafe { rustix::mm::munmap(p.as_ptr().cast(), 4096) };
            }
        }
    }
}

// ---- Simulation only: Xen's exact statuses and the guest side's view. ----

fn map_status(
    backend: &SimPlatform,
    domid: DomId,
    refs: &[GrantRef],
    access: Access,
) -> GrantStatus {
    match backend.grant_mapper().map(domid, refs, access) {
        Ok(_) => GrantStatus::Okay,
        Err(GrantError::Status(st)) => st,
        Err(e) => panic!("unexpected error {e}"),
    }
}

fn copy_status(backend: &SimPlatform, src: GrantAddr) -> GrantStatus {
    copy_one(backend.grant_copier(), src, &mut [0; 16]).expect("batch")
}

/// Copies from `src` into `dst` as a batch of one: the batch's error, or the copy's status.
fn copy_one(
    copier: &dyn GrantCopier,
    src: GrantAddr,
    dst: &mut [u8],
) -> Result<GrantStatus, GrantError> {
    let mut ops = [CopyOp::FromGuest {
        src,
        dst,
        status: GrantStatus::Okay,
    }];
    copier.copy(&mut ops)?;
    Ok(ops[0].status())
}

#[test]
fn bad_grants_get_xens_statuses() {
    let dir = sim_dir("statuses");
    let (dom, backend) = sim_setup(dir.path());
    let at = |gref| GrantAddr {
        domid: 5,
        gref,
        offset: 0,
    };
    // Never granted, granted to another domain, read-only for a write, revoked: Xen's
    // _set_status_v1 answers GNTST_general_error for each.
    let to_other = dom.grant(9, 1, Access::ReadWrite).unwrap();
    let ro = dom.grant(0, 2, Access::ReadOnly).unwrap();
    let revoked = dom.grant(0, 3, Access::ReadWrite).unwrap();
    dom.end_access(revoked).unwrap();
    let never = ro + 50;
    for gref in [never, to_other, revoked] {
        assert_eq!(
            map_status(&backend, 5, &[gref], Access::ReadOnly),
            GrantStatus::GeneralError,
            "ref {gref}"
        );
        assert_eq!(
            copy_status(&backend, at(gref)),
            GrantStatus::GeneralError,
            "ref {gref}"
        );
    }
    assert_eq!(
        map_status(&backend, 5, &[ro], Access::ReadWrite),
        GrantStatus::GeneralError
    );
    assert_eq!(
        map_status(&backend, 5, &[ro], Access::ReadOnly),
        GrantStatus::Okay
    );
    // Beyond the table: GNTST_bad_gntref. Unknown domain: GNTST_bad_domain.
    let beyond = dom.grant_entries();
    assert_eq!(
        map_status(&backend, 5, &[beyond], Access::ReadOnly),
        GrantStatus::BadGntref
    );
    assert_eq!(copy_status(&backend, at(u32::MAX)), GrantStatus::BadGntref);
    assert_eq!(
        map_status(&backend, 77, &[8], Access::ReadOnly),
        GrantStatus::BadDomain
    );
    // Domain 9 may use the grant made to it, and only that one.
    let other = SimPlatform::open(dir.path(), 9).unwrap();
    assert_eq!(
        map_status(&other, 5, &[to_other], Access::ReadWrite),
        GrantStatus::Okay
    );
    assert_eq!(
        map_status(&other, 5, &[ro], Access::ReadOnly),
        GrantStatus::GeneralError
    );
    assert!(matches!(
        dom.grant(0, 16, Access::ReadOnly),
        Err(SimError::BadFrame(16))
    ));
}

#[test]
fn failed_batch_map_leaves_nothing_pinned() {
    let dir = sim_dir("batch");
    let (dom, backend) = sim_setup(dir.path());
    let a = dom.grant(0, 1, Access::ReadWrite).unwrap();
    let b = dom.grant(0, 2, Access::ReadWrite).unwrap();
    let ro = dom.grant(0, 3, Access::ReadOnly).unwrap();
    assert_eq!(
        map_status(&backend, 5, &[a, ro, b], Access::ReadWrite),
        GrantStatus::GeneralError
    );
    for r in [a, b, ro] {
        assert!(!dom.grant_in_use(r), "ref {r} left pinned");
    }
    dom.end_access(a).expect("a is free to revoke");
}

#[test]
fn end_access_fails_while_mapped() {
    let dir = sim_dir("endaccess");
    let (dom, backend) = sim_setup(dir.path());
    let r = dom.grant(0, 1, Access::ReadWrite).unwrap();
    let rw = backend
        .grant_mapper()
        .map(5, &[r], Access::ReadWrite)
        .unwrap();
    let ro = backend
        .grant_mapper()
        .map(5, &[r], Access::ReadOnly)
        .unwrap();
    assert!(dom.grant_in_use(r));
    assert!(matches!(dom.end_access(r), Err(SimError::GrantInUse(x)) if x == r));
    drop(rw);
    assert!(
        matches!(dom.end_access(r), Err(SimError::GrantInUse(_))),
        "still mapped read-only"
    );
    drop(ro);
    assert!(!dom.grant_in_use(r));
    dom.end_access(r).expect("end access once unmapped");
    assert_eq!(
        map_status(&backend, 5, &[r], Access::ReadOnly),
        GrantStatus::GeneralError,
        "revoked"
    );
    assert!(
        matches!(dom.end_access(r), Err(SimError::BadGrant(_))),
        "ended twice"
    );
    // A copy pins only while it copies.
    let r2 = dom.grant(0, 2, Access::ReadWrite).unwrap();
    assert_eq!(
        copy_status(
            &backend,
            GrantAddr {
                domid: 5,
                gref: r2,
                offset: 0
            }
        ),
        GrantStatus::Okay
    );
    dom.end_access(r2).expect("not pinned after the copy");
}

#[test]
fn full_grant_table_and_reuse() {
    let dir = sim_dir("full");
    let dom = SimDomain::create_with_grants(dir.path(), 6, 1, 10).unwrap();
    let a = dom.grant(0, 0, Access::ReadOnly).unwrap();
    let b = dom.grant(0, 0, Access::ReadOnly).unwrap();
    assert_eq!(
        (a, b),
        (8, 9),
        "the first 8 refs are reserved, as in Linux guests"
    );
    assert!(matches!(
        dom.grant(0, 0, Access::ReadOnly),
        Err(SimError::NoFreeGrant)
    ));
    dom.end_access(a).unwrap();
    assert_eq!(dom.grant(0, 0, Access::ReadOnly).unwrap(), a);
}

#[test]
fn unmap_notify_clears_the_byte_and_sends_the_event() {
    let dir = sim_dir("notify");
    let (dom, backend) = sim_setup(dir.path());
    let mut front = dom.open_event_channel().unwrap();
    let fport = front.alloc_unbound(0).unwrap();
    let mut back = backend.open_event_channel().unwrap();
    let bport = back.bind_interdomain(5, fport).unwrap();
    let r = dom.grant(0, 1, Access::ReadWrite).unwrap();
    dom.page(1).unwrap().write_u8(10, 0xff).unwrap();
    let m = backend
        .grant_mapper()
        .map(5, &[r], Access::ReadWrite)
        .unwrap();
    let notify = UnmapNotify {
        clear_byte: Some(10),
        send_event: Some(bport),
    };
    let too_far = UnmapNotify {
        clear_byte: Some(4096),
        send_event: None,
    };
    assert!(matches!(
        backend.grant_mapper().set_unmap_notify(&m, too_far),
        Err(GrantError::Invalid(_))
    ));
    backend.grant_mapper().set_unmap_notify(&m, notify).unwrap();
    let mut out = Vec::new();
    front.pending(&mut out).unwrap();
    assert_eq!(out, vec![], "no event before the unmap");
    drop(m);
    assert_eq!(dom.page(1).unwrap().read_u8(10).unwrap(), 0, "byte cleared");
    front.pending(&mut out).unwrap();
    assert_eq!(out, vec![fport], "event sent");
    // A read-only mapping has no byte to clear.
    let rom = backend
        .grant_mapper()
        .map(5, &[r], Access::ReadOnly)
        .unwrap();
    let clear = UnmapNotify {
        clear_byte: Some(0),
        send_event: None,
    };
    assert!(backend
        .grant_mapper()
        .set_unmap_notify(&rom, clear)
        .is_err());
}

#[test]
fn destroyed_domain_fails_new_grant_operations_only() {
    let dir = sim_dir("destroy");
    let (dom, backend) = sim_setup(dir.path());
    let r = dom.grant(0, 1, Access::ReadWrite).unwrap();
    let r2 = dom.grant(0, 2, Access::ReadWrite).unwrap();
    dom.page(1).unwrap().write_from(0, b"still here").unwrap();
    let m = backend
        .grant_mapper()
        .map(5, &[r], Access::ReadWrite)
        .unwrap();
    dom.destroy().unwrap();
    let mut b = [0u8; 10];
    m.mem().read_into(0, &mut b).unwrap();
    assert_eq!(
        &b, b"still here",
        "a dying domain's mapped pages stay until unmapped"
    );
    m.writable().unwrap().write_u8(0, 1).unwrap();
    assert_eq!(
        map_status(&backend, 5, &[r2], Access::ReadOnly),
        GrantStatus::BadDomain
    );
    assert_eq!(
        copy_status(
            &backend,
            GrantAddr {
                domid: 5,
                gref: r2,
                offset: 0
            }
        ),
        GrantStatus::BadDomain
    );
    drop(m);
    assert!(matches!(
        SimDomain::open(dir.path(), 5),
        Err(SimError::NoDomain(5))
    ));
    // The domid can be used again, and the backend sees the new domain, not the old one.
    let again = SimDomain::create(dir.path(), 5, 4).unwrap();
    let r3 = again.grant(0, 3, Access::ReadOnly).unwrap();
    assert_eq!(
        map_status(&backend, 5, &[r3], Access::ReadOnly),
        GrantStatus::Okay
    );
}

const CHILD_ENV: &str = "XEN_GRANTS_TEST_CHILD";

#[test]
fn readonly_mapping_faults_on_write() {
    let dir = sim_dir("rofault");
    let (dom, _backend) = sim_setup(dir.path());
    let r = dom.grant(0, 1, Access::ReadOnly).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "readonly_mapping_write_child",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_ENV, format!("{}:{r}", dir.path().display()))
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(rustix::process::Signal::SEGV.as_raw()),
        "child should die writing to a read-only grant mapping; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        dom.page(1).unwrap().read_u8(0).unwrap(),
        0,
        "page unchanged"
    );
}

#[test]
#[ignore = "child process of readonly_mapping_faults_on_write"]
fn readonly_mapping_write_child() {
    let arg = std::env::var(CHILD_ENV).expect("run by readonly_mapping_faults_on_write");
    let (dir, gref) = arg.rsplit_once(':').unwrap();
    let backend = SimPlatform::open(Path::new(dir), 0).unwrap();
    let m = backend
        .grant_mapper()
        .map(5, &[gref.parse().unwrap()], Access::ReadOnly)
        .unwrap();
    m.mem().read_u8(0).unwrap();
    assert!(
        m.writable().is_none(),
        "no writable view of a read-only mapping"
    );
    eprintln!("mapped read-only; writing");
    let p = m.mem().as_ptr().cast_mut();
    // SAFETY: none: this child writes to a read-only mapping on purpose, to show that the
    // page tables refuse it (it dies of SIGSEGV before the write lands); safe code cannot.
    unsafe { std::ptr::write_volatile(p, 0x42) };
    eprintln!("write to a read-only mapping did not fault");
    std::process::exit(0);
}

#[test]
fn end_access_never_succeeds_while_mapped_under_contention() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let dir = sim_dir("race");
    let (dom, backend) = sim_setup(dir.path());
    let r = dom.grant(0, 1, Access::ReadWrite).unwrap();
    let holders = AtomicUsize::new(0);
    let revoked = AtomicBool::new(false);
    let maps = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..4 {
            let (backend, holders, revoked, maps) = (&backend, &holders, &revoked, &maps);
            s.spawn(move || {
                let access = if t % 2 == 0 {
                    Access::ReadWrite
                } else {
                    Access::ReadOnly
                };
                loop {
                    match backend.grant_mapper().map(5, &[r], access) {
                        Ok(m) => {
                            holders.fetch_add(1, Ordering::SeqCst);
                            assert!(!revoked.load(Ordering::SeqCst), "mapped after revocation");
                            maps.fetch_add(1, Ordering::Relaxed);
                            m.mem().read_u8(0).unwrap();
                            holders.fetch_sub(1, Ordering::SeqCst);
                        }
                        Err(GrantError::Status(GrantStatus::GeneralError)) => return,
                        Err(e) => panic!("unexpected {e}"),
                    }
                }
            });
        }
        // Let the mappers get going, then revoke as soon as the grant is momentarily unused.
        while maps.load(Ordering::Relaxed) < 200 {
            std::thread::yield_now();
        }
        loop {
            match dom.end_access(r) {
                Ok(()) => {
                    revoked.store(true, Ordering::SeqCst);
                    assert_eq!(holders.load(Ordering::SeqCst), 0, "revoked while mapped");
                    break;
                }
                Err(SimError::GrantInUse(_)) => std::thread::yield_now(),
                Err(e) => panic!("unexpected {e}"),
            }
        }
    });
    assert!(!dom.grant_in_use(r));
}
