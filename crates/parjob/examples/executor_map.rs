//! The seed lesson "executor map" (Python's `ThreadPoolExecutor.map`) on parjob:
//! `cargo run --release --example executor_map -- --backend threading` (or `sequential`,
//! `process`). The lesson itself is in `lessons/executor_map.rs`.

mod lessons;

fn main() -> Result<(), parjob::Error> {
    parjob::init();
    let flags = lessons::parse_flags::<lessons::Flags>();
    lessons::executor_map::run(flags.backend)?;
    Ok(())
}
