//! A horizontal bar chart written as a PNG with no dependencies: RGB pixels, a 3x5 bitmap
//! font scaled 2x, and a PNG encoder with a run-length deflate (fixed Huffman codes).

use std::path::Path;

const SCALE: usize = 2;
const GLYPH_W: usize = 4 * SCALE;

/// 3x5 glyphs, rows top to bottom, 3 bits a row (left bit first).
fn glyph(c: char) -> [u8; 5] {
    match c.to_ascii_uppercase() {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        'A' => [2, 5, 7, 5, 5],
        'B' => [6, 5, 6, 5, 6],
        'C' => [3, 4, 4, 4, 3],
        'D' => [6, 5, 5, 5, 6],
        'E' => [7, 4, 6, 4, 7],
        'F' => [7, 4, 6, 4, 4],
        'G' => [3, 4, 5, 5, 3],
        'H' => [5, 5, 7, 5, 5],
        'I' => [7, 2, 2, 2, 7],
        'J' => [1, 1, 1, 5, 2],
        'K' => [5, 5, 6, 5, 5],
        'L' => [4, 4, 4, 4, 7],
        'M' => [5, 7, 7, 5, 5],
        'N' => [6, 5, 5, 5, 5],
        'O' => [2, 5, 5, 5, 2],
        'P' => [6, 5, 6, 4, 4],
        'Q' => [2, 5, 5, 6, 3],
        'R' => [6, 5, 6, 5, 5],
        'S' => [3, 4, 2, 1, 6],
        'T' => [7, 2, 2, 2, 2],
        'U' => [5, 5, 5, 5, 7],
        'V' => [5, 5, 5, 5, 2],
        'W' => [5, 5, 7, 7, 5],
        'X' => [5, 5, 2, 5, 5],
        'Y' => [5, 5, 2, 2, 2],
        'Z' => [7, 1, 2, 4, 7],
        '.' => [0, 0, 0, 0, 2],
        '/' => [1, 1, 2, 4, 4],
        '+' => [0, 2, 7, 2, 0],
        ',' => [0, 0, 0, 2, 4],
        '(' => [2, 4, 4, 4, 2],
        ')' => [2, 1, 1, 1, 2],
        '-' => [0, 0, 7, 0, 0],
        '%' => [5, 1, 2, 4, 5],
        ':' => [0, 2, 0, 2, 0],
        '=' => [0, 7, 0, 7, 0],
        '_' => [0, 0, 0, 0, 7],
        _ => [0; 5],
    }
}

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Self {
            w,
            h,
            px: vec![255; w * h * 3],
        }
    }

    fn rect(&mut self, x: usize, y: usize, w: usize, h: usize, rgb: [u8; 3]) {
        for yy in y..(y + h).min(self.h) {
            for xx in x..(x + w).min(self.w) {
                let i = (yy * self.w + xx) * 3;
                self.px[i..i + 3].copy_from_slice(&rgb);
            }
        }
    }

    fn text(&mut self, x: usize, y: usize, s: &str) {
        for (k, c) in s.chars().enumerate() {
            let g = glyph(c);
            for (row, bits) in g.iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        self.rect(
                            x + k * GLYPH_W + col * SCALE,
                            y + row * SCALE,
                            SCALE,
                            SCALE,
                            [0, 0, 0],
                        );
                    }
                }
            }
        }
    }

    fn png(&self) -> Vec<u8> {
        // Filter "Sub" on every row (each byte minus the same channel of the pixel to its
        // left), so that flat areas become runs of zeros for the run-length deflate.
        let stride = self.w * 3;
        let mut raw = Vec::with_capacity((stride + 1) * self.h);
        for row in self.px.chunks(stride) {
            raw.push(1);
            for (i, &b) in row.iter().enumerate() {
                raw.push(b.wrapping_sub(if i >= 3 { row[i - 3] } else { 0 }));
            }
        }
        let mut z = vec![0x78, 0x01];
        z.extend_from_slice(&deflate_rle(&raw));
        let (mut a, mut b) = (1u32, 0u32);
        for &x in &raw {
            a = (a + u32::from(x)) % 65521;
            b = (b + a) % 65521;
        }
        z.extend_from_slice(&((b << 16) | a).to_be_bytes());
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&(self.w as u32).to_be_bytes());
        ihdr.extend_from_slice(&(self.h as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        chunk(&mut out, b"IHDR", &ihdr);
        chunk(&mut out, b"IDAT", &z);
        chunk(&mut out, b"IEND", &[]);
        out
    }
}

