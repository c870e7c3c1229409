//! Every validation rule at its boundaries, in every ABI; each outcome is also checked
//! against the independent model in `common/model.rs`.

mod common;

use common::model::{model, run_parse};
use common::{limits, page};
use ring::*;

const ABIS: [Abi; 3] = [Abi::Native, Abi::X86_32, Abi::X86_64];

fn run_raw(
    raw: &RawRequest,
    limits: &DeviceLimits,
    pages: &[IndirectPage],
) -> Result<Request, Rejection> {
    let got = run_parse(raw, limits, pages);
    assert_eq!(
        got,
        model(raw.abi(), raw.as_bytes(), limits, pages),
        "model disagrees"
    );
    got
}

fn run(
    abi: Abi,
    req: &FrontRequest<'_>,
    limits: &DeviceLimits,
    pages: &[IndirectPage],
) -> Result<Request, Rejection> {
    run_raw(&req.encode(abi).unwrap(), limits, pages)
}

fn rw(operation: u8, sector: u64, segs: &[Segment]) -> FrontRequest<'_> {
    FrontRequest::Direct {
        operation,
        id: 0x1122_3344_5566_7788,
        sector,
        handle: 0,
        segs,
    }
}

fn reason(r: Result<Request, Rejection>) -> RejectReason {
    r.expect_err("expected a rejection").reason
}

/// A direct request with `nr_segments` overwritten (encode refuses more than 11).
fn with_nseg(abi: Abi, nseg: u8) -> RawRequest {
    let segs = [page(1); 11];
    let raw = rw(OP_READ, 0, &segs).encode(abi).unwrap();
    let mut b = raw.as_bytes().to_vec();
    b[1] = nseg;
    RawRequest::from_bytes(abi, &b).unwrap()
}

#[test]
fn segment_count_of_direct_requests() {
    for abi in ABIS {
        let l = limits();
        for op in [OP_READ, OP_WRITE] {
            assert_eq!(
                reason(run(abi, &rw(op, 0, &[]), &l, &[])),
                RejectReason::SegmentCount {
                    nr_segments: 0,
                    max: 11
                }
            );
        }
        let r = run(abi, &rw(OP_READ, 0, &[page(9)]), &l, &[]).unwrap();
        let Op::Read(t) = &r.op else { panic!("{r:?}") };
        assert_eq!(
            (t.sector, t.nr_sectors, t.segs.as_slice()),
            (Sector(0), 8, &[page(9)][..])
        );
        assert_eq!(r.id, 0x1122_3344_5566_7788);

        let segs: Vec<Segment> = (0..11).map(page).collect();
        let r = run(abi, &rw(OP_WRITE, 16, &segs), &l, &[]).unwrap();
        let Op::Write {
            transfer,
            flush: None,
        } = &r.op
        else {
            panic!("{r:?}")
        };
        assert_eq!(transfer.nr_sectors, 88);
        assert_eq!(transfer.segs.as_slice(), &segs[..]);

        assert!(run_raw(&with_nseg(abi, 11), &l, &[]).is_ok());
        for n in [12, 255] {
            let rej = run_raw(&with_nseg(abi, n), &l, &[]).unwrap_err();
            assert_eq!(
                rej.reason,
                RejectReason::SegmentCount {
                    nr_segments: n.into(),
                    max: 11
                }
            );
            assert_eq!(rej.status, Status::Error);
            assert_eq!((rej.id, rej.operation), (0x1122_3344_5566_7788, OP_READ));
        }
    }
}

