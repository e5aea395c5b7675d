//! `snapsign dev` as a real child process (its own process group), for
//! tests that kill it or drive it as a user would; stopped on drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct DevProcess {
    child: Child,
    /// The platform API URL it printed.
    pub api: String,
    /// The store URL it printed.
    pub store: String,
    /// The namespace token it printed.
    pub token: String,
    /// The operator token it printed.
    pub admin_token: String,
    /// Every banner line it printed.
    pub banner: Vec<String>,
    pub data_dir: PathBuf,
}

unsafe extern "C" {
    fn kill(pid: i32, signal: i32) -> i32;
}

impl DevProcess {
    /// Starts `snapsign dev --data-dir data_dir ARGS…` and reads its banner.
    pub fn start(data_dir: &Path, args: &[&str]) -> DevProcess {
        use std::os::unix::process::CommandExt;
        let mut child = Command::new(env!("CARGO_BIN_EXE_snapsign"))
            .args(["dev", "--data-dir"])
            .arg(data_dir)
            .args(args)
            .env("SNAPSIGN_CACHE_DIR", super::cache_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("start snapsign dev");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut banner = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line =
                rx.recv_timeout(left).unwrap_or_else(|_| panic!("snapsign dev never finished its banner: {banner:#?}"));
            let done = line.starts_with("Ctrl-C stops");
            banner.push(line);
            if done {
                break;
            }
        }
        let field = |name: &[&str]| {
            banner
                .iter()
                .find_map(|line| {
                    let words: Vec<&str> = line.split_whitespace().collect();
                    words.starts_with(name).then(|| words[name.len()].to_owned())
                })
                .unwrap_or_else(|| panic!("no {name:?} in the banner: {banner:#?}"))
        };
        DevProcess {
            api: field(&["platform", "api"]),
            store: field(&["store"]),
            token: field(&["token"]),
            admin_token: field(&["admin", "token"]),
            banner: banner.clone(),
            child,
            data_dir: data_dir.to_owned(),
        }
    }

    /// The secrets it keeps in its data dir.
    pub fn secrets(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.data_dir.join("secrets.json")).unwrap()).unwrap()
    }

    /// A token for another namespace, minted as the banner says (`snapsign token --data-dir`).
    pub fn token_for(&self, namespace: &str) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_snapsign"))
            .args(["token", "--namespace", namespace, "--ttl-secs", "3600", "--data-dir"])
            .arg(&self.data_dir)
            .env("SNAPSIGN_TOKEN_KEY", "a key from the environment, which --data-dir overrides")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// Sends `signal` to its process group and waits (up to 20 s) for it to end.
    pub fn stop(&mut self, signal: i32) {
        // SAFETY: kill(2) on the process group of our own child.
        unsafe { kill(-(self.child.id() as i32), signal) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        unsafe { kill(-(self.child.id() as i32), 9) };
        let _ = self.child.wait();
    }
}

impl Drop for DevProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop(15);
        }
    }
}
