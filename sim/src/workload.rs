//! A verified workload for the simulated guest: every write's data is known, every read is
//! checked against it. The demo, the tests and the benches run it.
//!
//! The disk is modelled in 4 KiB blocks, each with a generation: generation 0 is what the disk
//! held before (zeros for a fresh image), and each write makes a block's content a
//! deterministic function of (block, generation). Requests within one phase never overlap, so
//! the outcome does not depend on the order the backend completes them in.

use std::time::{Duration, Instant};

use crate::front::{IoOp, SimFront, SimFrontError};

/// Bytes per modelled block.
pub const BLOCK: usize = 4096;
const SECTORS_PER_BLOCK: u64 = (BLOCK / 512) as u64;

/// What the disk should hold.
#[derive(Debug, Clone)]
pub struct DiskModel {
    gens: Vec<u32>,
    /// Whether discarded blocks read back as zeros (files with punched holes do; block
    /// devices need not): when not, a discarded block is no longer checked until rewritten.
    pub discard_zeroes: bool,
    unknown: Vec<bool>,
}

impl DiskModel {
    /// A disk of `blocks` blocks, all zero.
    pub fn zeroed(blocks: u64, discard_zeroes: bool) -> Self {
        let n = usize::try_from(blocks).unwrap_or(usize::MAX);
        Self {
            gens: vec![0; n],
            discard_zeroes,
            unknown: vec![false; n],
        }
    }

    /// Number of blocks.
    pub fn blocks(&self) -> u64 {
        self.gens.len() as u64
    }

    fn fill(&self, block: u64, count: u64, bump: bool, out: &mut Vec<u8>) {
        out.clear();
        for b in block..block + count {
            let gen = self.gens[b as usize] + u32::from(bump);
            let start = out.len();
            out.resize(start + BLOCK, 0);
            pattern(b, gen, &mut out[start..]);
        }
    }
}

/// The content of `block` at generation `gen` (zeros at generation 0).
pub fn pattern(block: u64, gen: u32, out: &mut [u8]) {
    if gen == 0 {
        out.fill(0);
        return;
    }
    let mut x = block.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ u64::from(gen).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        | 1;
    for chunk in out.chunks_mut(8) {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

/// A page of deterministic bytes for `seed`: what a ring trace's `pattern` content stands for
/// (`docs/trace-format.md`).
pub fn pattern_page(seed: u64, out: &mut [u8]) {
    pattern(seed, 1, out);
}

/// One planned operation, in blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Planned {
    /// Read and verify `count` blocks at `block`.
    Read {
        /// First block.
        block: u64,
        /// Blocks.
        count: u64,
    },
    /// Write `count` blocks at `block` with their next generation.
    Write {
        /// First block.
        block: u64,
        /// Blocks.
        count: u64,
    },
    /// Flush the disk cache.
    Flush,
    /// Discard `count` blocks at `block`.
    Discard {
        /// First block.
        block: u64,
        /// Blocks.
        count: u64,
    },
}

/// What a phase did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PhaseResult {
    /// Requests completed.
    pub requests: u64,
    /// Bytes read or written.
    pub bytes: u64,
    /// Reads whose data was checked.
    pub verified_reads: u64,
    /// Wall time.
    pub elapsed: Duration,
}