#[test]
fn flush_and_barrier_with_and_without_data() {
    for abi in ABIS {
        let l = limits();
        let r = run(abi, &rw(OP_FLUSH_DISKCACHE, 0, &[]), &l, &[]).unwrap();
        assert_eq!(
            (r.op, r.operation),
            (Op::Flush(FlushKind::Cache), OP_FLUSH_DISKCACHE)
        );
        let r = run(abi, &rw(OP_WRITE_BARRIER, 0, &[]), &l, &[]).unwrap();
        assert_eq!(r.op, Op::Flush(FlushKind::Barrier));
        // With no data, the sector is not range-checked (Linux skips the check for 0 sectors).
        assert!(run(abi, &rw(OP_FLUSH_DISKCACHE, u64::MAX, &[]), &l, &[]).is_ok());

        let r = run(abi, &rw(OP_WRITE_BARRIER, 8, &[page(3)]), &l, &[]).unwrap();
        let Op::Write {
            transfer,
            flush: Some(FlushKind::Barrier),
        } = &r.op
        else {
            panic!()
        };
        assert_eq!(transfer.nr_sectors, 8);
        let r = run(abi, &rw(OP_FLUSH_DISKCACHE, 8, &[page(3)]), &l, &[]).unwrap();
        assert!(matches!(
            r.op,
            Op::Write {
                flush: Some(FlushKind::Cache),
                ..
            }
        ));
        // Data carried by a flush is validated like any write.
        let bad = Segment {
            gref: 3,
            first_sect: 0,
            last_sect: 8,
        };
        assert!(matches!(
            reason(run(abi, &rw(OP_FLUSH_DISKCACHE, 8, &[bad]), &l, &[])),
            RejectReason::Segment { .. }
        ));
    }
}

#[test]
fn segment_sectors_within_one_page() {
    for abi in ABIS {
        let l = limits();
        let seg = |first_sect, last_sect| Segment {
            gref: 5,
            first_sect,
            last_sect,
        };
        assert!(run(abi, &rw(OP_READ, 0, &[seg(0, 7)]), &l, &[]).is_ok());
        assert!(run(abi, &rw(OP_READ, 0, &[seg(7, 7)]), &l, &[]).is_ok());
        assert!(run(abi, &rw(OP_READ, 0, &[seg(3, 3)]), &l, &[]).is_ok());
        for (i, (f, la)) in [(0, 8), (8, 8), (0, 255), (5, 4), (255, 0)]
            .into_iter()
            .enumerate()
        {
            let segs = [page(1), seg(f, la)];
            assert_eq!(
                reason(run(abi, &rw(OP_WRITE, 0, &segs), &l, &[])),
                RejectReason::Segment {
                    index: 1,
                    first_sect: f,
                    last_sect: la
                },
                "case {i}"
            );
        }
        // Lengths add up across partial segments.
        let r = run(abi, &rw(OP_READ, 0, &[seg(2, 7), seg(0, 0)]), &l, &[]).unwrap();
        let Op::Read(t) = r.op else { panic!() };
        assert_eq!(t.nr_sectors, 7);
    }
}

#[test]
fn sector_range_against_the_device() {
    for abi in ABIS {
        let mut l = limits();
        let end = l.sectors;
        assert!(
            run(abi, &rw(OP_READ, end - 8, &[page(1)]), &l, &[]).is_ok(),
            "ends exactly at the end"
        );
        assert_eq!(
            reason(run(abi, &rw(OP_READ, end - 7, &[page(1)]), &l, &[])),
            RejectReason::BeyondEnd {
                sector: end - 7,
                nr_sectors: 8,
                device_sectors: end
            }
        );
        assert!(matches!(
            reason(run(abi, &rw(OP_WRITE, end, &[page(1)]), &l, &[])),
            RejectReason::BeyondEnd { .. }
        ));
        // Wrapping past u64::MAX is caught even on a device as large as the sector space.
        l.sectors = u64::MAX;
        assert!(run(abi, &rw(OP_READ, u64::MAX - 8, &[page(1)]), &l, &[]).is_ok());
        assert_eq!(
            reason(run(abi, &rw(OP_READ, u64::MAX - 7, &[page(1)]), &l, &[])),
            RejectReason::Wraps {
                sector: u64::MAX - 7,
                nr_sectors: 8
            },
            "the first sector whose end wraps"
        );
        assert_eq!(
            reason(run(abi, &rw(OP_READ, u64::MAX - 3, &[page(1)]), &l, &[])),
            RejectReason::Wraps {
                sector: u64::MAX - 3,
                nr_sectors: 8
            }
        );
        let segs = [page(1); 11];
        assert_eq!(
            reason(run(abi, &rw(OP_WRITE, u64::MAX, &segs), &l, &[])),
            RejectReason::Wraps {
                sector: u64::MAX,
                nr_sectors: 88
            }
        );
    }
}

