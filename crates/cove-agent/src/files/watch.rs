//! Watching a path with inotify until the host cancels.
//!
//! inotify takes paths, not descriptors, so each directory is first opened
//! the safe way (see [`super::path`]) and then watched through the agent's
//! own `/proc/self/fd/N` link to that descriptor: the watch lands on
//! exactly the directory that was resolved, whatever happens to the path.
//!
//! Events are credit-limited like downloads. While the host is not reading,
//! the agent stops reading inotify; the kernel queue then overflows and the
//! host gets an explicit `Overflow` event instead of unbounded memory.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

use cove_protocol::fs::{FileKind, FsDone, FsError, FsErrorKind, FsEvent, FsReply};
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
use nix::sys::stat::Mode;

use super::control::Ctx;
use super::ops::{MAX_DEPTH, read_names};
use super::path::{Root, errno_error, join, kind_of, shown};

/// Most directories one recursive watch covers.
const MAX_WATCHES: usize = 8192;

/// How often a waiting watch checks whether it was cancelled.
const TICK: Duration = Duration::from_millis(200);

struct Watcher<'a> {
    root: &'a Root,
    ctx: &'a Ctx,
    inotify: Inotify,
    recursive: bool,
    /// Watched directory (or file) of each watch descriptor.
    paths: HashMap<WatchDescriptor, String>,
    top: Option<WatchDescriptor>,
    top_is_dir: bool,
}

fn dir_mask() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_ONLYDIR
}

fn file_mask() -> AddWatchFlags {
    AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF
}

/// Watch what `fd` refers to, through the agent's own link to it.
fn add_watch(
    inotify: &Inotify,
    fd: &OwnedFd,
    mask: AddWatchFlags,
    at: &str,
) -> Result<WatchDescriptor, FsError> {
    let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
    inotify.add_watch(link.as_str(), mask).map_err(|e| match e {
        nix::errno::Errno::ENOSPC => FsError::new(
            FsErrorKind::NoSpace,
            "the sandbox has used up its inotify watches (fs.inotify.max_user_watches)",
        ),
        nix::errno::Errno::ENOENT => FsError::new(
            FsErrorKind::Io,
            "watching needs /proc mounted in the sandbox",
        ),
        other => errno_error(other, at),
    })
}

