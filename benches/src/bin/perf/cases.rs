//! The workloads and backend configurations a run is made of.

#[derive(Debug, Clone, Copy)]
pub(crate) enum Pattern {
    RandRead,
    RandWrite,
    SeqRead,
    SeqWrite,
    /// 70 % reads, 30 % writes, random.
    Mix,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Workload {
    pub(crate) name: &'static str,
    pub(crate) pattern: Pattern,
    pub(crate) bs: usize,
    pub(crate) qd: usize,
}

pub(crate) const WORKLOADS: &[Workload] = &[
    Workload {
        name: "4K randread QD1",
        pattern: Pattern::RandRead,
        bs: 4096,
        qd: 1,
    },
    Workload {
        name: "4K randread QD32",
        pattern: Pattern::RandRead,
        bs: 4096,
        qd: 32,
    },
    Workload {
        name: "4K randwrite QD1",
        pattern: Pattern::RandWrite,
        bs: 4096,
        qd: 1,
    },
    Workload {
        name: "4K randwrite QD32",
        pattern: Pattern::RandWrite,
        bs: 4096,
        qd: 32,
    },
    Workload {
        name: "1M seqread QD4",
        pattern: Pattern::SeqRead,
        bs: 1 << 20,
        qd: 4,
    },
    Workload {
        name: "1M seqwrite QD4",
        pattern: Pattern::SeqWrite,
        bs: 1 << 20,
        qd: 4,
    },
    Workload {
        name: "4K 70/30 mix QD32",
        pattern: Pattern::Mix,
        bs: 4096,
        qd: 32,
    },
];

/// One backend configuration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Config {
    pub(crate) name: &'static str,
    pub(crate) grant_mode: &'static str,
    pub(crate) persistent: bool,
    pub(crate) queues: u32,
    /// `--poll-us` (none: blkbackd's default, adaptive polling up to 200 µs on 2 CPUs or more).
    pub(crate) poll_us: Option<u32>,
    /// `--sqpoll`: a kernel thread submits (its CPU time is the process's, so it shows in the
    /// CPU column).
    pub(crate) sqpoll: bool,
}

pub(crate) const CONFIGS: &[Config] = &[
    Config {
        name: "copy",
        grant_mode: "copy",
        persistent: false,
        queues: 1,
        poll_us: None,
        sqpoll: false,
    },
    Config {
        name: "map+persistent",
        grant_mode: "map",
        persistent: true,
        queues: 1,
        poll_us: None,
        sqpoll: false,
    },
    Config {
        name: "copy 2-queue",
        grant_mode: "copy",
        persistent: false,
        queues: 2,
        poll_us: None,
        sqpoll: false,
    },
    Config {
        name: "copy no poll",
        grant_mode: "copy",
        persistent: false,
        queues: 1,
        poll_us: Some(0),
        sqpoll: false,
    },
    Config {
        name: "map+persistent no poll",
        grant_mode: "map",
        persistent: true,
        queues: 1,
        poll_us: Some(0),
        sqpoll: false,
    },
    Config {
        name: "copy sqpoll",
        grant_mode: "copy",
        persistent: false,
        queues: 1,
        poll_us: None,
        sqpoll: true,
    },
];

/// Whether configuration `c` runs workload `w` (multi-queue configurations skip QD1: one
/// request cannot use two queues).
pub(crate) fn runs(c: &Config, w: &Workload) -> bool {
    c.queues == 1 || w.qd > 1
}

/// The configuration of `--baseline` cases (no blkbackd).
pub(crate) const NO_CONFIG: Config = Config {
    name: "-",
    grant_mode: "copy",
    persistent: false,
    queues: 1,
    poll_us: None,
    sqpoll: false,
};
