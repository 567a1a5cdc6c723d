//! The seed lesson "cpu bound" on parjob: `cargo run --release --example cpu_bound -- --backend threading`
//! (or `sequential`, `process`). The lesson itself is in `lessons/cpu_bound.rs`.

mod lessons;

fn main() -> Result<(), parjob::Error> {
    parjob::init();
    let flags = lessons::parse_flags::<lessons::Flags>();
    lessons::cpu_bound::run(flags.backend)?;
    Ok(())
}
