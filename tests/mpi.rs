//! The MPI backend's suite, run under `mpirun` (not a libtest harness: every rank runs this
//! `main`, `parjob::init()` turns ranks 1.. into rank servers, and rank 0 runs the cases).
//!
//! - Built without the `mpi` feature, or started without a launcher: prints one line saying
//!   the suite was not run and how to run it, and passes, unless `PARJOB_MPI_REQUIRED=1`
//!   (CI), which makes that a failure.
//! - With `PARJOB_MPI_LAUNCH` set (e.g. `mpirun --oversubscribe --enable-recovery -n 3`) and
//!   no launcher around it, it starts itself under that command and passes when rank 0 says
//!   every case passed: `cargo test -p parjob-tests --features mpi --test mpi` then runs the
//!   whole suite.
//!
//! After the cases, worlds of their own: each wrong setting, worker output prefixed with its
//! rank (the launcher's output is read), and rank 0's exit status after a lost rank.
//!
//! The last case SIGKILLs a worker rank: Open MPI needs `--enable-recovery` for rank 0 to
//! outlive it (without it, mpirun ends the whole job about 1 s after a rank dies).

use std::process::ExitCode;

const HOW: &str = "build with `--features mpi` and set PARJOB_MPI_LAUNCH=\"mpirun \
    --oversubscribe --enable-recovery -n 3\" (as root also OMPI_ALLOW_RUN_AS_ROOT=1 \
    OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1): `PARJOB_MPI_LAUNCH=... cargo test -p parjob-tests \
    --features mpi --test mpi` (or `.ci/run`)";

fn not_run(why: &str) -> ExitCode {
    let required = std::env::var("PARJOB_MPI_REQUIRED").is_ok_and(|v| v == "1");
    println!(
        "MPI suite: NOT RUN ({why}); {HOW}{}",
        if required {
            " -- PARJOB_MPI_REQUIRED=1 makes this a failure"
        } else {
            ""
        }
    );
    if required {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(not(all(feature = "mpi", target_os = "linux")))]
fn main() -> ExitCode {
    parjob::init();
    not_run("this test binary was built without the `mpi` feature")
}

#[cfg(all(feature = "mpi", target_os = "linux"))]
fn main() -> ExitCode {
    // The case that forgets `init()` on purpose (see `suite::BAD_SETTINGS`).
    if std::env::var_os("PARJOB_MPI_NO_INIT").is_none() {
        parjob::init(); // worker ranks (and local worker processes) never return from here
    }
    if !parjob_mpi_launched() {
        return match std::env::var("PARJOB_MPI_LAUNCH") {
            Ok(launch) if !launch.trim().is_empty() => suite::launch(&launch),
            _ => not_run("not started by an MPI launcher and PARJOB_MPI_LAUNCH is not set"),
        };
    }
    suite::run_cases()
}

#[cfg(all(feature = "mpi", target_os = "linux"))]
fn parjob_mpi_launched() -> bool {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMIX_RANK",
        "PMI_RANK",
        "PMI_SIZE",
        "MPI_LOCALNRANKS",
    ]
    .iter()
    .any(|var| std::env::var_os(var).is_some())
}

#[cfg(all(feature = "mpi", target_os = "linux"))]
mod suite {
    use std::collections::BTreeSet;
    use std::process::{Command, ExitCode};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use parjob::{
        Backend, BatchSize, Error, Executor, Parallel, WorkerExit, as_completed, delayed,
    };

    /// Runs this binary under `launch` (a command line) and passes when rank 0 reported that
    /// every case passed. mpirun's own status is not enough: after the rank-loss case it may
    /// report the rank that was killed on purpose.
    pub(crate) fn launch(launch: &str) -> ExitCode {
        if launch.split_whitespace().next().is_none() {
            return ExitCode::FAILURE;
        }
        let exe = match std::env::current_exe() {
            Ok(exe) => exe,
            Err(e) => {
                println!("MPI suite: cannot find this test binary: {e}");
                return ExitCode::FAILURE;
            }
        };
        let report = std::env::temp_dir().join(format!("parjob-mpi-suite-{}", std::process::id()));
        let _ = std::fs::remove_file(&report);
        println!("MPI suite: running under `{launch}`");
        let (status, verdict) = world(launch, &exe, &report, &[]);
        match status {
            Ok(status) => {
                println!("MPI suite: the launcher ended with {status}; rank 0 said {verdict:?}")
            }
            Err(e) => {
                println!("MPI suite: cannot run `{launch}`: {e}");
                return ExitCode::FAILURE;
            }
        }
        if verdict.trim() != "ok" {
            return ExitCode::FAILURE;
        }
        // Each wrong setting in a world of its own: worker ranks read them as they start.
        for (variable, value, expected) in BAD_SETTINGS {
            let envs = [("PARJOB_MPI_EXPECT", expected), (variable, value)];
            let (status, verdict) = world(launch, &exe, &report, &envs);
            println!(
                "MPI suite: with {variable}={value}: the launcher ended with {status:?}; rank 0 \
                 said {verdict:?}"
            );
            if verdict.trim() != "ok" {
                return ExitCode::FAILURE;
            }
        }
        match bound_rank_is_told(launch, &exe, &report) {
            Ok(said) => println!("MPI suite: a rank bound to fewer CPUs than its workers: {said}"),
            Err(why) => {
                println!("MPI suite: a rank bound to fewer CPUs than its workers: FAILED: {why}");
                return ExitCode::FAILURE;
            }
        }
        match prefixed_worker_output(launch, &exe, &report) {
            Ok(()) => println!("MPI suite: worker output prefixed with its rank: ok"),
            Err(why) => {
                println!("MPI suite: worker output prefixed with its rank: FAILED: {why}");
                return ExitCode::FAILURE;
            }
        }
        match mpi_init_that_never_finishes_ends_the_launch(launch, &exe) {
            Ok(said) => {
                println!("MPI suite: a process of the launch that never starts MPI: {said}")
            }
            Err(why) => {
                println!("MPI suite: a process of the launch that never starts MPI: FAILED: {why}");
                return ExitCode::FAILURE;
            }
        }
        match exit_status_after_a_loss(launch, &exe, &report) {
            Ok(()) => {
                println!("MPI suite: rank 0's exit status survives a lost rank: ok");
                ExitCode::SUCCESS
            }
            Err(why) => {
                println!("MPI suite: rank 0's exit status after a lost rank: FAILED: {why}");
                ExitCode::FAILURE
            }
        }
    }

