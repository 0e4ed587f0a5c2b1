//! API keys: random, shown once, stored as SHA-256, scoped, and owned.
//!
//! Keys look like `cove_` + 40 base62 characters. The daemon keeps every
//! key's hash in memory (loaded at start, refreshed on each change), so
//! checking a key costs one hash and one map lookup.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, RwLock};

use cove_api::{KeyInfo, Scope};
use rand::Rng;
use sha2::{Digest, Sha256};

use crate::store::{KeyRow, Store, StoreError, now_ms};

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub key_id: String,
    pub owner: String,
    pub scopes: BTreeSet<Scope>,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.scopes.contains(&Scope::Admin)
    }

    /// Whether the key may act with `scope`. `admin` implies everything and
    /// `sandboxes:write` implies `sandboxes:read`.
    pub fn allows(&self, scope: Scope) -> bool {
        self.is_admin()
            || self.scopes.contains(&scope)
            || (scope == Scope::SandboxesRead && self.scopes.contains(&Scope::SandboxesWrite))
    }

    /// Whether this key may see a sandbox owned by `owner`.
    pub fn sees(&self, owner: &str) -> bool {
        self.is_admin() || self.owner == owner
    }
}

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

fn random_string(len: usize, alphabet: &[u8]) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| alphabet[rng.random_range(0..alphabet.len())] as char)
        .collect()
}

const BASE62: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

pub fn new_key_secret() -> String {
    format!("cove_{}", random_string(40, BASE62))
}

fn new_key_id() -> String {
    format!(
        "key-{}",
        random_string(8, b"abcdefghijklmnopqrstuvwxyz0123456789")
    )
}

pub fn scopes_to_string(scopes: &BTreeSet<Scope>) -> String {
    scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

fn parse_scopes(s: &str) -> BTreeSet<Scope> {
    s.split(',').filter_map(Scope::parse).collect()
}

pub fn key_info(row: &KeyRow) -> KeyInfo {
    KeyInfo {
        id: row.id.clone(),
        name: row.name.clone(),
        owner: row.owner.clone(),
        scopes: parse_scopes(&row.scopes).into_iter().collect(),
        created_at: cove_api::rfc3339_millis(row.created_at as u64),
        last_used_at: row.last_used_at.map(|t| cove_api::rfc3339_millis(t as u64)),
        revoked: row.revoked_at.is_some(),
    }
}

/// The in-memory view of every active key.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    by_hash: Arc<RwLock<HashMap<String, Principal>>>,
}

impl Keys {
    /// Reload from the rows.
    pub fn load(&self, rows: &[KeyRow]) {
        let map = rows
            .iter()
            .filter(|r| r.revoked_at.is_none())
            .map(|r| {
                (
                    r.hash.clone(),
                    Principal {
                        key_id: r.id.clone(),
                        owner: r.owner.clone(),
                        scopes: parse_scopes(&r.scopes),
                    },
                )
            })
            .collect();
        *self
            .by_hash
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = map;
    }

    pub fn authenticate(&self, key: &str) -> Option<Principal> {
        let hash = hash_key(key.trim());
        self.by_hash
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&hash)
            .cloned()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_empty()
    }
}

/// Create a key; returns the row (with the hash) and the secret.
pub fn make_key(name: &str, owner: &str, scopes: &BTreeSet<Scope>) -> (KeyRow, String) {
    let secret = new_key_secret();
    let row = KeyRow {
        id: new_key_id(),
        name: name.to_string(),
        owner: owner.to_string(),
        hash: hash_key(&secret),
        scopes: scopes_to_string(scopes),
        created_at: now_ms(),
        last_used_at: None,
        revoked_at: None,
    };
    (row, secret)
}

/// The file holding the local admin key.
pub fn admin_key_path(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("admin.key")
}

/// Make sure a usable admin key exists and is written to `admin.key`
/// (mode 0600). A missing file means a new admin key: the old automatic
/// admin keys are revoked, so a deleted file cannot be reused.
pub fn ensure_admin_key(store: &Store, data_dir: &Path) -> Result<(), StoreError> {
    let path = admin_key_path(data_dir);
    if let Ok(existing) = std::fs::read_to_string(&path) {
        let hash = hash_key(existing.trim());
        let rows = store.keys_blocking()?;
        if rows
            .iter()
            .any(|r| r.hash == hash && r.revoked_at.is_none())
        {
            return Ok(());
        }
    }
    for row in store.keys_blocking()? {
        if row.name == "admin" && row.revoked_at.is_none() {
            store.revoke_key_blocking(&row.id)?;
        }
    }
    let scopes: BTreeSet<Scope> = [Scope::Admin].into_iter().collect();
    let (row, secret) = make_key("admin", "admin", &scopes);
    store.insert_key_blocking(row)?;
    write_secret(&path, &secret)
        .map_err(|e| StoreError::Sqlite(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
    Ok(())
}

fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("key.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(format!("{secret}\n").as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_authenticate_by_hash_and_scope() {
        let scopes: BTreeSet<Scope> = [Scope::SandboxesWrite, Scope::Exec].into_iter().collect();
        let (row, secret) = make_key("ci", "alice", &scopes);
        assert!(secret.starts_with("cove_") && secret.len() == 45);
        assert_ne!(row.hash, secret);
        let keys = Keys::default();
        keys.load(std::slice::from_ref(&row));
        let who = keys.authenticate(&secret).unwrap();
        assert_eq!(who.owner, "alice");
        assert!(who.allows(Scope::SandboxesRead));
        assert!(who.allows(Scope::Exec));
        assert!(!who.allows(Scope::Admin));
        assert!(who.sees("alice") && !who.sees("bob"));
        assert!(keys.authenticate("cove_wrong").is_none());
        let revoked = KeyRow {
            revoked_at: Some(1),
            ..row
        };
        keys.load(&[revoked]);
        assert!(keys.authenticate(&secret).is_none());
    }
}