#[test]
fn alignment_on_a_4096_byte_sector_device() {
    for abi in ABIS {
        let l = DeviceLimits {
            logical_block_size: 4096,
            ..limits()
        };
        let mis = |what| RejectReason::Misaligned {
            what,
            logical_block_size: 4096,
        };
        assert!(run(abi, &rw(OP_READ, 8, &[page(1), page(2)]), &l, &[]).is_ok());
        assert_eq!(
            reason(run(abi, &rw(OP_READ, 1, &[page(1)]), &l, &[])),
            mis(Misalignment::Sector)
        );
        assert_eq!(
            reason(run(abi, &rw(OP_READ, 4, &[page(1)]), &l, &[])),
            mis(Misalignment::Sector)
        );
        let short = Segment {
            gref: 1,
            first_sect: 0,
            last_sect: 3,
        };
        assert_eq!(
            reason(run(abi, &rw(OP_WRITE, 8, &[page(1), short]), &l, &[])),
            mis(Misalignment::Length)
        );
        let shifted = Segment {
            gref: 1,
            first_sect: 1,
            last_sect: 7,
        };
        assert_eq!(
            reason(run(abi, &rw(OP_READ, 0, &[shifted]), &l, &[])),
            mis(Misalignment::Offset)
        );
        let rej = run(abi, &rw(OP_READ, 0, &[shifted]), &l, &[]).unwrap_err();
        assert_eq!(rej.status, Status::Error);

        // 2048-byte sectors: offset 4 with 4 sectors is aligned, offset 2 is not.
        let l = DeviceLimits {
            logical_block_size: 2048,
            ..limits()
        };
        let seg = |first_sect, last_sect| Segment {
            gref: 1,
            first_sect,
            last_sect,
        };
        assert!(run(abi, &rw(OP_READ, 4, &[seg(4, 7), seg(0, 3)]), &l, &[]).is_ok());
        assert_eq!(
            reason(run(abi, &rw(OP_READ, 4, &[seg(2, 5)]), &l, &[])),
            RejectReason::Misaligned {
                what: Misalignment::Offset,
                logical_block_size: 2048
            }
        );
        // No data, nothing to align.
        assert!(run(abi, &rw(OP_FLUSH_DISKCACHE, 3, &[]), &l, &[]).is_ok());

        // Not a power of two (no real device, but no panic and no wrong mask either).
        let odd = DeviceLimits {
            logical_block_size: 1536,
            ..limits()
        };
        assert!(run(abi, &rw(OP_READ, 3, &[seg(3, 5)]), &odd, &[]).is_ok());
        assert_eq!(
            reason(run(abi, &rw(OP_READ, 4, &[seg(3, 5)]), &odd, &[])),
            RejectReason::Misaligned {
                what: Misalignment::Sector,
                logical_block_size: 1536
            }
        );
        let tiny = DeviceLimits {
            logical_block_size: 0,
            ..limits()
        };
        assert!(run(abi, &rw(OP_READ, 1, &[seg(1, 1)]), &tiny, &[]).is_ok());
    }
}

#[test]
fn unknown_operations_are_not_supported() {
    for abi in ABIS {
        for op in [OP_RESERVED_1, 7, 8, 100, 255] {
            let rej = run(abi, &rw(op, 0, &[page(1)]), &limits(), &[]).unwrap_err();
            assert_eq!(rej.reason, RejectReason::UnknownOperation(op));
            assert_eq!(rej.status, Status::NotSupported);
            assert_eq!(
                rej.response(),
                Response {
                    id: 0x1122_3344_5566_7788,
                    operation: op,
                    status: Status::NotSupported
                }
            );
        }
    }
}

fn indirect(op: u8, nr_segments: u16, grefs: &[u32]) -> FrontRequest<'_> {
    FrontRequest::Indirect {
        indirect_op: op,
        id: 77,
        sector: 64,
        handle: 0,
        nr_segments,
        page_grefs: grefs,
    }
}

fn pages_of(segs: &[Segment]) -> Vec<IndirectPage> {
    segs.chunks(SEGS_PER_INDIRECT_FRAME)
        .map(|c| {
            let mut p = [0u8; 4096];
            for (i, s) in c.iter().enumerate() {
                p[i * 8..i * 8 + 4].copy_from_slice(&s.gref.to_le_bytes());
                p[i * 8 + 4] = s.first_sect;
                p[i * 8 + 5] = s.last_sect;
            }
            IndirectPage::from_bytes(p)
        })
        .collect()
}

