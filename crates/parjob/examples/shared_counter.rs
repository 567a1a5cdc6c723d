//! The seed lesson "shared counter" on parjob: `cargo run --release --example shared_counter -- --backend threading`
//! (or `sequential`, `process`). The lesson itself is in `lessons/shared_counter.rs`.

mod lessons;

fn main() -> Result<(), parjob::Error> {
    parjob::init();
    let flags = lessons::parse_flags::<lessons::Flags>();
    lessons::shared_counter::run(flags.backend)?;
    Ok(())
}
