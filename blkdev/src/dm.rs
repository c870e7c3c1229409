//! Device-mapper's control ioctls (`include/uapi/linux/dm-ioctl.h`): `struct dm_ioctl`
//! encoded by hand (its layout checked by tests), with a table of targets for
//! `DM_TABLE_LOAD`, and the call on `/dev/mapper/control`.

use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::io::Errno;
use rustix::ioctl::{opcode, Opcode};

use ::ioctl::call as ioctl;

/// Size of `struct dm_ioctl`.
pub const DM_IOCTL_SIZE: usize = 312;
/// `DM_NAME_LEN`.
pub const DM_NAME_LEN: usize = 128;
/// `DM_UUID_LEN`.
pub const DM_UUID_LEN: usize = 129;
/// Size of `struct dm_target_spec`.
pub const DM_TARGET_SPEC_SIZE: usize = 40;
/// `DM_MAX_TYPE_NAME`.
pub const DM_MAX_TYPE_NAME: usize = 16;
/// The interface major version this code speaks.
pub const DM_VERSION_MAJOR: u32 = 4;
/// The first interface minor with [`DM_FILE_DESCRIPTOR_FLAG`] (kernel-patches/README.md).
pub const FD_INTERFACE_MINOR: u32 = 49;

const OFF_VERSION: usize = 0;
const OFF_DATA_SIZE: usize = 12;
const OFF_DATA_START: usize = 16;
const OFF_TARGET_COUNT: usize = 20;
const OFF_OPEN_COUNT: usize = 24;
const OFF_FLAGS: usize = 28;
const OFF_FD: usize = 36;
const OFF_DEV: usize = 40;
const OFF_NAME: usize = 48;
const OFF_UUID: usize = 176;

/// `DM_READONLY_FLAG`.
pub const DM_READONLY_FLAG: u32 = 1 << 0;
/// `DM_SUSPEND_FLAG`.
pub const DM_SUSPEND_FLAG: u32 = 1 << 1;
/// `DM_ACTIVE_PRESENT_FLAG`.
pub const DM_ACTIVE_PRESENT_FLAG: u32 = 1 << 5;
/// `DM_DEFERRED_REMOVE`.
pub const DM_DEFERRED_REMOVE: u32 = 1 << 17;
/// The series' `DM_FILE_DESCRIPTOR_FLAG` (on `DM_TABLE_LOAD`, interface 4.49).
pub const DM_FILE_DESCRIPTOR_FLAG: u32 = 1 << 20;

const fn dm_op(nr: u8) -> Opcode {
    opcode::read_write::<[u8; DM_IOCTL_SIZE]>(0xfd, nr)
}
/// `DM_VERSION`.
pub const DM_VERSION: Opcode = dm_op(0);
/// `DM_DEV_CREATE`.
pub const DM_DEV_CREATE: Opcode = dm_op(3);
/// `DM_DEV_REMOVE`.
pub const DM_DEV_REMOVE: Opcode = dm_op(4);
/// `DM_DEV_SUSPEND` (also resumes, without [`DM_SUSPEND_FLAG`]).
pub const DM_DEV_SUSPEND: Opcode = dm_op(6);
/// `DM_DEV_STATUS`.
pub const DM_DEV_STATUS: Opcode = dm_op(7);
/// `DM_TABLE_LOAD`.
pub const DM_TABLE_LOAD: Opcode = dm_op(9);

/// Which device a request is about (device-mapper looks up by uuid, else name, else number).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// By name.
    Name(String),
    /// By uuid.
    Uuid(String),
    /// By device number.
    Dev(u32, u32),
    /// None (`DM_VERSION`), or both name and uuid (`DM_DEV_CREATE`).
    Create {
        /// Name.
        name: String,
        /// Uuid.
        uuid: String,
    },
    /// Nothing.
    None,
}

/// One table line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// First sector.
    pub start: u64,
    /// Length in sectors.
    pub length: u64,
    /// Target type, e.g. `linear`.
    pub kind: String,
    /// Its parameters, e.g. `8:16 0`.
    pub params: String,
}

/// A request: header fields that go in, plus the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Interface version asked for (`{4, minor, 0}`).
    pub minor: u32,
    /// `DM_*_FLAG`s.
    pub flags: u32,
    /// The device.
    pub lookup: Lookup,
    /// Table lines (`DM_TABLE_LOAD` only).
    pub targets: Vec<Target>,
}

