//! The shared ring's geometry: header offsets and ring sizes, as Xen's `io/ring.h` defines
//! them (`struct *_sring`, `__RING_SIZE`).

use std::sync::atomic::{fence, Ordering};

use shmem::PAGE_SIZE;

use crate::abi::Abi;

/// Largest `ring-page-order` a backend advertises (`max-ring-page-order`): 16 pages, as Linux
/// (`XENBUS_MAX_RING_GRANT_ORDER`) and QEMU allow.
pub const MAX_RING_PAGE_ORDER: u32 = 4;
/// Pages of the largest ring, `1 << MAX_RING_PAGE_ORDER`.
pub const MAX_RING_PAGES: usize = 1 << MAX_RING_PAGE_ORDER;

/// Offset of `req_prod` in the shared ring header.
pub const REQ_PROD: usize = 0;
/// Offset of `req_event`.
pub const REQ_EVENT: usize = 4;
/// Offset of `rsp_prod`.
pub const RSP_PROD: usize = 8;
/// Offset of `rsp_event`.
pub const RSP_EVENT: usize = 12;
/// Offset of the first slot: four indices, then 48 bytes of padding (`__pad`), so that the
/// ring itself starts at 64 in every ABI.
pub const RING_HEADER_SIZE: usize = 64;

/// Number of pages of a ring with `ring-page-order` `order`, or `None` past
/// [`MAX_RING_PAGE_ORDER`].
pub fn ring_pages(order: u32) -> Option<usize> {
    (order <= MAX_RING_PAGE_ORDER).then(|| 1usize << order)
}

/// Number of slots of a ring of `pages` pages in `abi`, as `__RING_SIZE` computes it: the
/// slots that fit after the header, rounded down to a power of two (`__RD32`), so that an
/// index is reduced to a slot with a mask. 32, 64, 128, 256, 512 slots for 1, 2, 4, 8, 16
/// pages in both layouts; 0 for 0 pages.
pub fn ring_size(abi: Abi, pages: usize) -> u32 {
    let bytes = (pages as u64).saturating_mul(PAGE_SIZE as u64);
    let slots = bytes.saturating_sub(RING_HEADER_SIZE as u64) / abi.slot_size() as u64;
    if slots == 0 {
        return 0;
    }
    let pow2 = 1u64 << (63 - slots.leading_zeros());
    u32::try_from(pow2).unwrap_or(1 << 31)
}

/// Checks that `pages` is a ring size a frontend may choose (1, 2, 4, 8 or 16) and that `mem`
/// holds that many pages; returns the ring's size in slots.
pub(crate) fn check_geometry(
    mem: &shmem::SharedMem<'_>,
    abi: Abi,
    pages: usize,
) -> Result<u32, crate::RingError> {
    if !pages.is_power_of_two() || pages > MAX_RING_PAGES {
        return Err(crate::RingError::Pages(pages));
    }
    mem.subregion(0, pages * PAGE_SIZE)?;
    Ok(ring_size(abi, pages))
}

/// `RING_PUSH_{REQUESTS,RESPONSES}_AND_CHECK_NOTIFY`: publishes the producer index `new` at
/// offset `prod` (its slots written before; `old` is the value published last) and says
/// whether the other end asked, at offset `event`, for an event among the new entries.
pub(crate) fn push_and_check_notify(
    mem: &shmem::SharedMem<'_>,
    prod: usize,
    event: usize,
    old: u32,
    new: u32,
) -> Result<bool, crate::RingError> {
    // xen_wmb(): the other end must see the slots before the new producer index.
    fence(Ordering::Release);
    mem.store_u32(prod, new, Ordering::Relaxed)?;
    // xen_mb(): the new producer index must be visible before the event index is read, or an
    // end that just set its event index and checked the producer index would sleep without
    // an event.
    fence(Ordering::SeqCst);
    let event = mem.load_u32(event, Ordering::Relaxed)?;
    Ok(new.wrapping_sub(event) < new.wrapping_sub(old))
}

/// Offset of the slot for index `idx` in a ring of `size` slots (a power of two).
pub(crate) fn slot_offset(abi: Abi, size: u32, idx: u32) -> usize {
    RING_HEADER_SIZE + (idx & size.wrapping_sub(1)) as usize * abi.slot_size()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_sizes_match_ring_h() {
        for abi in [Abi::Native, Abi::X86_32, Abi::X86_64] {
            let sizes: Vec<u32> = (0..=MAX_RING_PAGE_ORDER)
                .map(|o| ring_size(abi, ring_pages(o).unwrap()))
                .collect();
            assert_eq!(sizes, [32, 64, 128, 256, 512], "{abi:?}");
            assert_eq!(ring_size(abi, 0), 0);
            // 3 pages: (12288 - 64) / 112 = 109 -> 64.
            assert_eq!(ring_size(abi, 3), 64);
        }
        assert_eq!(ring_pages(MAX_RING_PAGE_ORDER + 1), None);
        assert_eq!(ring_size(Abi::X86_64, usize::MAX), 1 << 31);
    }
}
