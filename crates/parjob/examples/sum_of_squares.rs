//! The seed lesson "sum of squares" on parjob: `cargo run --release --example sum_of_squares -- --backend threading`
//! (or `sequential`, `process`). The lesson itself is in `lessons/sum_of_squares.rs`.

mod lessons;

fn main() -> Result<(), parjob::Error> {
    parjob::init();
    let flags = lessons::parse_flags::<lessons::Flags>();
    lessons::sum_of_squares::run(flags.backend)?;
    Ok(())
}
