//! Where and with what a result was produced.

use super::result::Provenance;

/// The commit quantbench was built from (empty when built outside git).
pub fn git_commit() -> Option<String> {
    let c = env!("QUANTBENCH_GIT_COMMIT");
    (!c.is_empty()).then(|| c.to_string())
}

fn first_line_value(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// Describes this machine and the compute `device`.
pub fn collect(device: &str) -> Provenance {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_bytes = first_line_value(&meminfo, "MemTotal")
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb * 1024);
    Provenance {
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        git_commit: git_commit(),
        hostname: std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default(),
        cpu: first_line_value(&cpuinfo, "model name")
            .unwrap_or_else(|| std::env::consts::ARCH.to_string()),
        cpu_cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_bytes,
        device: device.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_key_values() {
        assert_eq!(
            first_line_value("a: 1\nmodel name\t: X Y\n", "model name").as_deref(),
            Some("X Y")
        );
        let p = collect("cpu");
        assert!(p.cpu_cores >= 1 && !p.tool_version.is_empty());
    }
}
