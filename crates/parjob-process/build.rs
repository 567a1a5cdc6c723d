//! Refuses to build parjob-process against upstream's ipc-channel: parjob needs its patched
//! copy (vendor/ipc-channel/PARJOB.md: a leaked socket after a failed connect, a panic when a
//! peer hangs up mid-message). A `[patch.crates-io]` in parjob's own workspace does not reach
//! a crate that depends on parjob by path, so a user's crate that forgets its own `[patch]`
//! would otherwise build upstream's without a word.
fn main() {
    println!("cargo::rerun-if-env-changed=DEP_PARJOB_IPC_CHANNEL_PATCHED");
    if std::env::var_os("DEP_PARJOB_IPC_CHANNEL_PATCHED").is_none() {
        println!(
            "cargo::error=parjob needs its patched ipc-channel, but this build uses another \
             (upstream's, from crates.io): add `[patch.crates-io] ipc-channel = {{ path = \
             \"PATH/TO/parjob/vendor/ipc-channel\" }}` to your workspace's Cargo.toml (see \
             parjob's README, \"Quick start\", and vendor/ipc-channel/PARJOB.md for why)"
        );
    }
}