#[test]
fn indirect_segment_counts() {
    for abi in ABIS {
        let l = limits();
        let segs: Vec<Segment> = (0..600).map(page).collect();
        let pages = pages_of(&segs);
        for n in [1u16, 255, 256] {
            let r = run(abi, &indirect(OP_WRITE, n, &[40]), &l, &pages).unwrap();
            let Op::Write {
                transfer,
                flush: None,
            } = &r.op
            else {
                panic!()
            };
            assert_eq!(transfer.segs.as_slice(), &segs[..usize::from(n)]);
            assert_eq!(transfer.nr_sectors, 8 * u64::from(n));
            assert_eq!((r.id, r.operation), (77, OP_WRITE));
        }
        for n in [0u16, 257, 512, 513, u16::MAX] {
            assert_eq!(
                reason(run(abi, &indirect(OP_READ, n, &[40, 41]), &l, &pages)),
                RejectReason::SegmentCount {
                    nr_segments: n,
                    max: 256
                },
                "{n}"
            );
        }
        // The advertised maximum is the limit; more than the crate's capacity is clamped.
        let small = DeviceLimits {
            max_indirect_segments: 32,
            ..l
        };
        assert!(run(abi, &indirect(OP_READ, 32, &[40]), &small, &pages).is_ok());
        assert!(run(abi, &indirect(OP_READ, 33, &[40]), &small, &pages).is_err());
        let none = DeviceLimits {
            max_indirect_segments: 0,
            ..l
        };
        assert!(run(abi, &indirect(OP_READ, 1, &[40]), &none, &pages).is_err());
        let big = DeviceLimits {
            max_indirect_segments: 4096,
            ..l
        };
        assert_eq!(
            reason(run(abi, &indirect(OP_READ, 257, &[40]), &big, &pages)),
            RejectReason::SegmentCount {
                nr_segments: 257,
                max: 256
            }
        );
    }
}

#[test]
fn indirect_pages_must_be_supplied() {
    for abi in ABIS {
        let l = limits();
        let raw = indirect(OP_READ, 1, &[40]).encode(abi).unwrap();
        let Ok(Parsed::Indirect(h)) = parse(&raw, &l) else {
            panic!()
        };
        assert_eq!((h.pages(), h.page_grefs()), (1, &[40][..]));
        assert_eq!(h.sector, Sector(64));
        assert_eq!(
            parse_indirect(&h, &[], &l).unwrap_err().reason,
            RejectReason::IndirectPages {
                needed: 1,
                available: 0
            }
        );
        // 256 segments fit one page; one more page than needed is ignored.
        let segs: Vec<Segment> = (0..256).map(page).collect();
        let mut pages = pages_of(&segs);
        pages.push(IndirectPage::new());
        let raw = indirect(OP_READ, 256, &[40, 41]).encode(abi).unwrap();
        let Ok(Parsed::Indirect(h)) = parse(&raw, &l) else {
            panic!()
        };
        assert_eq!(h.page_grefs(), &[40]);
        assert!(parse_indirect(&h, &pages, &l).is_ok());
        assert_eq!(
            h.response(Status::Error),
            Response {
                id: 77,
                operation: OP_READ,
                status: Status::Error
            }
        );

        // A header altered after parse is checked again, not trusted.
        let mut tampered = h;
        tampered.nr_segments = 60000;
        assert_eq!(
            parse_indirect(&tampered, &pages, &l).unwrap_err().reason,
            RejectReason::SegmentCount {
                nr_segments: 60000,
                max: 256
            }
        );
        // Pages filled in place.
        let mut filled = IndirectPage::new();
        filled.as_bytes_mut()[..8].copy_from_slice(&[5, 0, 0, 0, 0, 7, 0, 0]);
        let raw = indirect(OP_READ, 1, &[40]).encode(abi).unwrap();
        let Ok(Parsed::Indirect(h)) = parse(&raw, &l) else {
            panic!()
        };
        let r = parse_indirect(&h, &[filled], &l).unwrap();
        let Op::Read(t) = r.op else { panic!() };
        assert_eq!(t.segs.as_slice(), &[page(5)]);
    }
}

