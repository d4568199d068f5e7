//! Peak memory readings.

/// Peak resident set size of this process in bytes (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_hwm(&status)
}

/// Resets the peak resident set size to the current one (Linux
/// `/proc/self/clear_refs` value 5), so that a later [`peak_rss_bytes`]
/// covers only what ran since. Returns whether the reset took effect.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vm_hwm_in_kib() {
        assert_eq!(
            parse_vm_hwm("Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t1 kB\n"),
            Some(2048 * 1024)
        );
        assert_eq!(parse_vm_hwm("Name:\tx\n"), None);
        let before = peak_rss_bytes().unwrap();
        assert!(before > 0);
        // A large short-lived allocation raises the peak; a reset forgets it.
        let big = vec![1u8; 256 << 20];
        std::hint::black_box(&big);
        assert!(peak_rss_bytes().unwrap() >= before.max(256 << 20));
        drop(big);
        if reset_peak_rss() {
            assert!(peak_rss_bytes().unwrap() < (256 << 20) + before);
        }
    }
}
