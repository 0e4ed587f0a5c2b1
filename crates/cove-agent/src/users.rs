//! Resolve a user spec (`name`, `uid`, `uid:gid`, `name:group`) against the
//! sandbox's own `/etc/passwd` and `/etc/group`. Parsed by hand so the agent
//! never loads NSS modules (it may be a static binary in a microVM).

use std::path::Path;

/// Who a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: Option<String>,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: String,
    pub shell: Option<String>,
}

impl Identity {
    pub fn root() -> Identity {
        Identity {
            name: Some("root".into()),
            uid: 0,
            gid: 0,
            groups: vec![0],
            home: "/root".into(),
            shell: Some("/bin/sh".into()),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error("user {0:?} does not exist in the sandbox's /etc/passwd")]
    NoSuchUser(String),
    #[error("group {0:?} does not exist in the sandbox's /etc/group")]
    NoSuchGroup(String),
    #[error("user {0:?} is not a name, a uid or uid:gid")]
    Malformed(String),
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
    shell: String,
}

/// Largest account database read; the rest is ignored.
const MAX_DB: u64 = 4 << 20;

/// Read one of the sandbox's account databases, which its own programs may
/// have replaced with anything: only a regular file is read (a FIFO would
/// block the agent, `/dev/zero` would never end), and at most `MAX_DB`
/// bytes of it. Anything else reads as empty.
fn read_db(path: &Path) -> String {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
    else {
        return String::new();
    };
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return String::new();
    }
    let mut bytes = Vec::new();
    if file.take(MAX_DB).read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn passwd(root: &Path) -> Vec<PasswdEntry> {
    let text = read_db(&root.join("etc/passwd"));
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 7 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_string(),
                shell: f[6].to_string(),
            })
        })
        .collect()
}

/// (name, gid, members)
fn groups(root: &Path) -> Vec<(String, u32, Vec<String>)> {
    let text = read_db(&root.join("etc/group"));
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            let members = f[3]
                .split(',')
                .filter(|m| !m.is_empty())
                .map(String::from)
                .collect();
            Some((f[0].to_string(), f[2].parse().ok()?, members))
        })
        .collect()
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 256 && !s.contains([':', '\0', '\n', '/'])
}

/// Resolve `spec` with `root` as the filesystem root (`/` inside a sandbox).
pub fn resolve(root: &Path, spec: &str) -> Result<Identity, UserError> {
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if !valid_name(user_part) || group_part.is_some_and(|g| !valid_name(g)) {
        return Err(UserError::Malformed(spec.to_string()));
    }
    let users = passwd(root);
    let all_groups = groups(root);

    let entry = match user_part.parse::<u32>() {
        Ok(uid) => users.iter().find(|e| e.uid == uid),
        Err(_) => Some(
            users
                .iter()
                .find(|e| e.name == user_part)
                .ok_or_else(|| UserError::NoSuchUser(user_part.to_string()))?,
        ),
    };
    let uid = match entry {
        Some(e) => e.uid,
        None => user_part
            .parse::<u32>()
            .map_err(|_| UserError::NoSuchUser(user_part.into()))?,
    };
    let gid = match group_part {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => all_groups
                .iter()
                .find(|(name, _, _)| name == g)
                .map(|(_, gid, _)| *gid)
                .ok_or_else(|| UserError::NoSuchGroup(g.to_string()))?,
        },
        None => entry.map(|e| e.gid).unwrap_or(uid),
    };
    let mut supplementary = vec![gid];
    if let Some(e) = entry {
        for (_, g, members) in &all_groups {
            if members.iter().any(|m| m == &e.name) && !supplementary.contains(g) {
                supplementary.push(*g);
            }
        }
    }
    Ok(Identity {
        name: entry.map(|e| e.name.clone()),
        uid,
        gid,
        groups: supplementary,
        home: entry.map(|e| e.home.clone()).unwrap_or_else(|| "/".into()),
        shell: entry.map(|e| e.shell.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/sh\nbroken line\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("etc/group"),
            "root:x:0:\nuser:x:1000:\nwheel:x:10:user\n",
        )
        .unwrap();
        dir
    }

    #[test]
    fn names_uids_and_groups() {
        let dir = root();
        let user = resolve(dir.path(), "user").unwrap();
        assert_eq!(
            (user.uid, user.gid, user.home.as_str()),
            (1000, 1000, "/home/user")
        );
        assert_eq!(user.groups, vec![1000, 10]);
        let user = resolve(dir.path(), "1000:10").unwrap();
        assert_eq!((user.uid, user.gid), (1000, 10));
        let user = resolve(dir.path(), "user:wheel").unwrap();
        assert_eq!(user.gid, 10);
        let anon = resolve(dir.path(), "4242").unwrap();
        assert_eq!((anon.uid, anon.gid, anon.name), (4242, 4242, None));
    }

    #[test]
    fn a_fifo_or_device_as_passwd_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        nix::unistd::mkfifo(
            &dir.path().join("etc/passwd"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.path().join("etc/group")).unwrap();
        assert_eq!(
            resolve(dir.path(), "user"),
            Err(UserError::NoSuchUser("user".into()))
        );
        assert_eq!(
            resolve(dir.path(), "0:wheel"),
            Err(UserError::NoSuchGroup("wheel".into()))
        );
    }

    #[test]
    fn unknown_and_malformed() {
        let dir = root();
        assert_eq!(
            resolve(dir.path(), "nobody"),
            Err(UserError::NoSuchUser("nobody".into()))
        );
        assert_eq!(
            resolve(dir.path(), "user:staff"),
            Err(UserError::NoSuchGroup("staff".into()))
        );
        assert!(matches!(
            resolve(dir.path(), ""),
            Err(UserError::Malformed(_))
        ));
        assert!(matches!(
            resolve(dir.path(), "a:b:c"),
            Err(UserError::Malformed(_))
        ));
    }
}