#[test]
fn indirect_segments_are_validated() {
    for abi in ABIS {
        let l = limits();
        let mut segs: Vec<Segment> = (0..10).map(page).collect();
        segs[9] = Segment {
            gref: 9,
            first_sect: 0,
            last_sect: 8,
        };
        assert_eq!(
            reason(run(abi, &indirect(OP_READ, 10, &[1]), &l, &pages_of(&segs))),
            RejectReason::Segment {
                index: 9,
                first_sect: 0,
                last_sect: 8
            }
        );
        // Only the first nr_segments entries count.
        assert!(run(abi, &indirect(OP_READ, 9, &[1]), &l, &pages_of(&segs)).is_ok());
        segs[9] = Segment {
            gref: 9,
            first_sect: 6,
            last_sect: 5,
        };
        assert!(run(abi, &indirect(OP_READ, 10, &[1]), &l, &pages_of(&segs)).is_err());
        // Range and alignment apply to the sum of indirect segments.
        let segs: Vec<Segment> = (0..256).map(page).collect();
        let tight = DeviceLimits {
            sectors: 64 + 2048,
            ..l
        };
        assert!(run(abi, &indirect(OP_READ, 256, &[1]), &tight, &pages_of(&segs)).is_ok());
        let tight = DeviceLimits {
            sectors: 64 + 2047,
            ..l
        };
        assert!(matches!(
            reason(run(
                abi,
                &indirect(OP_READ, 256, &[1]),
                &tight,
                &pages_of(&segs)
            )),
            RejectReason::BeyondEnd {
                nr_sectors: 2048,
                ..
            }
        ));
    }
}

#[test]
fn indirect_wraps_only_read_or_write() {
    for abi in ABIS {
        for op in [
            OP_WRITE_BARRIER,
            OP_FLUSH_DISKCACHE,
            OP_DISCARD,
            OP_INDIRECT,
            4,
            255,
        ] {
            let rej = run(abi, &indirect(op, 1, &[1]), &limits(), &[]).unwrap_err();
            assert_eq!(rej.reason, RejectReason::IndirectOperation(op));
            assert_eq!(rej.status, Status::Error);
            // Linux answers with the inner operation.
            assert_eq!((rej.id, rej.operation), (77, op));
        }
    }
}

#[test]
fn read_only_device() {
    for abi in ABIS {
        let l = DeviceLimits {
            read_only: true,
            ..limits()
        };
        assert!(run(abi, &rw(OP_READ, 0, &[page(1)]), &l, &[]).is_ok());
        for op in [OP_WRITE, OP_WRITE_BARRIER, OP_FLUSH_DISKCACHE] {
            assert_eq!(
                reason(run(abi, &rw(op, 0, &[page(1)]), &l, &[])),
                RejectReason::ReadOnly
            );
        }
        // Linux's xen_vbd_translate refuses a data-less flush on a read-only vbd too.
        assert_eq!(
            reason(run(abi, &rw(OP_FLUSH_DISKCACHE, 0, &[]), &l, &[])),
            RejectReason::ReadOnly
        );
        let pages = pages_of(&[page(1)]);
        assert_eq!(
            reason(run(abi, &indirect(OP_WRITE, 1, &[1]), &l, &pages)),
            RejectReason::ReadOnly
        );
        assert!(run(abi, &indirect(OP_READ, 1, &[1]), &l, &pages).is_ok());
        let d = FrontRequest::Discard {
            id: 1,
            sector: 0,
            nr_sectors: 8,
            secure: false,
        };
        assert_eq!(reason(run(abi, &d, &l, &[])), RejectReason::ReadOnly);
        // The read-only check comes before the range check.
        assert_eq!(
            reason(run(abi, &rw(OP_WRITE, u64::MAX, &[page(1)]), &l, &[])),
            RejectReason::ReadOnly
        );
    }
}