/// Bits, least significant first, as deflate packs them.
#[derive(Default)]
struct Bits {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl Bits {
    fn put(&mut self, v: u32, n: u32) {
        self.acc |= u64::from(v) << self.n;
        self.n += n;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    /// A Huffman code: its bits go most significant first.
    fn code(&mut self, code: u32, len: u32) {
        let rev = code.reverse_bits() >> (32 - len);
        self.put(rev, len);
    }

    fn literal(&mut self, sym: u32) {
        match sym {
            0..=143 => self.code(0x30 + sym, 8),
            144..=255 => self.code(0x190 + sym - 144, 9),
            256..=279 => self.code(sym - 256, 7),
            _ => self.code(0xc0 + sym - 280, 8),
        }
    }

    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

/// Deflate with the fixed Huffman codes and only distance-1 matches (runs of a byte).
fn deflate_rle(data: &[u8]) -> Vec<u8> {
    const BASE: [u16; 29] = [
        3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115,
        131, 163, 195, 227, 258,
    ];
    const EXTRA: [u32; 29] = [
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
    ];
    let mut bits = Bits::default();
    bits.put(1, 1); // BFINAL
    bits.put(1, 2); // BTYPE 01: fixed codes
    let mut i = 0;
    while i < data.len() {
        let mut run = 0;
        if i > 0 {
            while run < 258 && i + run < data.len() && data[i + run] == data[i - 1] {
                run += 1;
            }
        }
        if run >= 3 {
            let k = BASE
                .iter()
                .rposition(|&b| usize::from(b) <= run)
                .unwrap_or(0);
            bits.literal(257 + k as u32);
            bits.put((run - usize::from(BASE[k])) as u32, EXTRA[k]);
            bits.code(0, 5); // distance 1
            i += run;
        } else {
            bits.literal(u32::from(data[i]));
            i += 1;
        }
    }
    bits.literal(256);
    bits.finish()
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
}

/// A bar: its label, its value (a median) and the spread around it (min, max).
pub type Bar = (String, f64, Option<(f64, f64)>);

/// Bars of `(label, value)` on a 0..1.2 scale, with marks at 0.9, 0.97 and 1.0.
pub fn bars(path: &Path, title: &str, bars: &[(String, f64)]) -> std::io::Result<()> {
    let bars: Vec<Bar> = bars.iter().map(|(l, v)| (l.clone(), *v, None)).collect();
    bars_spread(path, title, &bars)
}

/// Bars of `(label, median, (min, max))`: the median as the bar, the spread as a black
/// whisker across its end.
pub fn bars_spread(path: &Path, title: &str, bars: &[Bar]) -> std::io::Result<()> {
    let label_w = bars.iter().map(|(l, _, _)| l.len()).max().unwrap_or(10) * GLYPH_W + 16;
    let plot_w = 480;
    let row = 18;
    let top = 40;
    let w = label_w + plot_w + 80;
    let h = top + row * bars.len() + 50;
    let mut c = Canvas::new(w, h);
    c.text(8, 10, title);
    let x_of = |v: f64| label_w + ((v.clamp(0.0, 1.2) / 1.2) * plot_w as f64) as usize;
    for (i, (label, v, spread)) in bars.iter().enumerate() {
        let v = &v.max(0.0);
        let y = top + i * row;
        c.text(8, y + 3, label);
        let color = if *v >= 0.9 {
            [60, 150, 80]
        } else {
            [200, 80, 60]
        };
        c.rect(label_w, y, x_of(*v) - label_w, row - 4, color);
        let mut label_x = x_of(*v) + 6;
        if let Some((lo, hi)) = spread.filter(|(lo, hi)| lo.is_finite() && hi.is_finite()) {
            let (x0, x1) = (x_of(lo.max(0.0)), x_of(hi.max(0.0)));
            c.rect(x0, y + (row - 4) / 2 - 1, (x1 - x0).max(1), 2, [0, 0, 0]);
            c.rect(x0, y + 2, 1, row - 8, [0, 0, 0]);
            c.rect(x1, y + 2, 1, row - 8, [0, 0, 0]);
            label_x = label_x.max(x1 + 6);
        }
        c.text(label_x, y + 3, &format!("{v:.2}"));
    }
    for (k, mark) in [0.9, 0.97, 1.0].into_iter().enumerate() {
        let x = x_of(mark);
        c.rect(x, top - 6, 1, row * bars.len() + 6 + k * 12, [80, 80, 200]);
        c.text(x.saturating_sub(8), h - 26 + k * 12, &format!("{mark}"));
    }
    std::fs::write(path, c.png())
}
