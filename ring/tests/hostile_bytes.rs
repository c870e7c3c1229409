//! Any bytes at all in a slot (and in indirect pages) give a validated request or a
//! rejection, never a panic, and always the one the independent model predicts. Also writes
//! the seed corpus of the `parse` fuzz target.

mod common;

use common::fuzz_input::{check, decode, encode, HEADER};
use common::model::run_parse;
use common::{limits, page};
use proptest::prelude::*;
use ring::*;

const ABIS: [Abi; 3] = [Abi::Native, Abi::X86_32, Abi::X86_64];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Completely arbitrary input.
    #[test]
    fn any_bytes(data in prop::collection::vec(any::<u8>(), 0..(HEADER + 112 + 4096 + 64))) {
        check(&data);
    }

    /// Slot bytes from the interesting corners: known operations, small segment counts,
    /// sector values near the boundaries, sometimes valid segments.
    #[test]
    fn structured_slots(
        abi in prop::sample::select(ABIS.to_vec()),
        op in prop_oneof![0u8..=7, any::<u8>()],
        inner in 0u8..=7,
        nseg in prop_oneof![0u16..=12, 250u16..=260, any::<u16>()],
        sector in prop_oneof![0u64..64, (0u64..64).prop_map(|d| u64::MAX - d), (0u64..64).prop_map(|d| (1 << 21) - d), any::<u64>()],
        seg_bytes in prop::collection::vec((0u8..=9, 0u8..=9), 11),
        flags in any::<u8>(),
        lbs in 0u8..4,
        sectors in prop_oneof![Just(1u64 << 21), Just(u64::MAX), any::<u64>()],
        max_ind in prop_oneof![Just(256u16), 0u16..300, any::<u16>()],
        page_segs in prop::collection::vec((any::<u32>(), 0u8..=9, 0u8..=9), 0..300),
    ) {
        let mut slot = vec![0u8; abi.request_size()];
        let x32 = abi.layout() == Layout::X86_32;
        let id_off = if x32 { 4 } else { 8 };
        slot[0] = op;
        slot[1] = if op == OP_INDIRECT { inner } else { nseg as u8 };
        if op == OP_INDIRECT {
            slot[2..4].copy_from_slice(&nseg.to_le_bytes());
        }
        slot[id_off..id_off + 8].copy_from_slice(&0xD00Du64.to_le_bytes());
        slot[id_off + 8..id_off + 16].copy_from_slice(&sector.to_le_bytes());
        if op == OP_DISCARD {
            slot[id_off + 16..id_off + 24].copy_from_slice(&(nseg as u64 * 8).to_le_bytes());
        } else if op != OP_INDIRECT {
            for (i, (f, l)) in seg_bytes.iter().enumerate() {
                let o = id_off + 16 + 8 * i;
                slot[o] = i as u8;
                slot[o + 4] = *f;
                slot[o + 5] = *l;
            }
        }
        let mut page = [0u8; 4096];
        for (i, (g, f, l)) in page_segs.iter().enumerate() {
            page[i * 8..i * 8 + 4].copy_from_slice(&g.to_le_bytes());
            page[i * 8 + 4] = *f;
            page[i * 8 + 5] = *l;
        }
        let raw = RawRequest::from_bytes(abi, &slot).unwrap();
        let limits = DeviceLimits {
            sectors,
            logical_block_size: 512 << lbs,
            read_only: flags & 1 != 0,
            max_indirect_segments: max_ind,
            discard: flags & 2 != 0,
            secure_discard: flags & 4 != 0,
        };
        check(&encode(&raw, &limits, &[IndirectPage::from_bytes(page)]));
    }
}

/// Seeds for `cargo fuzz run parse`: one valid request of each kind per ABI plus a few
/// rejections, checked here and written to `ring/fuzz/corpus/parse/`.
#[test]
fn fuzz_seed_corpus() {
    let segs: Vec<Segment> = (0..11).map(page).collect();
    let ind: Vec<Segment> = (0..256).map(page).collect();
    let mut p = [0u8; 4096];
    for (i, s) in ind.iter().enumerate() {
        p[i * 8..i * 8 + 4].copy_from_slice(&s.gref.to_le_bytes());
        p[i * 8 + 5] = s.last_sect;
    }
    let pages = [IndirectPage::from_bytes(p)];
    let l = limits();
    let l4k = DeviceLimits {
        logical_block_size: 4096,
        ..l
    };
    let ro = DeviceLimits {
        read_only: true,
        ..l
    };
    let cases: [(&str, FrontRequest<'_>, DeviceLimits, bool); 8] = [
        (
            "read",
            FrontRequest::Direct {
                operation: OP_READ,
                id: 1,
                sector: 8,
                handle: 0,
                segs: &segs,
            },
            l,
            true,
        ),
        (
            "write-4k",
            FrontRequest::Direct {
                operation: OP_WRITE,
                id: 2,
                sector: 8,
                handle: 0,
                segs: &segs[..2],
            },
            l4k,
            true,
        ),
        (
            "flush",
            FrontRequest::Direct {
                operation: OP_FLUSH_DISKCACHE,
                id: 3,
                sector: 0,
                handle: 0,
                segs: &[],
            },
            l,
            true,
        ),
        (
            "barrier-data",
            FrontRequest::Direct {
                operation: OP_WRITE_BARRIER,
                id: 4,
                sector: 0,
                handle: 0,
                segs: &segs[..1],
            },
            l,
            true,
        ),
        (
            "discard-secure",
            FrontRequest::Discard {
                id: 5,
                sector: 64,
                nr_sectors: 64,
                secure: true,
            },
            l,
            true,
        ),
        (
            "indirect-256",
            FrontRequest::Indirect {
                indirect_op: OP_WRITE,
                id: 6,
                sector: 0,
                handle: 0,
                nr_segments: 256,
                page_grefs: &[77],
            },
            l,
            true,
        ),
        (
            "write-read-only",
            FrontRequest::Direct {
                operation: OP_WRITE,
                id: 7,
                sector: 0,
                handle: 0,
                segs: &segs[..1],
            },
            ro,
            false,
        ),
        (
            "unknown-op",
            FrontRequest::Direct {
                operation: OP_RESERVED_1,
                id: 8,
                sector: 0,
                handle: 0,
                segs: &[],
            },
            l,
            false,
        ),
    ];
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/parse");
    std::fs::create_dir_all(&dir).unwrap();
    for abi in ABIS {
        for (name, req, limits, ok) in &cases {
            let raw = req.encode(abi).unwrap();
            let data = encode(&raw, limits, &pages);
            let case = decode(&data);
            assert_eq!(case.raw, raw);
            assert_eq!(&case.limits, limits);
            assert_eq!(
                run_parse(&case.raw, &case.limits, &case.pages).is_ok(),
                *ok,
                "{name}"
            );
            check(&data);
            let file = dir.join(format!("{name}-{abi:?}").to_lowercase());
            if std::fs::read(&file).ok().as_deref() != Some(&data[..]) {
                std::fs::write(&file, &data).unwrap();
            }
        }
    }
}
