//! parjob's change: tells the crates that depend on this one (parjob-process) that this is
//! parjob's patched copy of ipc-channel (see PARJOB.md), through `links` metadata.
fn main() {
    println!("cargo::metadata=patched=1");
    println!("cargo::rerun-if-changed=build.rs");
}
