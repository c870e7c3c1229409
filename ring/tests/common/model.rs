//! A second, deliberately plain implementation of the blkif validation rules, written from
//! Linux's xen-blkback against raw byte offsets, for differential tests and fuzzing: whatever
//! bytes a slot holds, `ring::parse` (+ `parse_indirect`) must agree with it exactly.

use ring::{
    parse, parse_indirect, Abi, DeviceLimits, FlushKind, IndirectPage, Layout, Misalignment, Op,
    Parsed, RejectReason, Rejection, Request, Sector, Segment, Segments, Status, Transfer,
};

/// `parse`, then `parse_indirect` with `pages` for an indirect request.
pub fn run_parse(
    raw: &ring::RawRequest,
    limits: &DeviceLimits,
    pages: &[IndirectPage],
) -> Result<Request, Rejection> {
    match parse(raw, limits)? {
        Parsed::Ready(r) => Ok(r),
        Parsed::Indirect(h) => {
            assert_eq!(h.page_grefs().len(), h.pages());
            parse_indirect(&h, pages, limits)
        }
    }
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

fn rej(id: u64, operation: u8, reason: RejectReason) -> Rejection {
    let status = match reason {
        RejectReason::UnknownOperation(_) | RejectReason::DiscardNotSupported => {
            Status::NotSupported
        }
        _ => Status::Error,
    };
    Rejection {
        id,
        operation,
        status,
        reason,
    }
}

/// The expected outcome for slot bytes `b` of `abi`.
pub fn model(
    abi: Abi,
    b: &[u8],
    limits: &DeviceLimits,
    pages: &[IndirectPage],
) -> Result<Request, Rejection> {
    assert_eq!(b.len(), abi.request_size());
    let x32 = abi.layout() == Layout::X86_32;
    let id_off = if x32 { 4 } else { 8 };
    let op = b[0];
    let id = u64_at(b, id_off);
    let sector = u64_at(b, id_off + 8);
    let bs = u64::from(limits.logical_block_size / 512).max(1);
    let max_ind = usize::from(limits.max_indirect_segments).min(256);

    let (operation, flush, segs): (u8, Option<FlushKind>, Vec<(u32, u8, u8)>) = match op {
        0..=3 => {
            let flush = match op {
                2 => Some(FlushKind::Barrier),
                3 => Some(FlushKind::Cache),
                _ => None,
            };
            let n = usize::from(b[1]);
            if (n == 0 && flush.is_none()) || n > 11 {
                return Err(rej(
                    id,
                    op,
                    RejectReason::SegmentCount {
                        nr_segments: n as u16,
                        max: 11,
                    },
                ));
            }
            let base = id_off + 16;
            let segs = (0..n)
                .map(|i| {
                    let o = base + 8 * i;
                    (
                        u32::from_le_bytes(b[o..o + 4].try_into().unwrap()),
                        b[o + 4],
                        b[o + 5],
                    )
                })
                .collect();
            (op, flush, segs)
        }
        6 => {
            let iop = b[1];
            if iop > 1 {
                return Err(rej(id, iop, RejectReason::IndirectOperation(iop)));
            }
            let n = usize::from(u16::from_le_bytes([b[2], b[3]]));
            if n == 0 || n > max_ind {
                return Err(rej(
                    id,
                    iop,
                    RejectReason::SegmentCount {
                        nr_segments: n as u16,
                        max: max_ind as u16,
                    },
                ));
            }
            let needed = n.div_ceil(512);
            if pages.len() < needed {
                return Err(rej(
                    id,
                    iop,
                    RejectReason::IndirectPages {
                        needed,
                        available: pages.len(),
                    },
                ));
            }
            let segs = (0..n)
                .map(|i| {
                    let p = pages[i / 512].as_bytes();
                    let o = (i % 512) * 8;
                    (
                        u32::from_le_bytes(p[o..o + 4].try_into().unwrap()),
                        p[o + 4],
                        p[o + 5],
                    )
                })
                .collect();
            (iop, None, segs)
        }
        5 => {
            let flag = b[1];
            let nr = u64_at(b, id_off + 16);
            if limits.read_only {
                return Err(rej(id, 5, RejectReason::ReadOnly));
            }
            if nr != 0 {
                match sector.checked_add(nr) {
                    None => {
                        return Err(rej(
                            id,
                            5,
                            RejectReason::Wraps {
                                sector,
                                nr_sectors: nr,
                            },
                        ))
                    }
                    Some(end) if end > limits.sectors => {
                        return Err(rej(
                            id,
                            5,
                            RejectReason::BeyondEnd {
                                sector,
                                nr_sectors: nr,
                                device_sectors: limits.sectors,
                            },
                        ))
                    }
                    Some(_) => {}
                }
            }
            let secure = flag & 1 == 1 && limits.secure_discard;
            if !secure && !limits.discard {
                return Err(rej(id, 5, RejectReason::DiscardNotSupported));
            }
            let mis = |what| {
                rej(
                    id,
                    5,
                    RejectReason::Misaligned {
                        what,
                        logical_block_size: limits.logical_block_size,
                    },
                )
            };
            if sector % bs != 0 {
                return Err(mis(Misalignment::Sector));
            }
            if nr % bs != 0 {
                return Err(mis(Misalignment::Length));
            }
            return Ok(Request {
                id,
                operation: 5,
                op: Op::Discard {
                    sector: Sector(sector),
                    nr_sectors: nr,
                    secure,
                },
            });
        }
        other => return Err(rej(id, other, RejectReason::UnknownOperation(other))),
    };

    let mut total = 0u64;
    for (i, &(_, first, last)) in segs.iter().enumerate() {
        if last >= 8 || last < first {
            return Err(rej(
                id,
                operation,
                RejectReason::Segment {
                    index: i as u16,
                    first_sect: first,
                    last_sect: last,
                },
            ));
        }
        total += u64::from(last - first) + 1;
    }
    if operation != 0 && limits.read_only {
        return Err(rej(id, operation, RejectReason::ReadOnly));
    }
    if total != 0 {
        match sector.checked_add(total) {
            None => {
                return Err(rej(
                    id,
                    operation,
                    RejectReason::Wraps {
                        sector,
                        nr_sectors: total,
                    },
                ))
            }
            Some(end) if end > limits.sectors => {
                return Err(rej(
                    id,
                    operation,
                    RejectReason::BeyondEnd {
                        sector,
                        nr_sectors: total,
                        device_sectors: limits.sectors,
                    },
                ))
            }
            Some(_) => {}
        }
    }
    let mis = |what| {
        rej(
            id,
            operation,
            RejectReason::Misaligned {
                what,
                logical_block_size: limits.logical_block_size,
            },
        )
    };
    for &(_, first, last) in &segs {
        if sector % bs != 0 {
            return Err(mis(Misalignment::Sector));
        }
        if u64::from(first) % bs != 0 {
            return Err(mis(Misalignment::Offset));
        }
        if (u64::from(last - first) + 1) % bs != 0 {
            return Err(mis(Misalignment::Length));
        }
    }
    let expected: Vec<Segment> = segs
        .iter()
        .map(|&(gref, first_sect, last_sect)| Segment {
            gref,
            first_sect,
            last_sect,
        })
        .collect();
    let op = if segs.is_empty() {
        Op::Flush(flush.unwrap())
    } else {
        let transfer = Transfer {
            sector: Sector(sector),
            nr_sectors: total,
            segs: Segments::from_slice(&expected).unwrap(),
        };
        if operation == 0 {
            Op::Read(transfer)
        } else {
            Op::Write { transfer, flush }
        }
    };
    Ok(Request { id, operation, op })
}
