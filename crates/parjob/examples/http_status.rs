//! The seed lesson "http status" on parjob: `cargo run --release --example http_status -- --backend threading`
//! (or `sequential`, `process`). The lesson itself is in `lessons/http_status.rs`.

mod lessons;

fn main() -> Result<(), parjob::Error> {
    parjob::init();
    let flags = lessons::parse_flags::<lessons::Flags>();
    lessons::http_status::run(flags.backend)?;
    Ok(())
}