impl Watcher<'_> {
    fn send(&self, event: FsEvent) -> Result<(), FsError> {
        // One unit of credit per event; wait (checking for cancellation).
        while !self.ctx.take_one_credit(TICK)? {}
        self.ctx.send(FsReply::Event { event })
    }

    /// Watch the directory `fd` (at `at`) and, when recursive, everything
    /// below it on the same file system. With `report`, entries found
    /// below are reported as created (they appeared in a new directory
    /// before its watch existed).
    fn watch_tree(
        &mut self,
        fd: OwnedFd,
        at: String,
        depth: u32,
        report: bool,
    ) -> Result<WatchDescriptor, FsError> {
        if self.paths.len() >= MAX_WATCHES {
            return Err(FsError::new(
                FsErrorKind::NoSpace,
                format!("a watch covers at most {MAX_WATCHES} directories"),
            ));
        }
        let wd = add_watch(&self.inotify, &fd, dir_mask(), &at)?;
        self.paths.insert(wd, at.clone());
        if !self.recursive || depth >= 4 * MAX_DEPTH {
            return Ok(wd);
        }
        let dev = nix::sys::stat::fstat(&fd).map(|s| s.st_dev).ok();
        let Ok(names) = read_names(&fd) else {
            return Ok(wd);
        };
        for name in names {
            let child_path = join(&at, &name.to_string_lossy());
            let Ok(st) = nix::sys::stat::fstatat(
                fd.as_fd(),
                name.as_c_str(),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            ) else {
                continue;
            };
            let is_dir = kind_of(&st) == FileKind::Dir;
            if report {
                self.send(FsEvent::Create {
                    path: child_path.clone(),
                    dir: is_dir,
                })?;
            }
            if !is_dir || Some(st.st_dev) != dev {
                continue;
            }
            if let Ok(child) = nix::fcntl::openat(
                fd.as_fd(),
                name.as_c_str(),
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            ) && !self.root.is_process_file(&child)
            {
                self.watch_tree(child, child_path, depth + 1, report)?;
            }
        }
        Ok(wd)
    }

    /// A directory appeared under a recursive watch: watch it, and report
    /// what is already in it.
    fn watch_new_dir(&mut self, at: &str) -> Result<(), FsError> {
        if let Ok(fd) = self.root.open_at(
            at,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
            0,
        ) {
            self.watch_tree(fd, at.to_string(), 1, true)?;
        }
        Ok(())
    }

    fn path_of(&self, event: &InotifyEvent) -> Option<String> {
        let base = self.paths.get(&event.wd)?;
        Some(match &event.name {
            Some(name) => join(base, &name.to_string_lossy()),
            None => base.clone(),
        })
    }

    /// A directory was renamed inside the tree: its watches keep working
    /// under the new name.
    fn renamed(&mut self, from: &str, to: &str) {
        let prefix = format!("{from}/");
        for path in self.paths.values_mut() {
            if path == from {
                *path = to.to_string();
            } else if let Some(rest) = path.strip_prefix(&prefix) {
                *path = format!("{to}/{rest}");
            }
        }
    }

    /// Translate one batch of kernel events. Returns false once the
    /// watched path itself is gone.
    fn handle(&mut self, events: Vec<InotifyEvent>) -> Result<bool, FsError> {
        let mut moved_from: Option<(u32, String, bool)> = None;
        let mut last_modified: Option<String> = None;
        for event in events {
            let mask = event.mask;
            if mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                self.send(FsEvent::Overflow)?;
                continue;
            }
            if mask.contains(AddWatchFlags::IN_IGNORED) {
                self.paths.remove(&event.wd);
                if Some(event.wd) == self.top {
                    return Ok(false);
                }
                continue;
            }
            let Some(path) = self.path_of(&event) else {
                continue;
            };
            let dir = mask.contains(AddWatchFlags::IN_ISDIR);
            if !mask.contains(AddWatchFlags::IN_MODIFY) {
                last_modified = None;
            }
            if !mask.contains(AddWatchFlags::IN_MOVED_TO)
                && let Some((_, from, was_dir)) = moved_from.take()
            {
                self.send(FsEvent::Move {
                    from: Some(from),
                    to: None,
                    dir: was_dir,
                })?;
            }
            if mask.contains(AddWatchFlags::IN_CREATE) {
                self.send(FsEvent::Create {
                    path: path.clone(),
                    dir,
                })?;
                if dir && self.recursive {
                    self.watch_new_dir(&path)?;
                }
            } else if mask.contains(AddWatchFlags::IN_MODIFY) {
                // A burst of writes to one file is one event.
                if last_modified.as_deref() != Some(path.as_str()) {
                    self.send(FsEvent::Modify { path: path.clone() })?;
                    last_modified = Some(path);
                }
            } else if mask.contains(AddWatchFlags::IN_DELETE) {
                self.send(FsEvent::Delete { path, dir })?;
            } else if mask.contains(AddWatchFlags::IN_MOVED_FROM) {
                moved_from = Some((event.cookie, path, dir));
            } else if mask.contains(AddWatchFlags::IN_MOVED_TO) {
                let from = match moved_from.take() {
                    Some((cookie, from, _)) if cookie == event.cookie => Some(from),
                    Some((_, other, was_dir)) => {
                        self.send(FsEvent::Move {
                            from: Some(other),
                            to: None,
                            dir: was_dir,
                        })?;
                        None
                    }
                    None => None,
                };
                if dir && self.recursive {
                    match &from {
                        Some(from) => self.renamed(from, &path),
                        None => self.watch_new_dir(&path)?,
                    }
                }
                self.send(FsEvent::Move {
                    from,
                    to: Some(path),
                    dir,
                })?;
            } else if mask.contains(AddWatchFlags::IN_DELETE_SELF) && Some(event.wd) == self.top {
                self.send(FsEvent::Delete {
                    path,
                    dir: self.top_is_dir,
                })?;
            } else if mask.contains(AddWatchFlags::IN_MOVE_SELF) && Some(event.wd) == self.top {
                self.send(FsEvent::Move {
                    from: Some(path),
                    to: None,
                    dir: self.top_is_dir,
                })?;
                return Ok(false);
            }
        }
        if let Some((_, from, dir)) = moved_from {
            self.send(FsEvent::Move {
                from: Some(from),
                to: None,
                dir,
            })?;
        }
        Ok(true)
    }
}

/// Watch `path` until cancelled (or until the path itself goes away).
pub(crate) fn watch(
    root: &Root,
    ctx: &Ctx,
    path: &str,
    recursive: bool,
) -> Result<FsDone, FsError> {
    let abs = root.absolute(path)?;
    let fd = root.open_at(
        &abs,
        OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY,
        0,
    )?;
    let st = nix::sys::stat::fstat(&fd).map_err(|e| errno_error(e, &abs))?;
    let top_is_dir = kind_of(&st) == FileKind::Dir;
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
        .map_err(|e| errno_error(e, "inotify"))?;
    let mut watcher = Watcher {
        root,
        ctx,
        inotify,
        recursive: recursive && top_is_dir,
        paths: HashMap::new(),
        top: None,
        top_is_dir,
    };
    let top = if top_is_dir {
        let fresh = fd
            .try_clone()
            .map_err(|e| super::path::io_error(&e, &abs))?;
        watcher.watch_tree(fresh, abs.clone(), 1, false)?
    } else {
        let wd = add_watch(&watcher.inotify, &fd, file_mask(), &abs)?;
        watcher.paths.insert(wd, abs.clone());
        wd
    };
    watcher.top = Some(top);
    drop(fd);
    ctx.send(FsReply::Ready {
        entry: Some(super::path::entry(
            abs.clone(),
            super::path::base_name(&abs),
            &st,
            None,
        )),
    })?;
    loop {
        ctx.check()?;
        let ready = {
            let mut fds = [PollFd::new(watcher.inotify.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(TICK.as_millis() as u16)) {
                Ok(n) => n > 0,
                Err(nix::errno::Errno::EINTR) => false,
                Err(e) => return Err(errno_error(e, "inotify")),
            }
        };
        if !ready {
            continue;
        }
        let events = match watcher.inotify.read_events() {
            Ok(events) => events,
            Err(nix::errno::Errno::EAGAIN) => continue,
            Err(e) => return Err(errno_error(e, &shown(&abs))),
        };
        if !watcher.handle(events)? {
            return Ok(FsDone::Ok);
        }
    }
}
