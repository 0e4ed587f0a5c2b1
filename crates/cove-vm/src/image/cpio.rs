//! A writer for the `newc` cpio format, the only one the kernel unpacks
//! into its initramfs. Archives may be concatenated: the kernel unpacks each
//! in turn, which is how a VM's own configuration is added to the shared
//! base image without rewriting it.

use std::io::{self, Write};

/// Mode bits of the entry types cove writes.
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFCHR: u32 = 0o020000;

/// Writes one archive; [`CpioWriter::finish`] adds the trailer.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            written: 0,
            next_ino: 1,
        }
    }

    pub fn dir(&mut self, name: &str, mode: u32) -> io::Result<()> {
        self.entry(name, S_IFDIR | (mode & 0o7777), 2, (0, 0), &[])
    }

    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | (mode & 0o7777), 1, (0, 0), data)
    }

    pub fn char_device(&mut self, name: &str, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, S_IFCHR | (mode & 0o7777), 1, (major, minor), &[])
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let name = name.trim_start_matches('/');
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file over 4 GiB"))?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: fixed, so images are reproducible
            size,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for field in fields {
            header.push_str(&format!("{field:08X}"));
        }
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad(4)?;
        self.put(data)?;
        self.pad(4)
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self, align: u64) -> io::Result<()> {
        let pad = (align - self.written % align) % align;
        self.put(&vec![0; pad as usize])
    }

    /// Write the trailer and pad to 512 bytes, so another archive can follow.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[])?;
        self.pad(512)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_newc_headers_names_and_padding() -> io::Result<()> {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("/cove", 0o755)?;
        w.file("cove/a", 0o644, b"hello")?;
        w.char_device("dev/console", 0o600, 5, 1)?;
        let out = w.finish()?;
        assert_eq!(out.len() % 512, 0);
        assert!(out.starts_with(b"070701"));
        // First entry: mode field (second) is a directory, name follows the
        // 110-byte header, NUL-terminated, padded to 4.
        assert_eq!(&out[14..22], b"000041ED");
        assert_eq!(&out[110..115], b"cove\0");
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("cove/a\0"));
        let data_at = text.find("hello").unwrap_or(0);
        assert_eq!(data_at % 4, 0, "file data is 4-byte aligned");
        assert!(text.contains("TRAILER!!!"));
        // The character device carries its major:minor in rdev.
        let dev = text.find("dev/console").unwrap_or(0) - 110;
        assert_eq!(&out[dev + 78..dev + 94], b"0000000500000001");
        Ok(())
    }
}
