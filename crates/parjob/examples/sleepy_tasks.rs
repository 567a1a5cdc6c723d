//! The seed lesson "sleepy tasks" on parjob: `cargo run --release --example sleepy_tasks -- --backend threading`
//! (or `sequential`, `process`). The lesson itself is in `lessons/sleepy_tasks.rs`.

mod lessons;

fn main() -> Result<(), parjob::Error> {
    parjob::init();
    let flags = lessons::parse_flags::<lessons::Flags>();
    lessons::sleepy_tasks::run(flags.backend)?;
    Ok(())
}
