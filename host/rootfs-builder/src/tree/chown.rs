//! `COPY --chown=user[:group]`: names are looked up in the tree's own
//! /etc/passwd and /etc/group, as Docker does.

use std::fs;

use super::{Owner, Tree};
use crate::plan::Chown;

/// /etc/passwd or /etc/group larger than this is read only this far.
const MAX_ACCOUNT_FILE_BYTES: u64 = 4 << 20;

impl Tree {
    /// /etc/passwd or /etc/group of the tree: a regular file only (a RUN step
    /// may have left a fifo there, which would block the read), at most
    /// [`MAX_ACCOUNT_FILE_BYTES`].
    fn read_account_file(&self, file: &str) -> Option<String> {
        use std::io::Read;
        let host = self.host(&self.resolve(file, true).ok()?);
        if !fs::symlink_metadata(&host).ok()?.is_file() {
            return None;
        }
        let mut text = String::new();
        fs::File::open(&host).ok()?.take(MAX_ACCOUNT_FILE_BYTES).read_to_string(&mut text).ok()?;
        Some(text)
    }

    /// `--chown`: ids as given, names from the tree's /etc/passwd and /etc/group.
    /// A user without a group gets the same number as gid, as Docker does.
    pub(super) fn lookup_owner(&self, chown: &Chown, notes: &mut Vec<String>) -> Owner {
        let lookup = |file: &str, name: &str, field: usize| -> Option<(u64, Option<u64>)> {
            let text = self.read_account_file(file)?;
            text.lines().find_map(|line| {
                let cols: Vec<&str> = line.split(':').collect();
                if cols.first() != Some(&name) {
                    return None;
                }
                Some((cols.get(field)?.parse().ok()?, cols.get(3).and_then(|g| g.parse().ok())))
            })
        };
        let (uid, primary) = match chown.user.parse::<u64>() {
            Ok(uid) => (uid, None),
            Err(_) => match lookup("/etc/passwd", &chown.user, 2) {
                Some((uid, gid)) => (uid, gid),
                None => {
                    notes.push(format!(
                        "--chown={}: user not found in the image's /etc/passwd; the files stay owned by 0:0",
                        chown.user
                    ));
                    return Owner::default();
                }
            },
        };
        let gid = match &chown.group {
            None => primary.unwrap_or(uid),
            Some(group) => match group.parse::<u64>() {
                Ok(gid) => gid,
                Err(_) => match lookup("/etc/group", group, 2) {
                    Some((gid, _)) => gid,
                    None => {
                        notes.push(format!(
                            "--chown=…:{group}: group not found in the image's /etc/group; the files stay owned by 0:0"
                        ));
                        return Owner::default();
                    }
                },
            },
        };
        Owner { uid, gid }
    }
}

/// Who a RUN step runs as: `USER` resolved in the tree's own files, as runc does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: the /etc/group entries listing the user by name.
    pub groups: Vec<u32>,
    /// The user's home in /etc/passwd, else `/root` for root and `/`.
    pub home: String,
}

impl Tree {
    /// `USER` (`user[:group]`, names or ids; empty is root) resolved against
    /// the tree's /etc/passwd and /etc/group. A name that is not there is an
    /// error naming it; a uid that is not there runs with gid 0.
    pub fn lookup_user(&self, user: &str) -> anyhow::Result<Identity> {
        let read = |file: &str| -> Vec<Vec<String>> {
            let text = self.read_account_file(file);
            text.unwrap_or_default().lines().map(|l| l.split(':').map(str::to_owned).collect()).collect()
        };
        let passwd = read("/etc/passwd");
        let groups = read("/etc/group");
        let id = |s: &str| s.parse::<u32>().ok();
        let (user, group) = match user.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (user, None),
        };
        let user = if user.is_empty() { "0" } else { user };
        let entry = passwd.iter().find(|cols| match id(user) {
            Some(uid) => cols.get(2).and_then(|c| id(c)) == Some(uid),
            None => cols.first().map(String::as_str) == Some(user),
        });
        let uid = match (id(user), entry) {
            (Some(uid), _) => uid,
            (None, Some(cols)) => cols.get(2).and_then(|c| id(c)).unwrap_or_default(),
            (None, None) => anyhow::bail!("USER {user}: no such user in the image's /etc/passwd"),
        };
        let name = entry.and_then(|cols| cols.first().cloned());
        let mut gid = entry.and_then(|cols| cols.get(3)).and_then(|c| id(c)).unwrap_or(0);
        let mut supplementary = Vec::new();
        match group {
            Some(group) => {
                gid = match id(group) {
                    Some(gid) => gid,
                    None => groups
                        .iter()
                        .find(|cols| cols.first().map(String::as_str) == Some(group))
                        .and_then(|cols| cols.get(2).and_then(|c| id(c)))
                        .ok_or_else(|| anyhow::anyhow!("USER …:{group}: no such group in the image's /etc/group"))?,
                };
            }
            None => {
                if let Some(name) = &name {
                    for cols in &groups {
                        let listed = cols.get(3).is_some_and(|m| m.split(',').any(|m| m == name));
                        if let (true, Some(g)) = (listed, cols.get(2).and_then(|c| id(c))) {
                            supplementary.push(g);
                        }
                    }
                }
            }
        }
        if !supplementary.contains(&gid) {
            supplementary.insert(0, gid);
        }
        let home = entry
            .and_then(|cols| cols.get(5).cloned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| if uid == 0 { "/root".into() } else { "/".into() });
        Ok(Identity { uid, gid, groups: supplementary, home })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree_with_users(dir: &std::path::Path) -> Tree {
        let mut tree = Tree::create(dir.join("tree")).unwrap();
        tree.make_dirs("/etc").unwrap();
        fs::write(tree.host("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n")
            .unwrap();
        fs::write(tree.host("etc/group"), "root:x:0:\nstaff:x:50:app,other\nappg:x:1001:\n").unwrap();
        tree
    }

    #[test]
    fn user_resolves_like_runc() {
        let dir = tempfile::tempdir().unwrap();
        let tree = tree_with_users(dir.path());
        let who = |u: &str| tree.lookup_user(u).unwrap();
        assert_eq!(who(""), Identity { uid: 0, gid: 0, groups: vec![0], home: "/root".into() });
        assert_eq!(who("app"), Identity { uid: 1000, gid: 1001, groups: vec![1001, 50], home: "/home/app".into() });
        assert_eq!(who("1000"), who("app"));
        // A uid the image does not know runs with gid 0 and home /.
        assert_eq!(who("4242"), Identity { uid: 4242, gid: 0, groups: vec![0], home: "/".into() });
        assert_eq!(who("app:staff").gid, 50);
        assert_eq!(who("app:7").groups, [7]);
        let err = tree.lookup_user("nobody").unwrap_err().to_string();
        assert_eq!(err, "USER nobody: no such user in the image's /etc/passwd");
        let err = tree.lookup_user("app:wheel").unwrap_err().to_string();
        assert!(err.contains("wheel: no such group in the image's /etc/group"), "{err}");
    }
}
