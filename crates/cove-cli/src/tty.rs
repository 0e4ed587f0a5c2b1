//! The local terminal: raw mode while a sandboxed program owns it.

use std::os::fd::AsFd;

use nix::sys::termios::{self, SetArg, Termios};

/// Restores the terminal's settings when dropped.
#[derive(Debug)]
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// Put stdin's terminal in raw mode, if stdin is a terminal.
    pub fn enable() -> Option<RawMode> {
        let stdin = std::io::stdin();
        let fd = stdin.as_fd();
        let saved = termios::tcgetattr(fd).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(fd, SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let stdin = std::io::stdin();
        let _ = termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

/// The terminal size of stdout (or stdin), as (rows, cols).
pub fn size() -> Option<(u16, u16)> {
    for fd in [std::io::stdout().as_fd(), std::io::stdin().as_fd()] {
        let mut ws: libc::winsize = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one winsize into a valid pointer.
        let rc = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                libc::TIOCGWINSZ,
                &mut ws,
            )
        };
        if rc == 0 && ws.ws_row > 0 && ws.ws_col > 0 {
            return Some((ws.ws_row, ws.ws_col));
        }
    }
    None
}
