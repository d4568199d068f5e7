//! Records the git commit of the source tree for result files: the
//! QUANTBENCH_GIT_COMMIT environment variable when set (container builds,
//! which have no .git), else `git rev-parse HEAD`.

fn main() {
    let from_env = std::env::var("QUANTBENCH_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty());
    let commit = from_env.unwrap_or_else(|| {
        std::process::Command::new("git")
            .args(["rev-parse", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    });
    println!("cargo:rustc-env=QUANTBENCH_GIT_COMMIT={commit}");
    println!("cargo:rerun-if-env-changed=QUANTBENCH_GIT_COMMIT");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
}