    /// A world of 2 ranks that Open MPI binds to a core each (`--bind-to core`), with 2 local
    /// workers per rank: rank 1 says on stderr that its 2 workers share the 1 CPU it was bound
    /// to, and the run works. Only with Open MPI's `mpirun` (or `mpiexec`) on 2 CPUs or more;
    /// otherwise it says why it did not run.
    fn bound_rank_is_told(
        launch: &str,
        exe: &std::path::Path,
        report: &std::path::Path,
    ) -> Result<String, String> {
        let launcher = match open_mpi_launcher(launch) {
            Ok(launcher) => launcher,
            Err(not_run) => return Ok(not_run),
        };
        if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
            return Ok("not run: binding 2 ranks to a core each needs 2 CPUs".into());
        }
        // Bound to a core each, then not bound: only the first says its workers share a CPU.
        let mut notes = Vec::new();
        for binding in ["core", "none"] {
            let (verdict, output) = world_output(
                &[launcher, "-n", "2", "--bind-to", binding],
                exe,
                report,
                &[
                    ("PARJOB_MPI_WORKERS_PER_RANK", "2"),
                    ("PARJOB_MPI_BOUND", "1"),
                ],
            )?;
            let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
            check(verdict.trim() == "ok", || {
                format!(
                    "--bind-to {binding}: the launcher ended with {}; rank 0 said {verdict:?}; \
                     stderr: {stderr}",
                    output.status
                )
            })?;
            notes.push(
                stderr
                    .lines()
                    .find(|l| l.starts_with("parjob: MPI rank 1 on "))
                    .map(str::to_string),
            );
        }
        let Some(note) = &notes[0] else {
            return Err("bound to a core, rank 1 said nothing of its binding".into());
        };
        check(
            note.contains(
                "PARJOB_MPI_WORKERS_PER_RANK=2 worker processes share the 1 CPU(s) this rank is \
                 bound to",
            ) && note.contains("--bind-to none"),
            || format!("rank 1 said: {note}"),
        )?;
        check(notes[1].is_none(), || {
            format!("not bound, rank 1 still said: {:?}", notes[1])
        })?;
        Ok("told, and the run worked".into())
    }

    /// The launcher program of `launch` if it is Open MPI's `mpirun` (or `mpiexec`), which
    /// the worlds that need its flags use; otherwise why such a world was not run.
    fn open_mpi_launcher(launch: &str) -> Result<&str, String> {
        let launcher = launch.split_whitespace().next().unwrap_or_default();
        let name = std::path::Path::new(launcher)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if matches!(name.as_str(), "mpirun" | "mpiexec") {
            Ok(launcher)
        } else {
            Err(format!("not run: `{launcher}` is not Open MPI's mpirun"))
        }
    }

    /// Where a task ran: its rank and local worker.
    fn rank_and_worker(_: u64) -> (Option<usize>, Option<usize>) {
        let info = parjob::worker_info();
        (info.rank, info.worker)
    }

    /// Runs `launcher` (the launcher program and its flags, without the executable) on `exe`
    /// with `envs`, capturing its output, and returns what rank 0 wrote to `report` and the
    /// output; an error only if the launcher cannot be run.
    fn world_output(
        launcher: &[&str],
        exe: &std::path::Path,
        report: &std::path::Path,
        envs: &[(&str, &str)],
    ) -> Result<(String, std::process::Output), String> {
        let _ = std::fs::remove_file(report);
        let output = Command::new(launcher.first().copied().unwrap_or_default())
            .args(launcher.get(1..).unwrap_or_default())
            .arg(exe)
            .env("PARJOB_MPI_REPORT", report)
            .envs(envs.iter().copied())
            .output()
            .map_err(|e| format!("cannot run `{}`: {e}", launcher.join(" ")))?;
        let verdict = std::fs::read_to_string(report).unwrap_or_default();
        let _ = std::fs::remove_file(report);
        Ok((verdict, output))
    }

    /// How many tasks print in the [`prefixed_worker_output`] world.
    const CHATTY_TASKS: u32 = 8;

    /// A world whose rank 0 runs [`CHATTY_TASKS`] tasks that print, with
    /// `prefix_worker_output(true)` (`PARJOB_MPI_PRINT`): every line reaches the launcher's
    /// output once, whole, tagged with the worker rank and local worker that printed it.
    fn prefixed_worker_output(
        launch: &str,
        exe: &std::path::Path,
        report: &std::path::Path,
    ) -> Result<(), String> {
        let launcher: Vec<&str> = launch.split_whitespace().collect();
        let (verdict, output) = world_output(&launcher, exe, report, &[("PARJOB_MPI_PRINT", "1")])?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        check(verdict.trim() == "ok", || {
            format!(
                "the launcher ended with {}; rank 0 said {verdict:?}",
                output.status
            )
        })?;
        for i in 0..CHATTY_TASKS {
            for (text, stream) in [(&stdout, "stdout"), (&stderr, "stderr")] {
                let line = format!("task {i} says hello on {stream}\n");
                let tagged = text
                    .lines()
                    .filter(|l| format!("{l}\n").ends_with(&line))
                    .collect::<Vec<_>>();
                // Exactly one line, tagged `[rank R worker W] ` with R a worker rank (never
                // rank 0, which runs no task) and W a local worker's index.
                let well_tagged = |l: &&str| {
                    l.strip_prefix("[rank ")
                        .and_then(|rest| rest.split_once(" worker "))
                        .and_then(|(r, rest)| Some((r, rest.split_once("] ")?)))
                        .is_some_and(|(r, (w, said))| {
                            r.parse::<usize>().is_ok_and(|r| r > 0)
                                && w.parse::<usize>().is_ok()
                                && format!("{said}\n") == line
                        })
                };
                check(tagged.len() == 1 && tagged.iter().all(well_tagged), || {
                    format!(
                        "expected one line `[rank R worker W] {}` on {stream}, found {tagged:?}",
                        line.trim_end()
                    )
                })?;
            }
        }
        Ok(())
    }

    /// The task of the [`prefixed_worker_output`] world: one line on each stream.
    fn chatty(i: u32) {
        println!("task {i} says hello on stdout");
        eprintln!("task {i} says hello on stderr");
    }

    /// What rank 0 exits with after a run that lost a rank (`PARJOB_MPI_EXIT_AFTER_LOSS`).
    const STATUS_AFTER_LOSS: u8 = 17;

    /// `mpirun --enable-recovery -n 2 <this binary> : -n 1 false`: the third process ends
    /// before it starts MPI, so `MPI_Init` never finishes in the other two. With
    /// `PARJOB_MPI_INIT_TIMEOUT=3` each says so within 3 s and ends, and the launch ends; it
    /// used to wait for ever. Only with Open MPI's `mpirun` (or `mpiexec`).
    fn mpi_init_that_never_finishes_ends_the_launch(
        launch: &str,
        exe: &std::path::Path,
    ) -> Result<String, String> {
        let launcher = match open_mpi_launcher(launch) {
            Ok(launcher) => launcher,
            Err(not_run) => return Ok(not_run),
        };
        let stderr_file = std::env::temp_dir().join(format!(
            "parjob-mpi-suite-init-{}.stderr",
            std::process::id()
        ));
        let stderr = std::fs::File::create(&stderr_file).map_err(|e| e.to_string())?;
        let mut child = Command::new(launcher)
            .args(["--oversubscribe", "--enable-recovery", "-n", "2"])
            .arg(exe)
            .args([":", "-n", "1", "false"])
            .env("PARJOB_MPI_INIT_TIMEOUT", "3")
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot run `{launcher}`: {e}"))?;
        // A bound against a hang, not a timing check: the processes give up after 3 s.
        let deadline = Instant::now() + Duration::from_secs(90);
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        let said = std::fs::read_to_string(&stderr_file).unwrap_or_default();
        let _ = std::fs::remove_file(&stderr_file);
        check(status.is_some(), || {
            format!("the launch was still waiting after 90 s; stderr: {said}")
        })?;
        let gave_up = said
            .lines()
            .filter(|l| l.starts_with("parjob: MPI_Init did not finish within 3s"))
            .count();
        check(
            gave_up >= 1 && said.contains("PARJOB_MPI_INIT_TIMEOUT"),
            || format!("no process said it gave up on MPI_Init; stderr: {said}"),
        )?;
        Ok(format!(
            "{gave_up} process(es) said so and the launch ended"
        ))
    }

    /// A world whose rank 0 loses a rank and then exits with [`STATUS_AFTER_LOSS`]: rank 0
    /// leaves with `_exit` after a loss (no `MPI_Finalize`), and must leave with that status,
    /// not 0. mpirun under `--enable-recovery` reports 0 whatever its ranks exit with, so a
    /// shell around each rank writes rank 0's status to a file.
    fn exit_status_after_a_loss(
        launch: &str,
        exe: &std::path::Path,
        report: &std::path::Path,
    ) -> Result<(), String> {
        let status_file = report.with_extension("status");
        let _ = std::fs::remove_file(&status_file);
        let mut words = launch.split_whitespace();
        let script = "\"$0\"; s=$?; if [ \"${OMPI_COMM_WORLD_RANK:-$PMIX_RANK}\" = 0 ]; then \
                      echo $s > \"$PARJOB_MPI_STATUS\"; fi; exit $s";
        let launched = Command::new(words.next().unwrap_or_default())
            .args(words)
            .args(["sh", "-c", script])
            .arg(exe)
            .env("PARJOB_MPI_REPORT", report)
            .env("PARJOB_MPI_STATUS", &status_file)
            .env("PARJOB_MPI_EXIT_AFTER_LOSS", "1")
            .status()
            .map_err(|e| format!("cannot run `{launch}`: {e}"))?;
        let verdict = std::fs::read_to_string(report).unwrap_or_default();
        let status = std::fs::read_to_string(&status_file).unwrap_or_default();
        let _ = std::fs::remove_file(report);
        let _ = std::fs::remove_file(&status_file);
        check(verdict.trim() == "ok", || {
            format!("the launcher ended with {launched}; rank 0 said {verdict:?}")
        })?;
        check(status.trim() == STATUS_AFTER_LOSS.to_string(), || {
            format!("rank 0 exited with {status:?}, not {STATUS_AFTER_LOSS}")
        })
    }

    /// Starts this binary under `launch` with `envs` set, and returns the launcher's status
    /// and what rank 0 wrote to `report`.
    fn world(
        launch: &str,
        exe: &std::path::Path,
        report: &std::path::Path,
        envs: &[(&str, &str)],
    ) -> (std::io::Result<std::process::ExitStatus>, String) {
        let _ = std::fs::remove_file(report);
        let mut words = launch.split_whitespace();
        let status = Command::new(words.next().unwrap_or_default())
            .args(words)
            .arg(exe)
            .env("PARJOB_MPI_REPORT", report)
            .envs(envs.iter().copied())
            .status();
        let verdict = std::fs::read_to_string(report).unwrap_or_default();
        let _ = std::fs::remove_file(report);
        (status, verdict)
    }

    /// Settings a user can get wrong, each with what the error must say: a run on such a
    /// world fails with it (naming the setting) instead of guessing, starting thousands of
    /// processes, or saying "or".
    const BAD_SETTINGS: [(&str, &str, &str); 5] = [
        (
            "PARJOB_MPI_WORKERS_PER_RANK",
            "abc",
            "PARJOB_MPI_WORKERS_PER_RANK=\"abc\" is not a number of local worker processes",
        ),
        (
            "PARJOB_MPI_WORKERS_PER_RANK",
            "5000",
            "PARJOB_MPI_WORKERS_PER_RANK=5000 is more local worker processes than a rank starts",
        ),
        (
            "PARJOB_MPI_RANK_TIMEOUT",
            "xyz",
            "PARJOB_MPI_RANK_TIMEOUT=\"xyz\" is not a number of seconds",
        ),
        (
            "PARJOB_MPI_NO_INIT",
            "1",
            "parjob::init() was not called first thing in main",
        ),
        // Not a setting: the suite makes rank 0's driver thread panic, as a bug would.
        (
            "PARJOB_MPI_PANIC_DRIVER",
            "1",
            "rank 0's MPI thread panicked (panic_driver_for_tests)",
        ),
    ];

    /// The one case of a world started with a wrong setting: a run fails with the error
    /// `PARJOB_MPI_EXPECT` holds.
    fn bad_setting(expected: &str) -> Result<(), String> {
        match mpi(-1).run((0..4u64).map(|i| delayed(square, i))) {
            Ok(out) => Err(format!("the run worked ({out:?}); expected {expected:?}")),
            Err(e) => check(e.to_string().contains(expected), || {
                format!("expected {expected:?} in the error, got: {e}")
            }),
        }
    }

    fn square(x: u64) -> u64 {
        x * x
    }

    fn panics_at_7(x: u64) -> u64 {
        assert!(x != 7, "task seven refuses");
        x
    }

    fn aborts_at_3(x: u64) -> u64 {
        if x == 3 {
            std::process::abort();
        }
        x
    }

    fn segfaults_at_2(x: u64) -> u64 {
        if x == 2 {
            // SAFETY: none: writing to an unmapped address to crash the local worker on purpose
            // (as tests/process.rs does; `raise` would meet Rust's own SIGSEGV handler).
            unsafe { std::ptr::write_volatile(std::ptr::dangling_mut::<u64>(), 1) };
        }
        x
    }

    /// Overflows the local worker's stack at 4 (4 KiB frames, far deeper than any stack).
    fn overflows_at_4(x: u64) -> u64 {
        fn recurse(depth: u64) -> u64 {
            let frame = std::hint::black_box([depth as u8; 4096]);
            if depth == 0 {
                return u64::from(frame[0]);
            }
            recurse(depth - 1) + u64::from(std::hint::black_box(frame)[100])
        }
        if x == 4 { recurse(10_000_000) } else { x }
    }

    /// A result whose `Deserialize` panics on 13: it runs on one of rank 0's decoder threads.
    #[derive(Debug, serde::Serialize)]
    struct Touchy(u64);

    impl<'de> serde::Deserialize<'de> for Touchy {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Touchy, D::Error> {
            let value = u64::deserialize(d)?;
            assert!(value != 13, "Touchy refuses 13");
            Ok(Touchy(value))
        }
    }

    fn touchy(x: u64) -> Touchy {
        Touchy(x)
    }

    /// A result that panics as rank 0 decodes it fails its task, as on the process backend,
    /// and the backend goes on: later runs work.
    fn result_decode_panic() -> Result<(), String> {
        let parallel = mpi(-1);
        let outcomes = parallel
            .run_results((0..40u64).map(|i| delayed(touchy, i)))
            .map_err(|e| e.to_string())?;
        for (i, outcome) in outcomes.iter().enumerate() {
            match (i, outcome) {
                (13, Err(e)) => check(
                    e.to_string()
                        .contains("task 13: cannot decode the result of")
                        && e.to_string().contains("Touchy refuses 13"),
                    || format!("task 13: {e}"),
                )?,
                (13, Ok(v)) => return Err(format!("task 13 gave {v:?}")),
                (_, Ok(Touchy(v))) => check(*v == i as u64, || format!("task {i} gave {v}"))?,
                (_, Err(e)) => return Err(format!("task {i} failed: {e}")),
            }
        }
        let out = parallel
            .run((0..100u64).map(|i| delayed(square, i)))
            .map_err(|e| format!("the run after: {e}"))?;
        check(out == (0..100u64).map(square).collect::<Vec<_>>(), || {
            "the run after: wrong results".into()
        })
    }

    fn sleeps(ms: u64) -> u64 {
        std::thread::sleep(Duration::from_millis(ms));
        ms
    }

    fn rank_of_worker(_: u64) -> (Option<usize>, String) {
        let info = parjob::worker_info();
        (info.rank, info.host)
    }

    /// `worker_info()` in a task names a worker rank and its host.
    /// (And `mpi_worker_ranks()` on rank 0 counts every rank but 0.)
    fn worker_info_names_the_rank() -> Result<(), String> {
        let size = parjob_mpi_world_size();
        check(parjob::mpi_worker_ranks() == Some(size - 1), || {
            format!(
                "mpi_worker_ranks() said {:?} in a world of {size}",
                parjob::mpi_worker_ranks()
            )
        })?;
        let out = mpi(-1)
            .run((0..50u64).map(|i| delayed(rank_of_worker, i)))
            .map_err(|e| e.to_string())?;
        check(
            out.iter()
                .all(|(rank, host)| rank.is_some_and(|r| r >= 1) && !host.is_empty()),
            || format!("{out:?}"),
        )
    }

    fn where_am_i(_: u64) -> (u32, u32) {
        // SAFETY: getppid has no preconditions.
        (std::process::id(), unsafe { libc::getppid() } as u32)
    }

    /// Kills the rank server that runs this local worker (its parent) at task 5, after
    /// writing the pids of every local worker of that rank to `report`.
    fn kills_its_rank(x: u64, report: String) -> u64 {
        if x == 5 {
            // SAFETY: getppid has no preconditions.
            let rank_pid = unsafe { libc::getppid() };
            let mut children = Vec::new();
            if let Ok(dir) = std::fs::read_dir("/proc") {
                for entry in dir.flatten() {
                    let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                        continue;
                    };
                    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                        continue;
                    };
                    let ppid = stat
                        .rsplit_once(") ")
                        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                        .and_then(|p| p.parse::<i32>().ok());
                    if ppid == Some(rank_pid) {
                        children.push(pid.to_string());
                    }
                }
            }
            let _ = std::fs::write(&report, children.join(" "));
            // SAFETY: sending a signal is sound; it ends the rank server on purpose.
            unsafe { libc::kill(rank_pid, libc::SIGKILL) };
            std::thread::sleep(Duration::from_secs(30));
        }
        x
    }

    fn gone(pid: &str) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
            Err(_) => true,
        }
    }

    fn mpi(n_jobs: i32) -> Parallel {
        Parallel::new(n_jobs).backend(Backend::Mpi)
    }

    type Case = (&'static str, fn() -> Result<(), String>);

    fn check(condition: bool, what: impl FnOnce() -> String) -> Result<(), String> {
        if condition { Ok(()) } else { Err(what()) }
    }

    /// The sockets (`socket:[inode]`) that process `pid` holds.
    fn sockets_of(pid: &str) -> BTreeSet<String> {
        let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            return BTreeSet::new();
        };
        entries
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .map(|target| target.to_string_lossy().into_owned())
            .filter(|target| target.starts_with("socket:"))
            .collect()
    }

    /// The sockets a local worker shares with its rank (its parent): the rank's MPI
    /// connections, if the worker inherited them.
    fn sockets_shared_with_my_rank(_: u64) -> Vec<String> {
        // SAFETY: getppid has no preconditions.
        let rank = unsafe { libc::getppid() }.to_string();
        let mine = sockets_of("self");
        sockets_of(&rank).intersection(&mine).cloned().collect()
    }

    /// A rank's local workers do not inherit its MPI connections (Open MPI opens them without
    /// close-on-exec): a task that closed or wrote into them ended the rank.
    fn workers_hold_no_socket_of_their_rank() -> Result<(), String> {
        let parallel = mpi(-1).batch_size(BatchSize::Fixed(1));
        let shared = parallel
            .run((0..8u64).map(|i| delayed(sockets_shared_with_my_rank, i)))
            .map_err(|e| e.to_string())?;
        check(shared.iter().all(Vec::is_empty), || {
            format!("workers share these sockets with their rank: {shared:?}")
        })
    }

    fn ordering() -> Result<(), String> {
        let parallel = mpi(-1);
        let out = parallel
            .run((0..10_000u64).map(|i| delayed(square, i)))
            .map_err(|e| e.to_string())?;
        check(
            out == (0..10_000u64).map(square).collect::<Vec<_>>(),
            || "run: wrong results".into(),
        )?;
        let iter: Vec<u64> = parallel
            .run_iter((0..500u64).map(|i| delayed(square, i)))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        check(iter == (0..500u64).map(square).collect::<Vec<_>>(), || {
            "run_iter: wrong order".into()
        })?;
        let unordered: BTreeSet<(usize, u64)> = parallel
            .run_unordered((0..500u64).map(|i| delayed(square, i)))
            .map(|(i, r)| r.map(|v| (i, v)))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        let expected: BTreeSet<(usize, u64)> =
            (0..500u64).map(|i| (i as usize, square(i))).collect();
        check(unordered == expected, || {
            "run_unordered: wrong pairs".into()
        })
    }

    fn laziness() -> Result<(), String> {
        let pulled = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&pulled);
        let parallel = mpi(-1).batch_size(BatchSize::Fixed(1)).pre_dispatch(4);
        let endless = (0u64..).map(move |i| {
            counter.fetch_add(1, Ordering::SeqCst);
            delayed(square, i)
        });
        let mut results = parallel.run_iter(endless);
        let first: Vec<u64> = results
            .by_ref()
            .take(10)
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        check(first == (0..10u64).map(square).collect::<Vec<_>>(), || {
            format!("{first:?}")
        })?;
        let after = pulled.load(Ordering::SeqCst);
        drop(results);
        check(after <= 10 + 4 + 1, || {
            format!("pulled {after} tasks for 10 results")
        })?;
        // Auto batching over an endless input stays bounded too.
        let pulled = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&pulled);
        let endless = (0u64..).map(move |i| {
            counter.fetch_add(1, Ordering::SeqCst);
            delayed(square, i)
        });
        let taken = mpi(-1).run_iter(endless).take(100_000).count();
        let pulled = pulled.load(Ordering::SeqCst);
        check(
            taken == 100_000 && pulled <= 100_000 + 64 * (1 << 20),
            || format!("pulled {pulled}"),
        )
    }

    /// The failure names the rank, and the same `Parallel` runs again afterwards.
    fn failure_then_recovery<F: parjob::TaskFn<u64, parjob::Whole, Output = u64> + Copy>(
        task: F,
        index: usize,
        expect: impl Fn(&Error) -> bool,
    ) -> Result<(), String> {
        let parallel = mpi(-1);
        let err = match parallel.run((0..20u64).map(|i| delayed(task, i))) {
            Ok(_) => return Err("the run succeeded".into()),
            Err(e) => e,
        };
        let text = err.to_string();
        let Error::OnRank { rank, error, .. } = &err else {
            return Err(format!("not an OnRank error: {text}"));
        };
        check(
            *rank >= 1 && text.contains("MPI rank") && text.contains("host"),
            || text.clone(),
        )?;
        check(error.task_index() == Some(index), || {
            format!("wrong task: {text}")
        })?;
        check(expect(error), || format!("wrong failure: {text}"))?;
        // The same failure as any backend gives, for code that matches on every backend.
        check(expect(err.without_rank()), || {
            format!("without_rank gave the wrong failure: {text}")
        })?;
        let again = parallel
            .run((0..1000u64).map(|i| delayed(square, i)))
            .map_err(|e| format!("the next run failed: {e}"))?;
        check(again[999] == 999 * 999, || "the next run is wrong".into())
    }

    fn panic() -> Result<(), String> {
        failure_then_recovery(
            panics_at_7,
            7,
            // It names the rank's local worker process that ran it, as the process backend does.
            |e| matches!(e, Error::TaskPanicked { message, worker: Some(_), pid: Some(pid), .. } if message.contains("task seven refuses") && *pid > 0),
        )
    }

    fn abort() -> Result<(), String> {
        failure_then_recovery(
            aborts_at_3,
            3,
            |e| matches!(e, Error::WorkerCrashed { status: WorkerExit::Signaled(6), pid, .. } if *pid > 0),
        )
    }

    fn segfault() -> Result<(), String> {
        failure_then_recovery(segfaults_at_2, 2, |e| {
            matches!(
                e,
                Error::WorkerCrashed {
                    status: WorkerExit::Signaled(11),
                    ..
                }
            )
        })
    }

    /// A stack overflow in a rank's local worker crosses to rank 0 with the worker's last
    /// words, which name it.
    fn stack_overflow() -> Result<(), String> {
        failure_then_recovery(overflows_at_4, 4, |e| {
            matches!(
                e,
                Error::WorkerCrashed {
                    status: WorkerExit::Signaled(6),
                    last_words: Some(said),
                    ..
                } if said.contains("has overflowed its stack")
            )
        })
    }

    /// A `RUN` whose trailer the rank cannot read (only a faulty rank 0 sends one) is answered:
    /// the run fails with an error naming the rank instead of waiting for ever, and the next
    /// run works.
    fn unreadable_run() -> Result<(), String> {
        let parallel = std::sync::Arc::new(mpi(-1));
        let (tx, rx) = std::sync::mpsc::channel();
        let runner = std::sync::Arc::clone(&parallel);
        std::thread::spawn(move || {
            parjob::__mpi_break_next_run();
            let _ = tx.send(runner.run([delayed(square, 5u64)]));
        });
        let err = match rx.recv_timeout(Duration::from_secs(20)) {
            Err(_) => return Err("no answer within 20 s: the broken RUN was never answered".into()),
            Ok(Ok(_)) => return Err("the run succeeded".into()),
            Ok(Err(e)) => e,
        };
        let text = err.to_string();
        let Error::OnRank { rank, .. } = &err else {
            return Err(format!("not an OnRank error: {text}"));
        };
        check(
            *rank >= 1
                && text.contains(&format!("MPI rank {rank} could not read the RUN"))
                && text.contains("task 0"),
            || text.clone(),
        )?;
        let again = parallel
            .run((0..1000u64).map(|i| delayed(square, i)))
            .map_err(|e| format!("the next run failed: {e}"))?;
        check(again[999] == 999 * 999, || "the next run is wrong".into())
    }

    fn timeout() -> Result<(), String> {
        let parallel = mpi(-1).timeout(Duration::from_millis(300));
        let err = parallel
            .run([1u64, 1, 60_000, 1].map(|ms| delayed(sleeps, ms)))
            .err()
            .ok_or("the run succeeded")?;
        let text = err.to_string();
        let Error::OnRank { error, .. } = &err else {
            return Err(format!("not an OnRank error: {text}"));
        };
        check(
            matches!(
                **error,
                Error::Timeout {
                    index: 2,
                    killed: true,
                    worker: Some(_),
                    pid: Some(_),
                    ..
                }
            ),
            || text.clone(),
        )?;
        // The rank's local worker it killed, by pid, as on the process backend.
        check(
            text.contains(", pid ") && text.contains("was killed"),
            || text.clone(),
        )?;
        let again = parallel
            .run((0..10u64).map(|i| delayed(square, i)))
            .map_err(|e| e.to_string())?;
        check(again[3] == 9, || "the next run is wrong".into())
    }

    fn executor() -> Result<(), String> {
        let executor = Executor::new(-1).backend(Backend::Mpi);
        let futures: Vec<_> = (0..50u64)
            .map(|i| executor.submit(delayed(square, i)))
            .collect();
        let mut seen = BTreeSet::new();
        for future in as_completed(futures) {
            seen.insert(future.result().map_err(|e| e.to_string())?);
        }
        check(seen == (0..50u64).map(square).collect(), || {
            format!("{seen:?}")
        })?;
        let mapped: Vec<u64> = executor
            .map((0..100u64).map(|i| delayed(square, i)))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        check(mapped[10] == 100, || "map is wrong".into())?;
        // A submitted task's time limit holds: its rank kills the local worker running it.
        let held = executor.submit(delayed(sleeps, 60_000).timeout(Duration::from_millis(300)));
        match held.result() {
            Err(e) if matches!(e.without_rank(), Error::Timeout { killed: true, .. }) => {}
            other => return Err(format!("a submitted task past its limit gave {other:?}")),
        }
        let after = executor.submit(delayed(square, 5)).result();
        check(after == Ok(25), || {
            format!("the next submit gave {after:?}")
        })
    }

    /// A daemon executor dropped with tasks still queued for its pool (one with an
    /// initializer, which the ranks stop at the drop): those tasks are cancelled before they
    /// ran, as on the process backend, not sent to ranks that no longer have the pool.
    fn daemon_executor_dropped() -> Result<(), String> {
        let executor = Executor::new(-1)
            .backend(Backend::Mpi)
            .initializer_with(set_value, 7)
            .daemon(true);
        let futures: Vec<_> = (0..40u64)
            .map(|i| executor.submit(delayed(sleeps, 20 + i % 2)))
            .collect();
        std::thread::sleep(Duration::from_millis(30));
        drop(executor);
        let (mut ran, mut cancelled) = (0, 0);
        for (i, future) in futures.into_iter().enumerate() {
            match future.result() {
                Ok(_) => ran += 1,
                // Not started, or running when the pool went (a daemon's tasks are not
                // waited for).
                Err(Error::Cancelled { .. } | Error::Abandoned { .. }) => cancelled += 1,
                Err(e) => return Err(format!("task {i}: {e}")),
            }
        }
        println!("  {ran} ran, {cancelled} cancelled or abandoned");
        check(cancelled > 0, || {
            format!("all {ran} tasks ran: the drop came too late to test anything")
        })?;
        let out = mpi(-1)
            .run((0..100u64).map(|i| delayed(square, i)))
            .map_err(|e| format!("the run after: {e}"))?;
        check(out[9] == 81, || "the run after: wrong".into())
    }

    /// An argument whose `Serialize` takes longer than a rank may wait for rank 0's beat.
    #[derive(Debug, serde::Deserialize)]
    struct SlowToEncode(u64);

    impl serde::Serialize for SlowToEncode {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            std::thread::sleep(SLOWER_THAN_A_RANK_WAITS);
            self.0.serialize(s)
        }
    }

    /// Longer than the 5 s a rank waits for rank 0's beat (`PARJOB_MPI_RANK_TIMEOUT`).
    const SLOWER_THAN_A_RANK_WAITS: Duration = Duration::from_secs(6);

    fn unwrap_slow(x: SlowToEncode) -> u64 {
        x.0
    }

    /// A result (of 300 KB in the test: a single record, not a batch of small ones) whose
    /// `Deserialize` takes longer than a rank waits for rank 0's beat.
    #[derive(Debug, serde::Serialize)]
    struct SlowToDecode(Vec<u8>);

    impl<'de> serde::Deserialize<'de> for SlowToDecode {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<SlowToDecode, D::Error> {
            let bytes = Vec::<u8>::deserialize(d)?;
            std::thread::sleep(SLOWER_THAN_A_RANK_WAITS);
            Ok(SlowToDecode(bytes))
        }
    }

    fn slow_to_decode(len: usize) -> SlowToDecode {
        SlowToDecode(vec![7; len])
    }

    /// User code that runs on rank 0 for longer than a rank waits for its beat (a future's
    /// done-callback, an argument's `Serialize`) does not hold up the MPI thread: before, the
    /// ranks took rank 0 for lost and left, and every later run failed.
    fn slow_user_code_on_rank_0() -> Result<(), String> {
        let executor = Executor::new(-1).backend(Backend::Mpi);
        let future = executor.submit(delayed(square, 3));
        let (called, call) = std::sync::mpsc::channel();
        future.add_done_callback(move |_| {
            std::thread::sleep(SLOWER_THAN_A_RANK_WAITS);
            let _ = called.send(());
        });
        call.recv_timeout(Duration::from_secs(60))
            .map_err(|_| "the done-callback never ran".to_string())?;
        let out = mpi(-1)
            .run((0..100u64).map(|i| delayed(square, i)))
            .map_err(|e| format!("after a slow done-callback: {e}"))?;
        check(out[9] == 81, || "wrong after a slow done-callback".into())?;
        let out = mpi(-1)
            .run([delayed(unwrap_slow, SlowToEncode(5))])
            .map_err(|e| format!("a slow Serialize: {e}"))?;
        check(out == [5], || format!("a slow Serialize gave {out:?}"))?;
        let out = mpi(-1)
            .run((0..100u64).map(|i| delayed(square, i)))
            .map_err(|e| format!("after a slow Serialize: {e}"))?;
        check(out[9] == 81, || "wrong after a slow Serialize".into())?;
        let out = mpi(-1)
            .run([delayed(slow_to_decode, 300_000)])
            .map_err(|e| format!("a slow Deserialize: {e}"))?;
        check(out[0].0.len() == 300_000 && out[0].0[0] == 7, || {
            "a slow Deserialize gave a wrong value".into()
        })?;
        let out = mpi(-1)
            .run((0..100u64).map(|i| delayed(square, i)))
            .map_err(|e| format!("after a slow Deserialize: {e}"))?;
        check(out[9] == 81, || "wrong after a slow Deserialize".into())
    }

    /// A `DONE` that takes longer to arrive than a rank waits for rank 0's beat (a big result
    /// over a slow network; here rank 0 holds one back, as if it were still arriving) holds up
    /// neither the beats nor the other ranks' `DONE`s. Before, rank 0's MPI thread waited for
    /// the whole of a message: a 1.5 GB result outlasted a 1 s `PARJOB_MPI_RANK_TIMEOUT`, and
    /// the ranks took rank 0 for lost and left.
    fn slow_arriving_done() -> Result<(), String> {
        let executor = Executor::new(-1).backend(Backend::Mpi);
        // A warm world: the held `DONE` is the task's, not one of the start.
        let warm = executor.submit(delayed(square, 2));
        check(warm.result() == Ok(4), || "the warm-up call failed".into())?;
        parjob::__mpi_hold_next_done(SLOWER_THAN_A_RANK_WAITS);
        let held = executor.submit(delayed(square, 3));
        // Its DONE came back and is held: the other calls go on meanwhile (those on the
        // other worker rank; a rank's own messages keep their order behind the held one).
        let began = Instant::now();
        let others: Vec<_> = (0..8u64)
            .map(|i| executor.submit(delayed(square, i)))
            .collect();
        let first = as_completed(others)
            .next()
            .ok_or("no call came back while a DONE was held")?;
        let waited = began.elapsed();
        check(waited < SLOWER_THAN_A_RANK_WAITS / 2, || {
            format!("the first call beside a held DONE took {waited:?}")
        })?;
        let value = first
            .result()
            .map_err(|e| format!("a call beside a held DONE: {e}"))?;
        check((0..8u64).any(|i| i * i == value), || {
            format!("a call beside a held DONE gave {value}")
        })?;
        check(held.result() == Ok(9), || {
            "the held DONE's call failed".into()
        })?;
        check(began.elapsed() >= SLOWER_THAN_A_RANK_WAITS / 2, || {
            "the DONE was not held: the test proves nothing".into()
        })?;
        // No rank left meanwhile: a run over every rank works.
        let out = mpi(-1)
            .run((0..100u64).map(|i| delayed(square, i)))
            .map_err(|e| format!("after a held DONE: {e}"))?;
        check(out[9] == 81, || "wrong after a held DONE".into())
    }

    /// `max_tasks_per_worker` applies on the ranks' local workers: with 1, every task runs in
    /// a worker process of its own.
    fn max_tasks_per_worker() -> Result<(), String> {
        let out = mpi(-1)
            .max_tasks_per_worker(1)
            .batch_size(BatchSize::Fixed(1))
            .run((0..12u64).map(|i| delayed(where_am_i, i)))
            .map_err(|e| e.to_string())?;
        let pids: BTreeSet<u32> = out.iter().map(|(pid, _)| *pid).collect();
        check(pids.len() == out.len(), || {
            format!(
                "12 tasks ran in only {} worker processes: {out:?}",
                pids.len()
            )
        })?;
        // And the pool after it (the ranks' first pool) keeps its workers.
        let out = mpi(-1)
            .batch_size(BatchSize::Fixed(1))
            .run((0..40u64).map(|i| delayed(where_am_i, i)))
            .map_err(|e| format!("the run after: {e}"))?;
        let pids: BTreeSet<u32> = out.iter().map(|(pid, _)| *pid).collect();
        check(pids.len() < out.len(), || {
            "without max_tasks_per_worker every task had a worker of its own".into()
        })
    }

    /// How many times each `parjob-mpi` thread of process `pid` has been put on a CPU so far
    /// (the third field of its schedstat), by thread id.
    fn mpi_thread_wakeups(pid: u32) -> Result<Vec<(u32, u64)>, String> {
        let tasks = format!("/proc/{pid}/task");
        let dir = std::fs::read_dir(&tasks).map_err(|e| format!("cannot read {tasks}: {e}"))?;
        let mut counts = Vec::new();
        for entry in dir.flatten() {
            let tid = entry.file_name().to_string_lossy().to_string();
            let comm = std::fs::read_to_string(format!("{tasks}/{tid}/comm")).unwrap_or_default();
            if comm.trim() != "parjob-mpi" {
                continue;
            }
            let path = format!("{tasks}/{tid}/schedstat");
            let stat = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read {path} (needs CONFIG_SCHED_INFO): {e}"))?;
            let runs = stat
                .split_whitespace()
                .nth(2)
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("{path} says {stat:?}"))?;
            counts.push((tid.parse().unwrap_or(0), runs));
        }
        Ok(counts)
    }

    /// Ranks on rank 0's host ring each other's doorbells instead of polling MPI: a rank idle
    /// for more than the 20 ms in which it polls for the next call wakes a few hundred times a
    /// second at most (it polled every 500 us, over 2000 times a second, before), and rank 0 removes the doorbells' directory once
    /// every rank rang (its FIFOs live on, open), so a killed run leaves nothing behind.
    fn idle_ranks_sleep_on_their_doorbells() -> Result<(), String> {
        let pool = mpi(-1).batch_size(BatchSize::Fixed(1));
        let out = pool
            .run((0..64u64).map(|i| delayed(where_am_i, i)))
            .map_err(|e| e.to_string())?;
        let hosts = pool
            .run((0..64u64).map(|i| delayed(host_of, i)))
            .map_err(|e| e.to_string())?;
        let here = host_of(0);
        if hosts.iter().any(|h| *h != here) {
            println!("  (ranks on other hosts: they poll MPI, and no doorbell is checked)");
            return Ok(());
        }
        // The FIFOs rank 0 holds open, once their directory is gone.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let fifos: Vec<String> = std::fs::read_dir("/proc/self/fd")
                .map_err(|e| e.to_string())?
                .flatten()
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .map(|target| target.display().to_string())
                .filter(|target| target.contains("parjob-mpi-bells-"))
                .collect();
            check(!fifos.is_empty(), || {
                "rank 0 holds no doorbell: the ranks poll MPI".into()
            })?;
            if fifos.iter().all(|f| f.ends_with("(deleted)")) {
                break;
            }
            check(Instant::now() < deadline, || {
                format!("the doorbells' directory is still there 10 s on: {fifos:?}")
            })?;
            std::thread::sleep(Duration::from_millis(20));
        }
        // The rank servers (the local workers' parents), idle for a second, after the 20 ms
        // in which they poll for the next call.
        let ranks: BTreeSet<u32> = out.iter().map(|(_, parent)| *parent).collect();
        std::thread::sleep(Duration::from_millis(100));
        let before: Vec<Vec<(u32, u64)>> = ranks
            .iter()
            .map(|&pid| mpi_thread_wakeups(pid))
            .collect::<Result<_, _>>()?;
        let idle = Duration::from_secs(1);
        std::thread::sleep(idle);
        for (&pid, before) in ranks.iter().zip(&before) {
            let after = mpi_thread_wakeups(pid)?;
            check(!after.is_empty(), || {
                format!("rank process {pid} has no parjob-mpi thread")
            })?;
            for (tid, runs) in after {
                let earlier = before
                    .iter()
                    .find(|(t, _)| *t == tid)
                    .map_or(0, |(_, r)| *r);
                let woke = runs.saturating_sub(earlier);
                println!("  rank process {pid}: its MPI thread woke {woke} times in {idle:?} idle");
                check(woke < 600, || {
                    format!(
                        "rank process {pid}'s MPI thread woke {woke} times in {idle:?} of \
                         idling: it polls instead of sleeping on its doorbell"
                    )
                })?;
            }
        }
        // And the world still answers at once.
        let out = pool
            .run((0..8u64).map(|i| delayed(square, i)))
            .map_err(|e| format!("after idling: {e}"))?;
        check(out[7] == 49, || format!("{out:?}"))
    }

    fn host_of(_: u64) -> String {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default()
    }

    /// A done-callback that blocks holds up nothing else: not a run of the program (its
    /// results are decoded on other completer threads), and not another future of the same
    /// executor that the callback itself waits for (a deadlock when every job ended on one
    /// thread).
    fn blocked_done_callbacks() -> Result<(), String> {
        let executor = Arc::new(Executor::new(-1).backend(Backend::Mpi));
        // A callback that waits for another future of the same executor.
        let (inner_tx, inner_rx) = std::sync::mpsc::channel();
        let inside = Arc::clone(&executor);
        executor
            .submit(delayed(square, 3))
            .add_done_callback(move |_| {
                let inner = inside.submit(delayed(square, 4)).result();
                let _ = inner_tx.send(inner.map_err(|e| e.to_string()));
            });
        match inner_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(16)) => {}
            Ok(other) => return Err(format!("the future awaited in a callback gave {other:?}")),
            Err(_) => return Err("a callback waiting for another future deadlocked".into()),
        }
        // A callback blocked until a later run is over.
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        executor
            .submit(delayed(square, 5))
            .add_done_callback(move |_| {
                let _ = release_rx.recv_timeout(Duration::from_secs(120));
            });
        std::thread::sleep(Duration::from_millis(200));
        let (ran_tx, ran_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let out = mpi(-1).run((0..4u64).map(|i| delayed(big_result, 300_000 + i)));
            let _ = ran_tx.send(out.map(|v| v.len()).map_err(|e| e.to_string()));
        });
        let ran = ran_rx.recv_timeout(Duration::from_secs(60));
        let _ = release_tx.send(());
        match ran {
            Ok(Ok(4)) => Ok(()),
            Ok(other) => Err(format!("the run beside a blocked callback gave {other:?}")),
            Err(_) => Err("a run waited for an unrelated blocked done-callback".into()),
        }
    }

    /// A result of `len` bytes, quick to decode.
    fn big_result(len: u64) -> Vec<u8> {
        vec![1; len as usize]
    }

    fn million_tiny_tasks() -> Result<(), String> {
        let out = mpi(-1)
            .run((0..1_000_000u64).map(|i| delayed(square, i)))
            .map_err(|e| e.to_string())?;
        check(out.len() == 1_000_000, || format!("{} results", out.len()))?;
        let wrong = out
            .iter()
            .enumerate()
            .find(|&(i, &v)| v != (i as u64) * (i as u64));
        check(wrong.is_none(), || format!("wrong result {wrong:?}"))
    }

    fn tasks_run_outside_rank_0() -> Result<(), String> {
        let out = mpi(-1)
            .run((0..20u64).map(|i| delayed(where_am_i, i)))
            .map_err(|e| e.to_string())?;
        let me = std::process::id();
        check(
            out.iter().all(|&(pid, parent)| pid != me && parent != me),
            || format!("a task ran in rank 0 or one of its children: {out:?}"),
        )
    }

    fn n_jobs_picks_ranks() -> Result<(), String> {
        let one: Vec<(u32, u32)> = mpi(1)
            .run((0..200u64).map(|i| delayed(where_am_i, i)))
            .map_err(|e| e.to_string())?;
        let parents: BTreeSet<u32> = one.iter().map(|&(_, p)| p).collect();
        check(parents.len() == 1, || {
            format!("n_jobs = 1 used rank servers {parents:?}")
        })?;
        // What `effective_n_jobs` says is what runs use: worker ranks, at most the world's.
        let worker_ranks = parjob_mpi_world_size() - 1;
        for (n_jobs, expected) in [(1, 1), (-1, worker_ranks), (1000, worker_ranks)] {
            let said = mpi(n_jobs).effective_n_jobs().map_err(|e| e.to_string())?;
            check(said == expected, || {
                format!("effective_n_jobs for n_jobs {n_jobs}: {said}, expected {expected}")
            })?;
        }
        Ok(())
    }

    fn where_am_i_slowly(ms: u64) -> (u32, u32) {
        std::thread::sleep(Duration::from_millis(ms));
        where_am_i(ms)
    }

    /// `n_jobs = -2` is every worker rank but one (joblib's `-k`: all but `k - 1`), at least 1:
    /// slow tasks, one per batch, never reach more rank servers than that.
    fn n_jobs_minus_k() -> Result<(), String> {
        let worker_ranks = parjob_mpi_world_size().saturating_sub(1);
        let expected = worker_ranks.saturating_sub(1).max(1);
        let out: Vec<(u32, u32)> = mpi(-2)
            .run((0..24u64).map(|_| delayed(where_am_i_slowly, 20)))
            .map_err(|e| e.to_string())?;
        let parents: BTreeSet<u32> = out.iter().map(|&(_, p)| p).collect();
        check(parents.len() == expected, || {
            format!(
                "n_jobs = -2 of {worker_ranks} worker ranks used rank servers {parents:?}, \
                 expected {expected}"
            )
        })
    }

    /// Every batch's completion says what moving it cost (bytes each way, encode and decode
    /// time) and which worker ran it, and the insights sum the costs.
    fn batches_carry_transport_figures() -> Result<(), String> {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        let parallel = mpi(-1)
            .batch_size(BatchSize::Fixed(10))
            .insights(true)
            .on_event(move |event: &parjob::Event| {
                if let parjob::Event::BatchCompleted {
                    worker, transport, ..
                } = event
                {
                    sink.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push((*worker, *transport));
                }
            });
        let out = parallel
            .run((0..100u64).map(|i| delayed(square, i)))
            .map_err(|e| e.to_string())?;
        check(out[99] == 99 * 99, || "wrong result".into())?;
        let seen = seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        check(seen.len() == 10, || format!("{} completions", seen.len()))?;
        // Each batch names the worker that ran it (a rank's local worker, counted across the
        // ranks), so that the trace places it on that worker's row.
        check(seen.iter().all(|(worker, _)| worker.is_some()), || {
            format!("a batch without its worker: {seen:?}")
        })?;
        for (_, transport) in &seen {
            let t = transport.ok_or("a batch without transport figures")?;
            // Ten 8-byte arguments out, ten 8-byte values back, with their framing.
            check(t.bytes_sent >= 80 && t.bytes_received >= 80, || {
                format!("{t:?}")
            })?;
        }
        let insights = parallel.last_insights().ok_or("no insights")?;
        let sent: u64 = seen
            .iter()
            .filter_map(|(_, t)| *t)
            .map(|t| t.bytes_sent)
            .sum();
        let total = insights.transport;
        check(total.bytes_sent == sent, || format!("{total:?} vs {sent}"))?;
        // IPC is the time on the wire, not the time a frame waited on its rank behind another
        // for the local worker (each rank takes twice its local workers' frames at once): 50 ms
        // tasks, whose round trips through MPI take well under a millisecond.
        let slow = mpi(-1).batch_size(BatchSize::Fixed(1)).insights(true);
        let tasks = 4 * parjob_mpi_world_size() as u64;
        slow.run((0..tasks).map(|_| delayed(sleeps, 50)))
            .map_err(|e| e.to_string())?;
        let insights = slow.last_insights().ok_or("no insights")?;
        let busy = insights.busy;
        let ipc = insights.transport.ipc;
        check(ipc < busy / 4, || {
            format!("IPC {ipc:?} against {busy:?} in tasks: it counts waiting on the ranks")
        })
    }

    /// 10 MB of `f64`s: 1.25 million values.
    const BIG: usize = 1_250_000;

    /// The sum of `data[i * 1000..][..1000]` and the rank this ran on.
    fn window_sum(data: parjob::SharedSlice<f64>, i: u64) -> (Option<usize>, f64) {
        let start = (i as usize * 1000) % data.len().max(1);
        let window = &data[start..(start + 1000).min(data.len())];
        (parjob::worker_info().rank, window.iter().sum())
    }

    /// The bytes rank 0 sent to each worker rank in one run of `tasks` tasks that all get the
    /// whole of `data` (one task per batch), from the batches' transport figures and the
    /// ranks the tasks say they ran on; and the results.
    #[allow(clippy::type_complexity)]
    fn bytes_per_rank(
        data: &parjob::SharedSlice<f64>,
        tasks: u64,
    ) -> Result<(std::collections::BTreeMap<usize, u64>, Vec<f64>), String> {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        let out = mpi(-1)
            .batch_size(BatchSize::Fixed(1))
            .on_event(move |event: &parjob::Event| {
                if let parjob::Event::BatchCompleted {
                    first_index,
                    transport,
                    ..
                } = event
                {
                    sink.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push((*first_index, transport.map_or(0, |t| t.bytes_sent)));
                }
            })
            .run((0..tasks).map(|i| delayed(window_sum, (data.clone(), i))))
            .map_err(|e| e.to_string())?;
        let seen = seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        check(seen.len() == tasks as usize, || {
            format!("{} completions for {tasks} batches", seen.len())
        })?;
        let mut per_rank = std::collections::BTreeMap::new();
        for (index, bytes) in seen {
            let rank = out[index].0.ok_or("a task without a rank")?;
            *per_rank.entry(rank).or_insert(0u64) += bytes;
        }
        Ok((per_rank, out.into_iter().map(|(_, sum)| sum).collect()))
    }

    /// A 10 MB `SharedSlice` that every task gets whole reaches each rank once, with the first
    /// batch that names it there: later batches (and later runs) carry only its handle.
    fn shared_slice_sent_once_per_rank() -> Result<(), String> {
        let data: parjob::SharedSlice<f64> = (0..BIG).map(|i| i as f64).collect();
        check(data.is_shared(), || {
            "the slice is not in shared memory on rank 0 (parjob::init()?)".into()
        })?;
        let size = (BIG * 8) as u64;
        // Handles, indices, headers and framing: far below the slice, however many batches.
        let slack = 64 * 1024;
        let (first, _) = bytes_per_rank(&data, 60)?;
        check(!first.is_empty(), || "no rank ran a task".into())?;
        for (&rank, &bytes) in &first {
            check(bytes >= size && bytes <= size + slack, || {
                format!(
                    "rank {rank} was sent {bytes} bytes for a {size}-byte slice (once is                      {size}..{}): {first:?}",
                    size + slack
                )
            })?;
        }
        println!("  a {size}-byte SharedSlice given to 60 tasks, bytes sent per rank: {first:?}");
        // The ranks still hold it: a second run sends none of its bytes.
        let (second, _) = bytes_per_rank(&data, 30)?;
        let total: u64 = second.values().sum();
        check(total <= slack, || {
            format!("the second run sent {total} bytes: {second:?}")
        })
    }

    /// How many mappings of a 10 MB shared segment (`BIG` values) this local worker and its
    /// rank server (its parent) hold.
    fn big_mappings(_: u64) -> usize {
        let size = (BIG * 8).div_ceil(4096) * 4096;
        // SAFETY: getppid has no preconditions.
        let parent = unsafe { libc::getppid() };
        ["self".to_string(), parent.to_string()]
            .iter()
            .map(|pid| {
                let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
                maps.lines()
                    .filter(|line| line.contains("memfd:"))
                    .filter(|line| {
                        let range = line.split_whitespace().next().unwrap_or("");
                        let (a, b) = range.split_once('-').unwrap_or(("0", "0"));
                        let a = usize::from_str_radix(a, 16).unwrap_or(0);
                        let b = usize::from_str_radix(b, 16).unwrap_or(0);
                        b.saturating_sub(a) == size
                    })
                    .count()
            })
            .sum()
    }

    /// What `big_mappings` says on many workers of every rank.
    fn segment_mappings(_: u64) -> Vec<usize> {
        let tasks = 8 * parjob_mpi_world_size() as u64;
        mpi(-1)
            .batch_size(BatchSize::Fixed(1))
            .run((0..tasks).map(|i| delayed(big_mappings, i)))
            .unwrap_or_default()
    }

    /// Tasks read the right values from a `SharedSlice` sent once: whole, cut with `slice`,
    /// and after the driver dropped it (and the ranks and their workers unmapped it), a new
    /// slice of other values in its place.
    fn shared_slice_values() -> Result<(), String> {
        let expected = |data: &[f64], tasks: u64| -> Vec<f64> {
            (0..tasks)
                .map(|i| {
                    let start = (i as usize * 1000) % data.len();
                    data[start..(start + 1000).min(data.len())].iter().sum()
                })
                .collect()
        };
        let first: parjob::SharedSlice<f64> = (0..BIG).map(|i| (i % 977) as f64).collect();
        let (_, sums) = bytes_per_rank(&first, 40)?;
        check(sums == expected(&first, 40), || {
            "wrong sums from the whole slice".into()
        })?;
        // A part of it: the same segment, values from an offset.
        let part = first.slice(BIG / 3..).ok_or("out of range")?;
        let (_, sums) = bytes_per_rank(&part, 40)?;
        check(sums == expected(&part, 40), || {
            "wrong sums from a part of the slice".into()
        })?;
        check(segment_mappings(0).iter().all(|&n| n > 0), || {
            "the ranks do not map the slice's segment while it is alive (is the test looking \
             at the right mappings?)"
                .into()
        })?;
        drop((first, part));
        // The driver tells the ranks it dropped the slice; they and their local workers unmap
        // it.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let counts = segment_mappings(0);
            if counts.iter().all(|&n| n == 0) {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "10 s after the driver dropped the slice, ranks and their workers still map \
                     it: {counts:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let second: parjob::SharedSlice<f64> = (0..BIG).map(|i| (i % 13) as f64 * 0.5).collect();
        let (_, sums) = bytes_per_rank(&second, 40)?;
        check(sums == expected(&second, 40), || {
            "wrong sums from a second slice".into()
        })
    }

    /// How many times an initializer ran in this process, and the value the last one set.
    static INITS: AtomicUsize = AtomicUsize::new(0);
    static INIT_VALUE: AtomicUsize = AtomicUsize::new(0);

    fn count_init() {
        INITS.fetch_add(1, Ordering::SeqCst);
    }

    fn set_value(value: usize) {
        INITS.fetch_add(1, Ordering::SeqCst);
        INIT_VALUE.store(value, Ordering::SeqCst);
    }

    fn init_panics() {
        panic!("no model file here");
    }

    /// (this worker's pid, how often an initializer ran in it, the value it set, its rank)
    fn init_seen(_: u64) -> (u32, usize, usize, Option<usize>) {
        (
            std::process::id(),
            INITS.load(Ordering::SeqCst),
            INIT_VALUE.load(Ordering::SeqCst),
            parjob::worker_info().rank,
        )
    }

    /// `initializer` and `initializer_with` run once in every local worker of every rank
    /// before its first task, as on the process backend; a pool without one runs in workers
    /// that never ran them; an initializer that panics fails the run with its message, and
    /// the next run works.
    fn initializers() -> Result<(), String> {
        let tasks = 16 * parjob_mpi_world_size() as u64;
        let out = mpi(-1)
            .batch_size(BatchSize::Fixed(1))
            .initializer(count_init)
            .run((0..tasks).map(|i| delayed(init_seen, i)))
            .map_err(|e| e.to_string())?;
        check(
            out.iter()
                .all(|&(_, inits, _, rank)| inits == 1 && rank.is_some_and(|r| r >= 1)),
            || format!("initializer: (pid, runs, value, rank) {out:?}"),
        )?;
        let out = mpi(-1)
            .batch_size(BatchSize::Fixed(1))
            .initializer_with(set_value, 42)
            .run((0..tasks).map(|i| delayed(init_seen, i)))
            .map_err(|e| e.to_string())?;
        check(
            out.iter()
                .all(|&(_, inits, value, _)| inits == 1 && value == 42),
            || format!("initializer_with: (pid, runs, value, rank) {out:?}"),
        )?;
        let ranks: BTreeSet<usize> = out.iter().filter_map(|&(.., rank)| rank).collect();
        let expected = parjob_mpi_world_size() - 1;
        check(
            ranks.len() == expected || tasks < 2 * expected as u64,
            || format!("initializer_with ran on ranks {ranks:?} of {expected}"),
        )?;
        let plain = mpi(-1)
            .run((0..tasks).map(|i| delayed(init_seen, i)))
            .map_err(|e| e.to_string())?;
        check(plain.iter().all(|&(_, inits, _, _)| inits == 0), || {
            format!("a pool without an initializer ran in workers that ran one: {plain:?}")
        })?;
        let err = mpi(-1)
            .initializer(init_panics)
            .run((0..tasks).map(|i| delayed(square, i)))
            .err()
            .ok_or("a run whose initializer panics succeeded")?;
        println!("  a panicking initializer: {err}");
        check(err.to_string().contains("no model file here"), || {
            format!("the error does not carry the initializer's panic: {err}")
        })?;
        // Named once, by task and rank: not "worker 0: worker 2: task 1: ..." as before.
        check(
            err.to_string().starts_with("task ")
                && err.to_string().contains(": its local pool did not start: "),
            || format!("the error does not start by naming the task: {err}"),
        )?;
        let out = mpi(-1)
            .run((0..100u64).map(|i| delayed(square, i)))
            .map_err(|e| format!("after a failed initializer: {e}"))?;
        check(out[9] == 81, || "wrong after a failed initializer".into())
    }

    /// A run whose task SIGKILLs its rank fails with `RankLost` (the world of
    /// `PARJOB_MPI_EXIT_AFTER_LOSS`).
    fn rank_lost_error() -> Result<(), String> {
        let report = std::env::temp_dir().join(format!("parjob-mpi-killed-{}", std::process::id()));
        let path = report.display().to_string();
        let result = mpi(-1)
            .batch_size(BatchSize::Fixed(1))
            .run((0..40u64).map(|i| delayed(kills_its_rank, (i, path.clone()))));
        let _ = std::fs::remove_file(&report);
        match result {
            Err(Error::RankLost { .. }) => Ok(()),
            Err(e) => Err(format!("not RankLost: {e}")),
            Ok(_) => Err("the run succeeded".into()),
        }
    }

    /// Last: it kills a worker rank for good.
    fn rank_killed() -> Result<(), String> {
        let report = std::env::temp_dir().join(format!("parjob-mpi-killed-{}", std::process::id()));
        let path = report.display().to_string();
        let began = Instant::now();
        let result = mpi(-1)
            .batch_size(BatchSize::Fixed(1))
            .run((0..40u64).map(|i| delayed(kills_its_rank, (i, path.clone()))));
        let took = began.elapsed();
        let err = result.err().ok_or("the run succeeded")?;
        let text = err.to_string();
        check(matches!(err, Error::RankLost { .. }), || {
            format!("not RankLost: {text}")
        })?;
        check(text.contains("MPI rank") && text.contains("host"), || {
            text.clone()
        })?;
        // "Within seconds": generous for a loaded machine, far below a hang.
        check(took < Duration::from_secs(60), || format!("took {took:?}"))?;
        let children = std::fs::read_to_string(&report).unwrap_or_default();
        let _ = std::fs::remove_file(&report);
        let deadline = Instant::now() + Duration::from_secs(10);
        let left = loop {
            let left: Vec<&str> = children.split_whitespace().filter(|p| !gone(p)).collect();
            if left.is_empty() || Instant::now() > deadline {
                break left;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        check(!children.is_empty(), || {
            "the task did not list the rank's workers".into()
        })?;
        check(left.is_empty(), || {
            format!("orphans of the killed rank: {left:?}")
        })?;
        // The surviving ranks (if any) still run tasks.
        if parjob_mpi_world_size() > 2 {
            let out = mpi(-1)
                .run((0..100u64).map(|i| delayed(square, i)))
                .map_err(|e| format!("after the loss: {e}"))?;
            check(out[9] == 81, || "wrong after the loss".into())?;
        }
        Ok(())
    }

    fn parjob_mpi_world_size() -> usize {
        std::env::var("OMPI_COMM_WORLD_SIZE")
            .or_else(|_| std::env::var("PMI_SIZE"))
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    pub(crate) fn run_cases() -> ExitCode {
        // A hang is a failure: end the whole run after 10 minutes.
        std::thread::spawn(|| {
            std::thread::sleep(Duration::from_secs(600));
            println!("MPI suite: still running after 600 s, a hang: aborting");
            std::process::exit(2);
        });
        let cases: &[Case] = &[
            ("ordering", ordering),
            ("laziness", laziness),
            ("tasks_run_outside_rank_0", tasks_run_outside_rank_0),
            ("n_jobs_picks_ranks", n_jobs_picks_ranks),
            ("n_jobs_minus_k", n_jobs_minus_k),
            ("worker_info_names_the_rank", worker_info_names_the_rank),
            (
                "workers_hold_no_socket_of_their_rank",
                workers_hold_no_socket_of_their_rank,
            ),
            ("panic", panic),
            ("result_decode_panic", result_decode_panic),
            ("abort", abort),
            ("segfault", segfault),
            ("stack_overflow", stack_overflow),
            ("timeout", timeout),
            ("unreadable_run", unreadable_run),
            ("executor", executor),
            ("daemon_executor_dropped", daemon_executor_dropped),
            ("slow_user_code_on_rank_0", slow_user_code_on_rank_0),
            ("slow_arriving_done", slow_arriving_done),
            ("blocked_done_callbacks", blocked_done_callbacks),
            ("million_tiny_tasks", million_tiny_tasks),
            (
                "batches_carry_transport_figures",
                batches_carry_transport_figures,
            ),
            (
                "shared_slice_sent_once_per_rank",
                shared_slice_sent_once_per_rank,
            ),
            ("shared_slice_values", shared_slice_values),
            ("initializers", initializers),
            ("max_tasks_per_worker", max_tasks_per_worker),
            (
                "idle_ranks_sleep_on_their_doorbells",
                idle_ranks_sleep_on_their_doorbells,
            ),
            ("rank_killed", rank_killed),
        ];
        if std::env::var_os("PARJOB_MPI_EXIT_AFTER_LOSS").is_some() {
            let verdict = match rank_lost_error() {
                Ok(()) => "ok".to_string(),
                Err(why) => why,
            };
            println!("test mpi::exit_status_after_a_loss ... {verdict}");
            if let Ok(report) = std::env::var("PARJOB_MPI_REPORT") {
                let _ = std::fs::write(report, &verdict);
            }
            return ExitCode::from(STATUS_AFTER_LOSS);
        }
        if std::env::var_os("PARJOB_MPI_BOUND").is_some() {
            // Rank 1 runs 2 local workers (PARJOB_MPI_WORKERS_PER_RANK=2) on its 1 CPU.
            let verdict = match mpi(-1).run((0..8u64).map(|i| delayed(rank_and_worker, i))) {
                Ok(seen)
                    if seen.iter().all(|&(rank, worker)| {
                        rank == Some(1) && worker.is_some_and(|w| w < 2)
                    }) =>
                {
                    "ok".to_string()
                }
                Ok(seen) => format!("tasks ran elsewhere than rank 1's 2 workers: {seen:?}"),
                Err(e) => format!("the run failed: {e}"),
            };
            if let Ok(report) = std::env::var("PARJOB_MPI_REPORT") {
                let _ = std::fs::write(report, &verdict);
            }
            return ExitCode::SUCCESS;
        }
        if std::env::var_os("PARJOB_MPI_PRINT").is_some() {
            let verdict = match mpi(-1)
                .prefix_worker_output(true)
                .run((0..CHATTY_TASKS).map(|i| delayed(chatty, i)))
            {
                Ok(_) => "ok".to_string(),
                Err(e) => format!("the run failed: {e}"),
            };
            if let Ok(report) = std::env::var("PARJOB_MPI_REPORT") {
                let _ = std::fs::write(report, &verdict);
            }
            return ExitCode::SUCCESS;
        }
        if let Ok(expected) = std::env::var("PARJOB_MPI_EXPECT") {
            if std::env::var_os("PARJOB_MPI_PANIC_DRIVER").is_some() {
                // After the handshake (a run that works), as a bug in the middle of a program.
                if let Err(e) = mpi(-1).run([delayed(square, 2)]) {
                    println!("test mpi::bad_setting ... the run before the panic failed: {e}");
                    return ExitCode::FAILURE;
                }
                parjob::__mpi_panic_driver();
                // The driver looks at its commands at least every 100 ms when idle.
                std::thread::sleep(Duration::from_millis(500));
            }
            let verdict = match bad_setting(&expected) {
                Ok(()) => "ok".to_string(),
                Err(why) => why,
            };
            println!("test mpi::bad_setting ... {verdict}");
            // Without `init()` every rank runs this: rank 0 alone reports.
            let rank = ["OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"]
                .iter()
                .find_map(|var| std::env::var(var).ok());
            if rank.as_deref().is_none_or(|r| r == "0")
                && let Ok(report) = std::env::var("PARJOB_MPI_REPORT")
            {
                let _ = std::fs::write(report, &verdict);
            }
            return if verdict == "ok" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        let filter = std::env::var("PARJOB_MPI_CASES").unwrap_or_default();
        let (mut passed, mut failed, mut skipped) = (0, 0, 0);
        println!(
            "\nrunning {} MPI cases on {} ranks",
            cases.len(),
            parjob_mpi_world_size()
        );
        for (name, case) in cases {
            if !filter.is_empty() && !filter.split(',').any(|f| f == *name) {
                skipped += 1;
                continue;
            }
            let began = Instant::now();
            match case() {
                Ok(()) => {
                    passed += 1;
                    println!("test mpi::{name} ... ok ({:.2?})", began.elapsed());
                }
                Err(why) => {
                    failed += 1;
                    println!("test mpi::{name} ... FAILED: {why}");
                }
            }
        }
        println!(
            "\ntest result: {}. {passed} passed; {failed} failed; {skipped} ignored; 0 measured; 0 filtered out\n",
            if failed == 0 { "ok" } else { "FAILED" }
        );
        if let Ok(report) = std::env::var("PARJOB_MPI_REPORT") {
            let _ = std::fs::write(report, if failed == 0 { "ok" } else { "failed" });
        }
        if failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}
