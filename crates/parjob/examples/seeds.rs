//! All the seed lessons of threads vs processes, one after another, on the backend the
//! `--backend` flag names (threading by default):
//!
//! ```text
//! cargo run --release --example seeds -- --backend threading
//! ```

mod lessons;

use clap::Parser;

fn main() -> Result<(), parjob::Error> {
    parjob::init();
    let flags = lessons::Flags::parse();
    let backend = flags.backend;
    println!(
        "parjob seeds: the threads-vs-processes lessons on the {backend} backend ({} CPUs)",
        parjob::cpu_count()
    );
    lessons::sum_of_squares::run(backend)?;
    lessons::sleepy_tasks::run(backend)?;
    lessons::shared_counter::run(backend)?;
    lessons::cpu_bound::run(backend)?;
    lessons::http_status::run(backend)?;
    lessons::executor_submit::run(backend)?;
    lessons::executor_map::run(backend)?;
    println!("\nall lessons ran on the {backend} backend");
    Ok(())
}