/// The header fields that come back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Interface version of the kernel (for `DM_VERSION`).
    pub version: [u32; 3],
    /// Flags out.
    pub flags: u32,
    /// Open count.
    pub open_count: i32,
    /// Device number.
    pub dev: (u32, u32),
    /// Name.
    pub name: String,
    /// Uuid.
    pub uuid: String,
    /// The fd field (offset 36; meaningful only with [`DM_FILE_DESCRIPTOR_FLAG`]).
    pub fd: i32,
}

/// Encodes a Linux `dev_t` the way `huge_encode_dev` does for `dm_ioctl.dev`.
#[must_use]
pub fn encode_dev(major: u32, minor: u32) -> u64 {
    let (major, minor) = (u64::from(major), u64::from(minor));
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

/// Decodes `dm_ioctl.dev`.
#[must_use]
pub fn decode_dev(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) as u32;
    let minor = ((dev & 0xff) | ((dev >> 12) & 0xfff00)) as u32;
    (major, minor)
}

fn put_u32(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

fn get_u32(buf: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[off..off + 4]);
    u32::from_ne_bytes(b)
}

fn put_str(buf: &mut [u8], off: usize, cap: usize, s: &str) -> Result<(), Errno> {
    // Room for the NUL; an interior NUL would silently cut the name.
    if s.len() >= cap || s.as_bytes().contains(&0) {
        return Err(Errno::NAMETOOLONG);
    }
    buf[off..off + s.len()].copy_from_slice(s.as_bytes());
    Ok(())
}

