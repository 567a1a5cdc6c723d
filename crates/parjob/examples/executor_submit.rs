//! The seed lesson "executor submit" (Python's `ThreadPoolExecutor.submit`) on parjob:
//! `cargo run --release --example executor_submit -- --backend threading` (or `sequential`,
//! `process`). The lesson itself is in `lessons/executor_submit.rs`.

mod lessons;

fn main() -> Result<(), parjob::Error> {
    parjob::init();
    let flags = lessons::parse_flags::<lessons::Flags>();
    lessons::executor_submit::run(flags.backend)?;
    Ok(())
}
