//! The lesson "big arrays" (joblib's memmapping) on parjob:
//! `cargo run --release --example big_array -- --backend process` (or `threading`,
//! `sequential`). The lesson itself is in `lessons/big_array.rs`.

mod lessons;

fn main() -> Result<(), parjob::Error> {
    parjob::init();
    let flags = lessons::parse_flags::<lessons::Flags>();
    lessons::big_array::run(flags.backend)?;
    Ok(())
}
