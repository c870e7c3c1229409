//! The byte format of the `parse` fuzz target's inputs, shared by the target
//! (`ring/fuzz/fuzz_targets/parse.rs`) and the unit test that writes its seed corpus:
//!
//! | bytes | meaning |
//! |---|---|
//! | 0 | ABI: `% 3` → native, x86_32, x86_64 |
//! | 1 | bit 0 read-only, bit 1 discard, bit 2 secure discard |
//! | 2..4 | `max_indirect_segments`, little-endian |
//! | 4 | logical block size `512 << (b % 4)` |
//! | 5..13 | device size in sectors, little-endian |
//! | 13.. | the request slot (zero-padded to the ABI's size), then indirect pages |

use ring::{Abi, DeviceLimits, IndirectPage, RawRequest, MAX_INDIRECT_PAGES};

/// Size of the header before the slot.
pub const HEADER: usize = 13;

/// One decoded fuzz case.
#[derive(Debug)]
pub struct Case {
    pub raw: RawRequest,
    pub limits: DeviceLimits,
    pub pages: Vec<IndirectPage>,
}

fn abi_of(b: u8) -> Abi {
    [Abi::Native, Abi::X86_32, Abi::X86_64][usize::from(b % 3)]
}

/// Decodes any bytes into a case (short inputs are zero-padded).
pub fn decode(data: &[u8]) -> Case {
    let byte = |i: usize| data.get(i).copied().unwrap_or(0);
    let abi = abi_of(byte(0));
    let flags = byte(1);
    let mut sectors = [0u8; 8];
    for (i, s) in sectors.iter_mut().enumerate() {
        *s = byte(5 + i);
    }
    let limits = DeviceLimits {
        sectors: u64::from_le_bytes(sectors),
        logical_block_size: 512 << (byte(4) % 4),
        read_only: flags & 1 != 0,
        max_indirect_segments: u16::from_le_bytes([byte(2), byte(3)]),
        discard: flags & 2 != 0,
        secure_discard: flags & 4 != 0,
    };
    let n = abi.request_size();
    let mut slot = vec![0u8; n];
    let rest = data.get(HEADER..).unwrap_or(&[]);
    let k = rest.len().min(n);
    slot[..k].copy_from_slice(&rest[..k]);
    let raw = RawRequest::from_bytes(abi, &slot).unwrap();
    let pages = rest
        .get(k..)
        .unwrap_or(&[])
        .chunks(4096)
        .take(MAX_INDIRECT_PAGES)
        .map(|c| {
            let mut p = [0u8; 4096];
            p[..c.len()].copy_from_slice(c);
            IndirectPage::from_bytes(p)
        })
        .collect();
    Case { raw, limits, pages }
}

/// Encodes a case (the inverse of [`decode`] for the limits this format can express).
pub fn encode(raw: &RawRequest, limits: &DeviceLimits, pages: &[IndirectPage]) -> Vec<u8> {
    let abi = match raw.abi() {
        Abi::Native => 0,
        Abi::X86_32 => 1,
        Abi::X86_64 => 2,
    };
    let flags = u8::from(limits.read_only)
        | u8::from(limits.discard) << 1
        | u8::from(limits.secure_discard) << 2;
    let lbs = (limits.logical_block_size / 512).max(1).trailing_zeros() as u8;
    let mut out = vec![abi, flags];
    out.extend_from_slice(&limits.max_indirect_segments.to_le_bytes());
    out.push(lbs);
    out.extend_from_slice(&limits.sectors.to_le_bytes());
    out.extend_from_slice(raw.as_bytes());
    for p in pages {
        out.extend_from_slice(p.as_bytes());
    }
    out
}

/// Runs one case: `ring`'s parser must agree with the model, and never panic.
pub fn check(data: &[u8]) {
    let case = decode(data);
    let got = super::model::run_parse(&case.raw, &case.limits, &case.pages);
    let want = super::model::model(
        case.raw.abi(),
        case.raw.as_bytes(),
        &case.limits,
        &case.pages,
    );
    assert_eq!(got, want, "{case:?}");
}
