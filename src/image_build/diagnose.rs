//! Failure diagnostics (wit/protocol.md §5.9): after a failure past proxy
//! readiness, the sandbox's `dmesg` and `df -P` say whether memory or disk
//! ran out; the advice is appended to the error.

/// The two commands run (as root, 5 s each) when a build fails.
pub const COMMANDS: [&str; 2] = [
    "dmesg 2>/dev/null || true",
    "for path in '/var/lib/tensorlake/rootfs-builder/build' /var/lib/docker /; do if [ -e \"$path\" ]; then df -P \"$path\"; fi; done 2>/dev/null || true",
];
/// `df` use at or above this percentage counts as a full disk.
pub const DISK_FULL_PERCENT: u32 = 95;

/// Advice lines for a failure, from its text and the two commands' output.
pub fn advice(failure: &str, dmesg: &[String], df: &[String]) -> Vec<String> {
    let mut advice = Vec::new();
    let oom = dmesg.iter().any(|line| {
        let line = line.to_ascii_lowercase();
        line.contains("out of memory") || line.contains("oom-kill") || line.contains("killed process")
    }) || failure.contains("OOM killer");
    if oom {
        advice.push("The builder sandbox ran out of memory: retry with a larger --builder-memory-mb.".to_owned());
    }
    let lower = failure.to_ascii_lowercase();
    let disk_evidence = lower.contains("enospc") || lower.contains("no space");
    let fullest = df
        .iter()
        .filter_map(|line| line.split_whitespace().nth(4)?.strip_suffix('%')?.parse::<u32>().ok())
        .max()
        .unwrap_or(0);
    if disk_evidence || fullest >= DISK_FULL_PERCENT {
        advice.push(format!(
            "The builder sandbox's disk is full ({fullest}% used): retry with a larger --disk-mb or --builder-disk-mb."
        ));
    }
    advice
}

/// The failure text with its advice appended (unchanged without advice).
pub fn with_advice(failure: &str, advice: &[String]) -> String {
    if advice.is_empty() { failure.to_owned() } else { format!("{failure}\n{}", advice.join("\n")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn reads_oom_from_dmesg_and_full_disks_from_df() {
        let dmesg = lines("[ 1.0] eth0 up\n[ 9.1] Out of memory: Killed process 42 (tl-rootfs-build)");
        let df = lines("Filesystem 1024-blocks Used Available Capacity Mounted on\n/dev/vda 100 97 3 97% /");
        let advice = advice("Command 'x' failed with exit code 1", &dmesg, &df);
        assert_eq!(advice.len(), 2, "{advice:?}");
        assert!(advice[0].contains("--builder-memory-mb") && advice[1].contains("97% used"));
        assert!(with_advice("boom", &advice).starts_with("boom\nThe builder sandbox ran out of memory"));
    }

    #[test]
    fn no_advice_without_evidence_and_failure_text_counts() {
        let df = lines("Filesystem 1024-blocks Used Available Capacity Mounted on\n/dev/vda 100 10 90 10% /");
        assert!(advice("exit code 1", &[], &df).is_empty());
        assert_eq!(with_advice("boom", &[]), "boom");
        assert_eq!(advice("write failed: No space left on device", &[], &df).len(), 1);
        assert_eq!(
            advice("Command 'b' failed with exit code -9 (process was killed by the kernel OOM killer)", &[], &[])
                .len(),
            1
        );
    }
}
