//! Medians and min-max spreads of repeated figures, and how they are printed.

use super::*;

pub(crate) fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.prec$}"))
}

/// The median of a case's repeats and their min-max spread; NaN where nothing was measured.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Spread {
    pub(crate) med: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
}

pub(crate) fn spread(v: impl IntoIterator<Item = f64>) -> Spread {
    let mut v: Vec<f64> = v.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return Spread {
            med: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
        };
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Spread {
        med,
        min: v[0],
        max: v[n - 1],
    }
}

impl Spread {
    /// The median alone.
    pub(crate) fn m(&self, prec: usize) -> String {
        num(self.med, prec, false)
    }
    /// The median with its spread: `0.62 (0.58–0.66)`.
    pub(crate) fn ms(&self, prec: usize, sign: bool) -> String {
        if !self.med.is_finite() {
            return "n/a".into();
        }
        format!(
            "{} ({}–{})",
            num(self.med, prec, sign),
            num(self.min, prec, sign),
            num(self.max, prec, sign)
        )
    }
}

pub(crate) fn num(v: f64, prec: usize, sign: bool) -> String {
    match (v.is_finite(), sign) {
        (false, _) => "n/a".into(),
        (true, true) => format!("{v:+.prec$}"),
        (true, false) => format!("{v:.prec$}"),
    }
}

/// One case: a workload on a target through one backend configuration, with the figures of
/// each interleaved repeat.
pub(crate) struct Case {
    pub(crate) target: &'static str,
    pub(crate) workload: Workload,
    pub(crate) config: Config,
    /// Direct io_uring, blkbackd (A), the `--compare` blkbackd (B), fio: one `Fig` per
    /// repeat; `b` and `f` empty where not run.
    pub(crate) d: Vec<Fig>,
    pub(crate) a: Vec<Fig>,
    pub(crate) b: Vec<Fig>,
    pub(crate) f: Vec<Fig>,
    /// System calls per request of A and B, from a counting run of their own.
    pub(crate) sys_a: f64,
    pub(crate) sys_b: f64,
    /// `--baseline`: other direct variants, run in the same repeats.
    pub(crate) more: Vec<(&'static str, Vec<Fig>)>,
}

impl Case {
    /// A case with nothing measured yet.
    pub(crate) fn new(target: &'static str, workload: Workload, config: Config) -> Self {
        Self {
            target,
            workload,
            config,
            d: vec![],
            a: vec![],
            b: vec![],
            f: vec![],
            sys_a: f64::NAN,
            sys_b: f64::NAN,
            more: vec![],
        }
    }
}

pub(crate) fn of(v: &[Fig], k: impl Fn(&Fig) -> f64) -> Spread {
    spread(v.iter().map(k))
}
/// The per-repeat ratio `x / y` of a figure.
pub(crate) fn ratio(x: &[Fig], y: &[Fig], k: impl Fn(&Fig) -> f64) -> Spread {
    spread(x.iter().zip(y).map(|(a, b)| k(a) / k(b)))
}
/// The per-repeat difference `x − y` of a figure.
pub(crate) fn diff(x: &[Fig], y: &[Fig], k: impl Fn(&Fig) -> f64) -> Spread {
    spread(x.iter().zip(y).map(|(a, b)| k(a) - k(b)))
}
