//! The `mpi` group of `cargo xtask bench`: it runs only under `mpirun`, so it is a step of its
//! own, before the main run: `mpirun --oversubscribe -n 3 parjob-bench --mpi-group` for
//! parjob's rows, and with `--peers` `mpirun ... python -m mpi4py.futures bench_peers.py
//! --mpi` for mpi4py.futures' rows. Each writes a JSON file the main run reads; when a step
//! cannot run, its file says why, and so do the rows.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{BenchArgs, bench_binary, venv_python, write_unavailable};

/// Rank 0 and 2 worker ranks, as the speed goals are stated.
const RANKS: &str = "3";

/// How long one step may take before it is taken as hung and killed.
fn deadline(args: &BenchArgs) -> Duration {
    Duration::from_secs(if args.quick { 240 } else { 600 })
}

/// `mpirun --oversubscribe -n 3` with the environment a one-node run needs (docs/CLUSTER.md):
/// root allowed, traffic on loopback, idle ranks yielding. Variables already set are kept.
fn mpirun() -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.args(["--oversubscribe", "-n", RANKS]);
    for (var, value) in [
        ("OMPI_ALLOW_RUN_AS_ROOT", "1"),
        ("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1"),
        ("OMPI_MCA_btl_tcp_if_include", "lo"),
        ("OMPI_MCA_oob_tcp_if_include", "lo"),
        ("OMPI_MCA_mpi_yield_when_idle", "1"),
    ] {
        if std::env::var_os(var).is_none() {
            cmd.env(var, value);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// Runs `cmd` until it exits or `limit` passes (then kills it). Returns its status as text.
fn run_with_deadline(mut cmd: Command, limit: Duration) -> Result<String, String> {
    let mut child = cmd.spawn().map_err(|e| format!("cannot run mpirun: {e}"))?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status.to_string()),
            Ok(None) if start.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("it did not end within {limit:?} and was killed"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(format!("cannot wait for mpirun: {e}")),
        }
    }
}

/// parjob's rows of the group, into `out`.
pub(super) fn run_group(root: &Path, args: &BenchArgs, out: &Path) {
    let exe = bench_binary(root);
    let _ = std::fs::remove_file(out);
    eprintln!("xtask bench: the mpi group, under mpirun --oversubscribe -n {RANKS}");
    let mut cmd = mpirun();
    cmd.arg(&exe).arg("--mpi-group").arg("--out").arg(out);
    if args.quick {
        cmd.arg("--quick");
    }
    let outcome = run_with_deadline(cmd, deadline(args));
    if !out.exists() {
        let why = match outcome {
            Ok(status) => format!("mpirun ... parjob-bench --mpi-group wrote no rows ({status})"),
            Err(why) => format!("mpirun ... parjob-bench --mpi-group: {why}"),
        };
        eprintln!("xtask bench: {why}");
        write_unavailable(out, &why);
    }
}

/// mpi4py.futures' rows of the group (`xtask/bench_peers.py --mpi` under
/// `python -m mpi4py.futures`), into `out`; mpi4py is pip-installed into the bench's venv.
pub(super) fn run_peer(root: &Path, args: &BenchArgs, out: &Path) {
    let _ = std::fs::remove_file(out);
    let outcome = venv_python(root).and_then(|python| {
        let has_mpi4py = Command::new(&python)
            .args(["-c", "import mpi4py.futures"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !has_mpi4py {
            eprintln!("xtask bench: pip install mpi4py");
            let output = Command::new(&python)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .args(["--timeout", "15", "--retries", "1", "mpi4py"])
                .stderr(Stdio::piped())
                .output()
                .map_err(|e| format!("cannot run pip: {e}"))?;
            if !output.status.success() {
                let stderr = String::from_utf8_lossy(&output.stderr);
                let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
                return Err(format!(
                    "pip install mpi4py failed: {}",
                    last.unwrap_or("").trim()
                ));
            }
        }
        eprintln!("xtask bench: mpi4py.futures, under mpirun --oversubscribe -n {RANKS}");
        let mut cmd = mpirun();
        cmd.arg(&python)
            .args(["-m", "mpi4py.futures"])
            .arg(root.join("xtask").join("bench_peers.py"))
            .arg("--mpi")
            .arg("--out")
            .arg(out);
        if args.quick {
            cmd.arg("--quick");
        }
        // The crash variant ends the whole job (that is what it measures): the status then
        // says so, and the rows were written before it. Open MPI's report of the abort (a
        // page of backtrace) goes to a log beside the rows.
        let log = out.with_extension("log");
        if let Ok(file) = std::fs::File::create(&log) {
            cmd.stderr(file);
            eprintln!("xtask bench: its stderr: {}", log.display());
        }
        let status = run_with_deadline(cmd, deadline(args))?;
        if out.exists() {
            Ok(())
        } else {
            Err(format!(
                "bench_peers.py --mpi wrote no rows (mpirun: {status})"
            ))
        }
    });
    if let Err(why) = outcome {
        eprintln!("xtask bench: mpi4py.futures unavailable: {why}");
        write_unavailable(out, &why);
    }
}
