//! `cargo xtask bench`: parjob's speed, as ratios against rayon, std threads, a plain loop and
//! (with `--peers`) Rust's procspawn and Python's joblib and concurrent.futures.
//!
//! The scenarios live in `xtask/bench-runner` (package `parjob-bench`), which this builds with
//! `--release` and runs: xtask itself is a dev build, and figures from one would mean nothing.
//! With `--peers`, `xtask/bench_peers.py` runs first, in a venv under `target/bench/venv`
//! made here; when that cannot be set up, the peers' rows say why and the rest still runs.
//! The `mpi` group runs under `mpirun` as a step of its own first (see `bench/mpi.rs`).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

mod mpi;

#[path = "../bench-runner/src/names.rs"]
mod names;
use names::SCENARIOS;

/// Backend names parjob accepts, aliases included.
const BACKENDS: [&str; 7] = [
    "sequential",
    "threading",
    "threads",
    "process",
    "processes",
    "loky",
    "multiprocessing",
];

/// Flags of `cargo xtask bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Smaller sizes and 3 counted repeats: a smoke test that ends in under 2 minutes.
    #[arg(long)]
    quick: bool,
    /// Also run procspawn's process pool (in the bench's own process, beside the process
    /// backend), and Python's joblib (threading, loky) and concurrent.futures (thread and
    /// process pools) on the same scenarios, in a venv under target/bench/venv (pip needs PyPI).
    #[arg(long)]
    peers: bool,
    /// A parjob backend to run; repeat for several [default: all]
    #[arg(long = "backend", value_name = "NAME", value_parser = BACKENDS)]
    backends: Vec<String>,
    /// A scenario to run; repeat for several [default: all]
    #[arg(long = "scenario", value_name = "NAME", value_parser = SCENARIOS)]
    scenarios: Vec<String>,
    /// Where report.md, report.json and the plots go [default: target/bench in the workspace]
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

/// The arguments after `cargo build --release --package parjob-bench` when the `mpi` group
/// runs; .ci/mpi.sh and tests/slurm/run.sh build the `cluster` example with exactly these.
const RELEASE_BUILD_WITH_MPI: [&str; 8] = [
    "--package",
    "parjob",
    "--features",
    "parjob-bench/mpi,parjob/mpi",
    "--bin",
    "parjob-bench",
    "--example",
    "cluster",
];

/// Where cargo puts the release `parjob-bench` (CARGO_TARGET_DIR, else `target/`).
pub(crate) fn bench_binary(root: &Path) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map_or_else(|| root.join("target"), |dir| root.join(dir));
    target.join("release").join("parjob-bench")
}

/// The workspace root: xtask's parent folder.
pub(crate) fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

