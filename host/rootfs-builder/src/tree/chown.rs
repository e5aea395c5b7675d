//! `COPY --chown=user[:group]`: names are looked up in the tree's own
//! /etc/passwd and /etc/group, as Docker does.

use std::fs;

use super::{Owner, Tree};
use crate::plan::Chown;

impl Tree {
    /// `--chown`: ids as given, names from the tree's /etc/passwd and /etc/group.
    /// A user without a group gets the same number as gid, as Docker does.
    pub(super) fn lookup_owner(&self, chown: &Chown, notes: &mut Vec<String>) -> Owner {
        let lookup = |file: &str, name: &str, field: usize| -> Option<(u64, Option<u64>)> {
            let rel = self.resolve(file, true).ok()?;
            let text = fs::read_to_string(self.host(&rel)).ok()?;
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