fn get_str(buf: &[u8], off: usize, cap: usize) -> String {
    let field = &buf[off..off + cap];
    let end = field.iter().position(|&b| b == 0).unwrap_or(cap);
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// Room left after the header for what the kernel writes back (`DM_DEV_STATUS` and friends
/// need none; the table is sized exactly).
const SPARE: usize = 1024;

impl Request {
    /// The bytes handed to the kernel: the header, then each target spec followed by its
    /// NUL-terminated parameters padded to 8 bytes (`next` = offset to the next spec).
    ///
    /// # Errors
    /// `ENAMETOOLONG` when a name, uuid or target type does not fit its field.
    pub fn encode(&self) -> Result<Vec<u8>, Errno> {
        let mut buf = vec![0u8; DM_IOCTL_SIZE];
        put_u32(&mut buf, OFF_VERSION, DM_VERSION_MAJOR);
        put_u32(&mut buf, OFF_VERSION + 4, self.minor);
        put_u32(&mut buf, OFF_DATA_START, DM_IOCTL_SIZE as u32);
        put_u32(&mut buf, OFF_FLAGS, self.flags);
        if self.flags & DM_FILE_DESCRIPTOR_FLAG != 0 {
            // No fd until the kernel writes one: a kernel without the series leaves -1.
            put_u32(&mut buf, OFF_FD, u32::MAX);
        }
        match &self.lookup {
            Lookup::Name(n) => put_str(&mut buf, OFF_NAME, DM_NAME_LEN, n)?,
            Lookup::Uuid(u) => put_str(&mut buf, OFF_UUID, DM_UUID_LEN, u)?,
            Lookup::Dev(major, minor) => {
                buf[OFF_DEV..OFF_DEV + 8].copy_from_slice(&encode_dev(*major, *minor).to_ne_bytes())
            }
            Lookup::Create { name, uuid } => {
                put_str(&mut buf, OFF_NAME, DM_NAME_LEN, name)?;
                put_str(&mut buf, OFF_UUID, DM_UUID_LEN, uuid)?;
            }
            Lookup::None => {}
        }
        put_u32(
            &mut buf,
            OFF_TARGET_COUNT,
            u32::try_from(self.targets.len()).map_err(|_| Errno::TOOBIG)?,
        );
        for t in &self.targets {
            let start = buf.len();
            let params_len = t.params.len() + 1;
            let spec_len = (DM_TARGET_SPEC_SIZE + params_len).next_multiple_of(8);
            buf.resize(start + spec_len, 0);
            buf[start..start + 8].copy_from_slice(&t.start.to_ne_bytes());
            buf[start + 8..start + 16].copy_from_slice(&t.length.to_ne_bytes());
            put_u32(
                &mut buf,
                start + 20,
                u32::try_from(spec_len).map_err(|_| Errno::TOOBIG)?,
            );
            put_str(&mut buf, start + 24, DM_MAX_TYPE_NAME, &t.kind)?;
            if t.params.as_bytes().contains(&0) {
                return Err(Errno::INVAL);
            }
            buf[start + DM_TARGET_SPEC_SIZE..start + DM_TARGET_SPEC_SIZE + t.params.len()]
                .copy_from_slice(t.params.as_bytes());
        }
        if self.targets.is_empty() {
            buf.resize(DM_IOCTL_SIZE + SPARE, 0);
        }
        let len = buf.len().next_multiple_of(8);
        buf.resize(len, 0);
        put_u32(
            &mut buf,
            OFF_DATA_SIZE,
            u32::try_from(len).map_err(|_| Errno::TOOBIG)?,
        );
        Ok(buf)
    }
}

impl Reply {
    /// Reads the header fields back.
    #[must_use]
    pub fn decode(buf: &[u8]) -> Self {
        let mut dev = [0u8; 8];
        dev.copy_from_slice(&buf[OFF_DEV..OFF_DEV + 8]);
        Self {
            version: [get_u32(buf, 0), get_u32(buf, 4), get_u32(buf, 8)],
            flags: get_u32(buf, OFF_FLAGS),
            open_count: get_u32(buf, OFF_OPEN_COUNT) as i32,
            dev: decode_dev(u64::from_ne_bytes(dev)),
            name: get_str(buf, OFF_NAME, DM_NAME_LEN),
            uuid: get_str(buf, OFF_UUID, DM_UUID_LEN),
            fd: get_u32(buf, OFF_FD) as i32,
        }
    }
}

/// Issues the device-mapper request `op` on `/dev/mapper/control` with `req`, and reads the
/// header the kernel wrote back. An fd the kernel returned (the series'
/// [`DM_FILE_DESCRIPTOR_FLAG`]) is closed: use [`call_with_fd`] to keep it.
///
/// # Errors
/// `ENAMETOOLONG` and friends from [`Request::encode`], else the kernel's error.
pub fn call(ctl: BorrowedFd<'_>, op: Opcode, req: &Request) -> Result<Reply, Errno> {
    call_with_fd(ctl, op, req).map(|(reply, _fd)| reply)
}

/// [`call`], and the fd the kernel returned when `req` asked for one with
/// [`DM_FILE_DESCRIPTOR_FLAG`] (the series' `DM_TABLE_LOAD`, interface 4.49), owned by the
/// caller.
///
/// # Errors
/// As [`call`].
pub fn call_with_fd(
    ctl: BorrowedFd<'_>,
    op: Opcode,
    req: &Request,
) -> Result<(Reply, Option<OwnedFd>), Errno> {
    let bytes = req.encode()?;
    // u64 words: the buffer is 8-byte aligned, as `struct dm_ioctl` (with its u64 `dev`) is.
    let mut words: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            u64::from_ne_bytes(w)
        })
        .collect();
    // SAFETY: DM ioctls read and write `data_size` bytes at the argument; `Request::encode`
    // sets `data_size` to the length of the encoded buffer, which is a multiple of 8 and all
    // of `words`, and `words` lives across the call.
    unsafe { ioctl(ctl, op, words.as_mut_ptr()) }?;
    let out: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let reply = Reply::decode(&out);
    let asked = req.flags & DM_FILE_DESCRIPTOR_FLAG != 0;
    let fd = (asked && reply.fd >= 0).then(|| {
        use std::os::fd::FromRawFd;
        // SAFETY: the request asked for an fd and succeeded, and the field was -1 before the
        // call (`Request::encode`), so a non-negative value is an fd the kernel installed in
        // our table for us just now, which nothing else in this process knows or owns.
        unsafe { OwnedFd::from_raw_fd(reply.fd) }
    });
    Ok((reply, fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers() {
        assert_eq!(DM_VERSION, 0xC138_FD00);
        assert_eq!(DM_DEV_CREATE, 0xC138_FD03);
        assert_eq!(DM_DEV_REMOVE, 0xC138_FD04);
        assert_eq!(DM_DEV_SUSPEND, 0xC138_FD06);
        assert_eq!(DM_DEV_STATUS, 0xC138_FD07);
        assert_eq!(DM_TABLE_LOAD, 0xC138_FD09);
        assert_eq!(DM_FILE_DESCRIPTOR_FLAG, 0x0010_0000);
        assert_eq!(DM_DEFERRED_REMOVE, 0x0002_0000);
    }

    #[test]
    fn header_layout() {
        let req = Request {
            minor: 49,
            flags: DM_READONLY_FLAG | DM_DEFERRED_REMOVE,
            lookup: Lookup::Create {
                name: "vm-1".into(),
                uuid: "U-1".into(),
            },
            targets: Vec::new(),
        };
        let b = req.encode().expect("encode");
        assert_eq!(b.len(), DM_IOCTL_SIZE + SPARE);
        assert_eq!(get_u32(&b, 0), 4);
        assert_eq!(get_u32(&b, 4), 49);
        assert_eq!(get_u32(&b, 8), 0);
        assert_eq!(get_u32(&b, 12) as usize, b.len(), "data_size");
        assert_eq!(get_u32(&b, 16), 312, "data_start");
        assert_eq!(get_u32(&b, 20), 0, "target_count");
        assert_eq!(get_u32(&b, 28), 0x2_0001, "flags");
        assert_eq!(&b[48..53], b"vm-1\0");
        assert_eq!(&b[176..180], b"U-1\0");
        assert!(b[305..312].iter().all(|&x| x == 0));
    }

    #[test]
    fn table_layout() {
        let req = Request {
            minor: 0,
            flags: 0,
            lookup: Lookup::Name("x".into()),
            targets: vec![
                Target {
                    start: 0,
                    length: 2048,
                    kind: "linear".into(),
                    params: "8:16 0".into(),
                },
                Target {
                    start: 2048,
                    length: 8,
                    kind: "zero".into(),
                    params: String::new(),
                },
            ],
        };
        let b = req.encode().expect("encode");
        assert_eq!(get_u32(&b, 20), 2);
        let t = 312;
        assert_eq!(&b[t..t + 8], &0u64.to_ne_bytes());
        assert_eq!(&b[t + 8..t + 16], &2048u64.to_ne_bytes());
        // 40-byte spec + "8:16 0\0" (7) = 47, padded to 48.
        assert_eq!(get_u32(&b, t + 20), 48, "next");
        assert_eq!(&b[t + 24..t + 31], b"linear\0");
        assert_eq!(&b[t + 40..t + 47], b"8:16 0\0");
        let t2 = t + 48;
        assert_eq!(&b[t2..t2 + 8], &2048u64.to_ne_bytes());
        assert_eq!(&b[t2 + 24..t2 + 29], b"zero\0");
        assert_eq!(get_u32(&b, t2 + 20), 48);
        assert_eq!(b.len(), t2 + 48);
        assert_eq!(get_u32(&b, 12) as usize, b.len());
    }

    #[test]
    fn refuses_fields_that_do_not_fit() {
        let long = |n| "a".repeat(n);
        let enc = |lookup| {
            Request {
                minor: 0,
                flags: 0,
                lookup,
                targets: Vec::new(),
            }
            .encode()
        };
        assert!(enc(Lookup::Name(long(127))).is_ok());
        assert_eq!(enc(Lookup::Name(long(128))), Err(Errno::NAMETOOLONG));
        assert!(enc(Lookup::Uuid(long(128))).is_ok());
        assert_eq!(enc(Lookup::Uuid(long(129))), Err(Errno::NAMETOOLONG));
        assert_eq!(enc(Lookup::Name("a\0b".into())), Err(Errno::NAMETOOLONG));
        let t = Target {
            start: 0,
            length: 1,
            kind: long(16),
            params: String::new(),
        };
        let r = Request {
            minor: 0,
            flags: 0,
            lookup: Lookup::None,
            targets: vec![t],
        };
        assert_eq!(r.encode(), Err(Errno::NAMETOOLONG));
    }

    #[test]
    fn dev_encoding_matches_huge_encode_dev() {
        assert_eq!(encode_dev(253, 0), 0xfd00);
        assert_eq!(encode_dev(8, 16), 0x0810);
        assert_eq!(encode_dev(253, 0x1234), 0x0120_fd34);
        for (ma, mi) in [(0, 0), (253, 0xfffff), (0xfff, 0x100), (7, 300)] {
            assert_eq!(decode_dev(encode_dev(ma, mi)), (ma, mi));
        }
        let mut b = Request {
            minor: 0,
            flags: 0,
            lookup: Lookup::Dev(253, 3),
            targets: Vec::new(),
        }
        .encode()
        .expect("encode");
        assert_eq!(&b[40..48], &0xfd03u64.to_ne_bytes());
        put_u32(&mut b, OFF_FD, 9);
        put_u32(&mut b, OFF_OPEN_COUNT, 2);
        let r = Reply::decode(&b);
        assert_eq!((r.dev, r.fd, r.open_count), ((253, 3), 9, 2));
    }
}