pub(crate) fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Runs `cargo xtask bench`.
pub fn run(args: BenchArgs) -> ExitCode {
    let root = workspace_root();
    let out = match &args.out {
        Some(dir) if dir.is_absolute() => dir.clone(),
        Some(dir) => match std::env::current_dir() {
            Ok(cwd) => cwd.join(dir),
            Err(e) => {
                eprintln!("xtask bench: cannot read the current folder to place --out: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => root.join("target").join("bench"),
    };
    if let Err(e) = std::fs::create_dir_all(&out) {
        eprintln!("xtask bench: cannot create {}: {e}", out.display());
        return ExitCode::FAILURE;
    }

    // The `mpi` group needs parjob-bench built with its `mpi` feature, which needs an MPI
    // library: built so only when `mpirun` is on PATH (and again without it if that fails).
    let mpi_wanted = args.scenarios.is_empty() || args.scenarios.iter().any(|s| s == "mpi");
    let mut mpi_missing = (!mpi_wanted)
        .then(|| "not asked for".to_string())
        .or_else(|| {
            (!on_path("mpirun")).then(|| {
                "mpirun is not on PATH: install Open MPI (docs/CLUSTER.md) to run this group"
                    .to_string()
            })
        });
    // With MPI, the `cluster` example is built in the same cargo call: the features of the
    // shared dependencies then unify one way, and CI (.ci/mpi.sh, which runs this same
    // command) compiles the release dependencies once instead of twice.
    let mut features: &[&str] = if mpi_missing.is_none() {
        &RELEASE_BUILD_WITH_MPI
    } else {
        &[]
    };
    loop {
        eprintln!("xtask bench: building parjob-bench with --release {features:?}");
        let built = cargo()
            .current_dir(&root)
            .args(["build", "--release", "--package", "parjob-bench"])
            .args(features)
            .status();
        match built {
            Ok(s) if s.success() => break,
            Ok(s) if !features.is_empty() => {
                eprintln!("xtask bench: building with --features mpi failed ({s}); without it");
                mpi_missing = Some(format!(
                    "building parjob-bench with --features mpi failed ({s}): libopenmpi-dev \
                     and libclang are needed (docs/CLUSTER.md)"
                ));
                features = &[];
            }
            Ok(s) => {
                eprintln!("xtask bench: building parjob-bench failed ({s})");
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("xtask bench: cannot run cargo: {e}");
                return ExitCode::FAILURE;
            }
        }
    }

    let mut runner_args: Vec<String> = Vec::new();
    if args.quick {
        runner_args.push("--quick".into());
    }
    for b in &args.backends {
        runner_args.extend(["--backend".into(), b.clone()]);
    }
    for s in &args.scenarios {
        runner_args.extend(["--scenario".into(), s.clone()]);
    }
    runner_args.extend(["--out".into(), out.display().to_string()]);
    if args.peers {
        runner_args.push("--peers".into());
        let peers_json = out.join("peers.json");
        run_peers(&root, &args, &peers_json);
        runner_args.extend(["--peers-json".into(), peers_json.display().to_string()]);
    }

    if mpi_wanted {
        let mpi_json = out.join("mpi.json");
        match &mpi_missing {
            Some(why) => write_unavailable(&mpi_json, why),
            None => mpi::run_group(&root, &args, &mpi_json),
        }
        runner_args.extend(["--mpi-json".into(), mpi_json.display().to_string()]);
        if args.peers {
            let peers_json = out.join("mpi_peers.json");
            match &mpi_missing {
                Some(why) => write_unavailable(&peers_json, why),
                None => mpi::run_peer(&root, &args, &peers_json),
            }
            runner_args.extend(["--mpi-peers-json".into(), peers_json.display().to_string()]);
        }
    }

    // The binary just built, run directly: `cargo run` takes one package, and with the other
    // feature set it would build the bench again.
    let status = Command::new(bench_binary(&root))
        .current_dir(&root)
        .args(&runner_args)
        .status();
    match status {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => {
            eprintln!("xtask bench: parjob-bench failed ({s})");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("xtask bench: cannot run cargo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the Python peers into `peers_json`; when they cannot run, writes why instead, so
/// that the peers' rows carry the reason.
fn run_peers(root: &Path, args: &BenchArgs, peers_json: &Path) {
    let outcome = venv_python(root).and_then(|python| {
        eprintln!("xtask bench: running the Python peers (xtask/bench_peers.py)");
        let mut cmd = Command::new(&python);
        cmd.arg(root.join("xtask").join("bench_peers.py"))
            .arg("--out")
            .arg(peers_json);
        if args.quick {
            cmd.arg("--quick");
        }
        for s in &args.scenarios {
            cmd.args(["--scenario", s]);
        }
        let status = cmd
            .status()
            .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!(
                "xtask/bench_peers.py failed ({status}); its errors are above"
            ))
        }
    });
    if let Err(why) = outcome {
        eprintln!("xtask bench: Python peers unavailable: {why}");
        write_unavailable(peers_json, &why);
    }
}

/// Writes a rows file that holds only why there are no rows.
pub(crate) fn write_unavailable(path: &Path, why: &str) {
    let text = json_string(why);
    if let Err(e) = std::fs::write(path, format!("{{\"unavailable\": {text}}}\n")) {
        eprintln!("xtask bench: cannot write {}: {e}", path.display());
    }
}

/// Whether `program` is an executable file in a folder of `PATH`.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// The venv's python with joblib importable, made with `python3 -m venv` and pip if needed.
pub(crate) fn venv_python(root: &Path) -> Result<PathBuf, String> {
    let venv = root.join("target").join("bench").join("venv");
    let python = venv.join("bin").join("python");
    let imports = |module: &str| {
        Command::new(&python)
            .args(["-c", &format!("import {module}")])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !python.exists() {
        eprintln!("xtask bench: creating {} (python3 -m venv)", venv.display());
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .map_err(|e| format!("cannot run python3 to make a venv: {e}"))?;
        if !made.success() {
            return Err(format!(
                "python3 -m venv {} failed ({made})",
                venv.display()
            ));
        }
    }
    // numpy is optional: without it the array scenarios (cpu_halves, big_input) say so.
    for (package, needed) in [("joblib", true), ("numpy", false)] {
        if imports(package) {
            continue;
        }
        eprintln!("xtask bench: pip install {package}");
        let output = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(["--timeout", "15", "--retries", "1", package])
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| format!("cannot run pip: {e}"))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let last = stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            let why = format!(
                "pip install {package} failed (no network?): {}",
                last.trim()
            );
            if needed {
                return Err(why);
            }
            eprintln!("xtask bench: {why}");
        }
    }
    Ok(python)
}

/// `s` as a JSON string literal (xtask keeps to clap alone, so no serde_json).
fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