impl PhaseResult {
    /// Requests per second.
    pub fn iops(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// MiB per second.
    pub fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / (1024.0 * 1024.0) / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs `plan` with up to `depth` requests in flight, spread over the queues round-robin,
/// checking every response and every byte read.
///
/// # Errors
/// The first failed request, data mismatch, or frontend error.
pub fn run(
    front: &mut SimFront,
    model: &mut DiskModel,
    plan: &[Planned],
    depth: usize,
) -> Result<PhaseResult, SimFrontError> {
    let queues = front.info().map_or(1, |i| i.queues as usize).max(1);
    let depth = depth.max(1);
    let mut result = PhaseResult::default();
    let mut pending: std::collections::HashMap<u64, Planned> = std::collections::HashMap::new();
    let mut next = 0usize;
    let mut buf = Vec::new();
    let start = Instant::now();
    while next < plan.len() || !pending.is_empty() {
        while next < plan.len() && pending.len() < depth {
            let p = plan[next];
            let queue = next % queues;
            if front.free_slots(queue) == 0 {
                break;
            }
            let op = match p {
                Planned::Read { block, count } => IoOp::Read {
                    sector: block * SECTORS_PER_BLOCK,
                    sectors: u32::try_from(count * SECTORS_PER_BLOCK).unwrap_or(u32::MAX),
                },
                Planned::Write { block, count } => {
                    model.fill(block, count, true, &mut buf);
                    IoOp::Write {
                        sector: block * SECTORS_PER_BLOCK,
                        data: &buf,
                    }
                }
                Planned::Flush => IoOp::Flush,
                Planned::Discard { block, count } => IoOp::Discard {
                    sector: block * SECTORS_PER_BLOCK,
                    sectors: count * SECTORS_PER_BLOCK,
                    secure: false,
                },
            };
            let id = front.submit(queue, op)?;
            pending.insert(id, p);
            next += 1;
        }
        let c = front.wait()?;
        let Some(p) = pending.remove(&c.id) else {
            return Err(SimFrontError::Backend(format!(
                "completion for unknown request {}",
                c.id
            )));
        };
        if !c.is_ok() {
            return Err(SimFrontError::Backend(format!(
                "{p:?} failed with status {:?}",
                c.status
            )));
        }
        result.requests += 1;
        match p {
            Planned::Read { block, count } => {
                let data = c
                    .data
                    .ok_or_else(|| SimFrontError::Backend(format!("{p:?} returned no data")))?;
                model.fill(block, count, false, &mut buf);
                for i in 0..count {
                    let b = (block + i) as usize;
                    if model.unknown[b] {
                        continue;
                    }
                    let range = i as usize * BLOCK..(i as usize + 1) * BLOCK;
                    if data[range.clone()] != buf[range.clone()] {
                        let off = data[range.clone()]
                            .iter()
                            .zip(&buf[range])
                            .position(|(a, b)| a != b)
                            .unwrap_or(0);
                        return Err(SimFrontError::Backend(format!(
                            "data mismatch reading block {} (byte {off}): expected generation {}",
                            block + i,
                            model.gens[b]
                        )));
                    }
                }
                result.verified_reads += 1;
                result.bytes += count * BLOCK as u64;
            }
            Planned::Write { block, count } => {
                for b in block..block + count {
                    model.gens[b as usize] += 1;
                    model.unknown[b as usize] = false;
                }
                result.bytes += count * BLOCK as u64;
            }
            Planned::Flush => {}
            Planned::Discard { block, count } => {
                for b in block..block + count {
                    if model.discard_zeroes {
                        model.gens[b as usize] = 0;
                    } else {
                        model.unknown[b as usize] = true;
                    }
                }
            }
        }
    }
    result.elapsed = start.elapsed();
    Ok(result)
}

/// A small deterministic random number generator (xorshift64*), so that runs repeat.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A random permutation of `0..n`.
    pub fn permutation(&mut self, n: u64) -> Vec<u64> {
        let mut v: Vec<u64> = (0..n).collect();
        for i in (1..v.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
        v
    }
}

/// `count` single-block operations at distinct random blocks among the first `blocks`.
pub fn random_blocks(rng: &mut Rng, blocks: u64, count: usize, write: bool) -> Vec<Planned> {
    rng.permutation(blocks)
        .into_iter()
        .take(count)
        .map(|block| {
            if write {
                Planned::Write { block, count: 1 }
            } else {
                Planned::Read { block, count: 1 }
            }
        })
        .collect()
}

/// Sequential operations of `per_request` blocks over the first `blocks` blocks.
pub fn sequential(blocks: u64, per_request: u64, write: bool) -> Vec<Planned> {
    (0..blocks)
        .step_by(per_request as usize)
        .map(|block| {
            let count = per_request.min(blocks - block);
            if write {
                Planned::Write { block, count }
            } else {
                Planned::Read { block, count }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_differ_by_block_and_generation() {
        let mut a = vec![0u8; BLOCK];
        let mut b = vec![0u8; BLOCK];
        pattern(1, 1, &mut a);
        pattern(1, 2, &mut b);
        assert_ne!(a, b);
        pattern(2, 1, &mut b);
        assert_ne!(a, b);
        pattern(1, 1, &mut b);
        assert_eq!(a, b);
        pattern(1, 0, &mut b);
        assert!(b.iter().all(|&x| x == 0));
    }

    #[test]
    fn permutations_are_permutations() {
        let mut p = Rng::new(7).permutation(100);
        p.sort_unstable();
        assert_eq!(p, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn sequential_covers_everything_once() {
        let plan = sequential(10, 4, true);
        assert_eq!(
            plan,
            vec![
                Planned::Write { block: 0, count: 4 },
                Planned::Write { block: 4, count: 4 },
                Planned::Write { block: 8, count: 2 },
            ]
        );
    }
}
