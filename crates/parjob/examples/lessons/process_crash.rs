//! Lesson: a task that aborts its worker process becomes an error for that task, and the pool
//! survives; a hung task past its timeout has its worker killed. Only the process backend can
//! show this: on threads an abort ends the whole program.

use std::time::{Duration, Instant};

use parjob::{Backend, Error, Parallel, delayed};

/// Doubles `i`, except that task 13 aborts its process.
fn fragile(i: u32) -> u32 {
    if i == 13 {
        std::process::abort();
    }
    i * 2
}

/// Never returns.
fn hangs(_: ()) {
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Runs the lesson on `backend` (it only says why on a backend other than process).
pub fn run(backend: Backend) -> Result<(), Error> {
    super::banner("a crashing task and a hung one", backend);
    if backend != Backend::Process {
        println!(
            "on the {backend} backend an abort in a task ends this whole program: run with \
             --backend process to see it turned into an error"
        );
        return Ok(());
    }
    let parallel = Parallel::new(2).backend(backend);

    let began = Instant::now();
    match parallel.run((0..100u32).map(|i| delayed(fragile, i))) {
        Err(error) => println!(
            "run: {error} (returned after {:.1} ms)",
            began.elapsed().as_secs_f64() * 1e3
        ),
        Ok(_) => println!("run: every task answered (task 13 should have aborted)"),
    }

    let results: Vec<Result<u32, Error>> = parallel
        .run_iter((0..30u32).map(|i| delayed(fragile, i)))
        .collect();
    let answered = results.iter().filter(|r| r.is_ok()).count();
    println!(
        "run_iter: {answered} of 30 tasks answered; the other one: {:?}",
        results[13]
    );

    let out = parallel.run((0..8u32).map(|i| delayed(fragile, i)))?;
    println!("the same pool, next run: {out:?}");

    let hung = Parallel::new(1)
        .backend(backend)
        .timeout(Duration::from_millis(200))
        .run([delayed(hangs, ())]);
    if let Err(error) = hung {
        println!("a hung task: {error}");
    }
    Ok(())
}