#[test]
fn discard() {
    for abi in ABIS {
        let l = limits();
        let d = |sector, nr_sectors, secure| FrontRequest::Discard {
            id: 5,
            sector,
            nr_sectors,
            secure,
        };
        let r = run(abi, &d(8, 16, false), &l, &[]).unwrap();
        assert_eq!((r.id, r.operation), (5, OP_DISCARD));
        assert_eq!(
            r.op,
            Op::Discard {
                sector: Sector(8),
                nr_sectors: 16,
                secure: false
            }
        );
        assert_eq!(
            run(abi, &d(8, 16, true), &l, &[]).unwrap().op,
            Op::Discard {
                sector: Sector(8),
                nr_sectors: 16,
                secure: true
            }
        );
        // Secure asked but not offered: a plain discard, as Linux does.
        let plain = DeviceLimits {
            secure_discard: false,
            ..l
        };
        assert_eq!(
            run(abi, &d(8, 16, true), &plain, &[]).unwrap().op,
            Op::Discard {
                sector: Sector(8),
                nr_sectors: 16,
                secure: false
            }
        );
        // Secure offered without plain discard: only secure requests pass.
        let secure_only = DeviceLimits {
            discard: false,
            ..l
        };
        assert!(run(abi, &d(8, 16, true), &secure_only, &[]).is_ok());
        let none = DeviceLimits {
            discard: false,
            secure_discard: false,
            ..l
        };
        let rej = run(abi, &d(8, 16, false), &none, &[]).unwrap_err();
        assert_eq!(
            (rej.reason, rej.status),
            (RejectReason::DiscardNotSupported, Status::NotSupported)
        );

        let end = l.sectors;
        assert!(run(abi, &d(end - 8, 8, false), &l, &[]).is_ok());
        assert!(matches!(
            reason(run(abi, &d(end - 8, 9, false), &l, &[])),
            RejectReason::BeyondEnd { .. }
        ));
        assert_eq!(
            reason(run(abi, &d(2, u64::MAX - 1, false), &l, &[])),
            RejectReason::Wraps {
                sector: 2,
                nr_sectors: u64::MAX - 1
            }
        );
        // Zero sectors: no range check, success without I/O (Linux's blkdev_issue_discard).
        assert!(run(abi, &d(u64::MAX, 0, false), &l, &[]).is_ok());

        let l4k = DeviceLimits {
            logical_block_size: 4096,
            ..l
        };
        assert!(run(abi, &d(8, 16, false), &l4k, &[]).is_ok());
        assert_eq!(
            reason(run(abi, &d(4, 16, false), &l4k, &[])),
            RejectReason::Misaligned {
                what: Misalignment::Sector,
                logical_block_size: 4096
            }
        );
        assert_eq!(
            reason(run(abi, &d(8, 12, false), &l4k, &[])),
            RejectReason::Misaligned {
                what: Misalignment::Length,
                logical_block_size: 4096
            }
        );
    }
}

#[test]
fn ids_sit_where_each_abi_puts_them() {
    let r = rw(OP_READ, 0x0102_0304_0506_0708, &[])
        .encode(Abi::X86_32)
        .unwrap();
    assert_eq!(
        &r.as_bytes()[4..12],
        &0x1122_3344_5566_7788u64.to_le_bytes()
    );
    assert_eq!(
        &r.as_bytes()[12..20],
        &0x0102_0304_0506_0708u64.to_le_bytes()
    );
    assert_eq!(r.as_bytes().len(), 108);
    let r = rw(OP_READ, 0x0102_0304_0506_0708, &[])
        .encode(Abi::X86_64)
        .unwrap();
    assert_eq!(
        &r.as_bytes()[8..16],
        &0x1122_3344_5566_7788u64.to_le_bytes()
    );
    assert_eq!(
        &r.as_bytes()[16..24],
        &0x0102_0304_0506_0708u64.to_le_bytes()
    );
    assert_eq!(r.as_bytes().len(), 112);
    let r = indirect(OP_READ, 3, &[0xAABB_CCDD])
        .encode(Abi::X86_32)
        .unwrap();
    assert_eq!(&r.as_bytes()[24..28], &0xAABB_CCDDu32.to_le_bytes());
    assert_eq!(&r.as_bytes()[2..4], &3u16.to_le_bytes());
    let r = indirect(OP_READ, 3, &[0xAABB_CCDD])
        .encode(Abi::X86_64)
        .unwrap();
    assert_eq!(&r.as_bytes()[28..32], &0xAABB_CCDDu32.to_le_bytes());
    let r = FrontRequest::Discard {
        id: 9,
        sector: 1,
        nr_sectors: 2,
        secure: true,
    }
    .encode(Abi::X86_32)
    .unwrap();
    assert_eq!(
        (r.as_bytes()[0], r.as_bytes()[1]),
        (OP_DISCARD, DISCARD_SECURE)
    );
    assert_eq!(&r.as_bytes()[20..28], &2u64.to_le_bytes());
    assert_eq!(
        RawRequest::from_bytes(Abi::X86_32, &[0; 112])
            .unwrap_err()
            .expected,
        108
    );
    assert!(rw(OP_READ, 0, &[page(0); 12]).encode(Abi::X86_64).is_err());
    assert!(indirect(OP_READ, 1, &[0; 9]).encode(Abi::X86_64).is_err());
}
