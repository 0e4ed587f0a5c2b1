//! Non-blocking reads and writes on pipes and PTY masters through tokio's
//! `AsyncFd`, so both kinds of descriptor share one code path.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use bytes::BytesMut;
use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use tokio::io::unix::AsyncFd;

/// Mark `fd` non-blocking and close-on-exec and register it with tokio.
pub fn async_fd(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    set_flags(&fd, true)?;
    // SAFETY: an `OwnedFd` stays open and refers to the same description
    // until the `AsyncFd` that owns it is dropped.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// Register a process's pipe end or PTY master, already close-on-exec and
/// with no status flag but its access mode (as the agent creates them), as
/// non-blocking with tokio: one `fcntl` where [`async_fd`] makes three.
pub fn async_pipe(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    fcntl(&fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    // SAFETY: as in `async_fd`.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

pub fn set_flags(fd: &OwnedFd, nonblocking: bool) -> std::io::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    let flags = if nonblocking {
        flags | OFlag::O_NONBLOCK
    } else {
        flags - OFlag::O_NONBLOCK
    };
    fcntl(fd, FcntlArg::F_SETFL(flags))?;
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Ok(())
}

/// Read what is available, at most `max` bytes (and at most what `buf`
/// has room for), into `buf`'s spare capacity, waiting until something
/// is. `Ok(0)` is end of file; a PTY master whose terminal has no more
/// writers reports `EIO`, which is end of file too.
pub async fn read_buf(
    fd: &AsyncFd<OwnedFd>,
    buf: &mut BytesMut,
    max: usize,
) -> std::io::Result<usize> {
    loop {
        let mut guard = fd.readable().await?;
        let spare = buf.spare_capacity_mut();
        let room = spare.len().min(max);
        let spare = &mut spare[..room];
        match guard.try_io(|inner| {
            // SAFETY: read(2) writes at most `spare.len()` bytes to memory
            // this function borrows mutably, and nothing reads it first.
            let rc =
                unsafe { libc::read(inner.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len()) };
            match usize::try_from(rc) {
                Ok(n) => Ok(n),
                Err(_) => match std::io::Error::last_os_error() {
                    e if e.raw_os_error() == Some(libc::EIO) => Ok(0),
                    e => Err(e),
                },
            }
        }) {
            Ok(Ok(n)) => {
                // SAFETY: read(2) initialised the first `n` spare bytes.
                unsafe { buf.set_len(buf.len() + n) };
                return Ok(n);
            }
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
}

/// Write all of `data`.
pub async fn write_all(fd: &AsyncFd<OwnedFd>, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        let mut guard = fd.writable().await?;
        match guard.try_io(|inner| {
            nix::unistd::write(inner.get_ref().as_fd(), data).map_err(std::io::Error::from)
        }) {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}

/// Set a terminal's window size.
pub fn set_winsize(fd: &impl AsRawFd, rows: u16, cols: u16) -> std::io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from a valid pointer.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}
