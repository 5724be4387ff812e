//! One policy for a tool a test needs and the machine lacks (redis-server, nginx, node,
//! python3, go, a tmpfs mount): under `CI=true` the test fails with the command that
//! installs it, because CI must run every suite; elsewhere it is skipped, saying so on
//! stderr, so `cargo test` still runs everything else on a machine without them.
//! `scripts/test` installs them all when it runs as root.

use std::path::PathBuf;

/// Whether this is a CI run (`CI` set to anything but empty or `false`).
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false")
}

/// `name` on the PATH (or in the sbin directories, where Debian puts nginx).
pub fn find(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The tool's path, or None after saying the test is skipped; under CI a panic naming
/// `install`, the command that provides it.
pub fn require(name: &str, install: &str) -> Option<PathBuf> {
    let found = find(name);
    if found.is_none() {
        missing(&format!("{name} is not installed"), install);
    }
    found
}

/// Something the test needs is missing: fails under CI, otherwise notes the skip.
pub fn missing(what: &str, install: &str) {
    assert!(
        !ci(),
        "{what}: required under CI=true; install it with `{install}`"
    );
    eprintln!("SKIPPED: {what} (install it with `{install}`)");
}

/// Returns from the test (skipped) unless `redis-server` is installed; see the module docs.
#[macro_export]
macro_rules! need_redis {
    () => {
        if $crate::common::tools::require("redis-server", "apt-get install -y redis-server")
            .is_none()
        {
            return;
        }
    };
}
