//! `parjob-bench`: the scenarios behind `cargo xtask bench`, built with `--release`.
//!
//! Times parjob's backends beside raw rayon, `std::thread::scope` and a plain loop doing the
//! same calls (with `--peers`, also procspawn's process pool; with `--peers-json`, the Python
//! peers' rows), prints one table and writes
//! `report.md`, `report.json` and SVG plots into `--out`. Run it through `cargo xtask bench`,
//! which builds it optimised and sets up the Python peers; `--help` lists the flags.

mod machine;
mod measure;
mod names;
mod peers;
mod plot;
mod report;
mod rules;
mod scenarios;
mod work;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use parjob::Backend;

use crate::machine::Machine;
use crate::measure::Plan;
use crate::report::{Measurement, Report, SCENARIOS, Settings};
use crate::scenarios::Context;

const USAGE: &str = "\
usage: parjob-bench [--quick] [--backend NAME]... [--scenario NAME]... [--out DIR] [--peers] [--peers-json FILE]
                    [--mpi-json FILE] [--mpi-peers-json FILE]
       mpirun --oversubscribe -n 3 parjob-bench --mpi-group --out FILE [--quick]

  --quick             smaller sizes and 3 counted repeats: a smoke test (under 2 minutes)
  --backend NAME      a parjob backend to run (sequential, threading, process); default: all
  --scenario NAME     a scenario to run; default: all of
                      small tiny cpu_halves sleep_io startup big_input big_result crash timeout first_result memory mpi
  --out DIR           where report.md, report.json and the plots go (default: target/bench)
  --peers             also time the Rust peer, procspawn's Pool, beside the process backend
                      (tiny small cpu_halves startup big_input crash timeout)
  --peers-json FILE   rows of the Python peers, as written by xtask/bench_peers.py
  --mpi-json FILE     rows of the `mpi` group, as written by --mpi-group under mpirun
  --mpi-peers-json FILE  mpi4py.futures' rows, as written by bench_peers.py --mpi
  --mpi-group         under mpirun (built with --features mpi): time the `mpi` group on
                      rank 0 and write its rows to --out FILE";

/// The flags, parsed.
struct Args {
    quick: bool,
    backends: Vec<Backend>,
    scenarios: Vec<String>,
    out: PathBuf,
    /// `--peers`: time procspawn's `Pool` too.
    peers: bool,
    peers_json: Option<PathBuf>,
    /// `--mpi-group`: run the `mpi` group (under mpirun) and write its rows to `out`.
    mpi_group: bool,
    mpi_json: Option<PathBuf>,
    mpi_peers_json: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    // Flags are parsed by hand: `cargo xtask bench` validates them with clap first, and
    // keeping clap out of this release build keeps `--quick` under its time budget.
    let mut args = Args {
        quick: false,
        backends: Vec::new(),
        scenarios: Vec::new(),
        out: PathBuf::from("target/bench"),
        peers: false,
        peers_json: None,
        mpi_group: false,
        mpi_json: None,
        mpi_peers_json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .ok_or_else(|| format!("{name} needs a value\n\n{USAGE}"))
        };
        match flag.as_str() {
            "--quick" => args.quick = true,
            "--backend" => {
                let name = value("--backend")?;
                let backend: Backend = name.parse().map_err(|e| format!("--backend: {e}"))?;
                if !args.backends.contains(&backend) {
                    args.backends.push(backend);
                }
            }
            "--scenario" => {
                let name = value("--scenario")?;
                if !SCENARIOS.contains(&name.as_str()) {
                    return Err(format!(
                        "--scenario: unknown scenario {name:?}; the scenarios are {}",
                        SCENARIOS.join(", ")
                    ));
                }
                if !args.scenarios.contains(&name) {
                    args.scenarios.push(name);
                }
            }
            "--out" => args.out = PathBuf::from(value("--out")?),
            "--peers" => args.peers = true,
            "--peers-json" => args.peers_json = Some(PathBuf::from(value("--peers-json")?)),
            "--mpi-json" => args.mpi_json = Some(PathBuf::from(value("--mpi-json")?)),
            "--mpi-peers-json" => {
                args.mpi_peers_json = Some(PathBuf::from(value("--mpi-peers-json")?));
            }
            "--mpi-group" => args.mpi_group = true,
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
        }
    }
    if args.backends.is_empty() {
        // The MPI backend runs only under mpirun: its numbers come from the `mpi` group.
        args.backends = Backend::ALL
            .into_iter()
            .filter(|b| *b != Backend::Mpi)
            .collect();
    }
    if args.scenarios.is_empty() {
        args.scenarios = SCENARIOS.iter().map(|s| s.to_string()).collect();
    }
    Ok(args)
}

fn main() -> ExitCode {
    // Both pools re-run this executable for their workers, each marking its own in the
    // environment (parjob: `PARJOB_PROCESS_DRIVER` naming the parent; procspawn:
    // `__PROCSPAWN_CONTENT_PROCESS_ID`): in the other's worker each `init` returns at once.
    parjob::init();
    procspawn::init();
    if std::env::args().nth(1).as_deref() == Some(scenarios::NOOP_ARG) {
        return ExitCode::SUCCESS;
    }
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("parjob-bench: {message}");
            return ExitCode::from(2);
        }
    };
    let outcome = if args.mpi_group {
        scenarios::mpi::run_group(&context(&args), &args.out)
    } else {
        bench(&args)
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("parjob-bench: {message}");
            ExitCode::FAILURE
        }
    }
}

fn context(args: &Args) -> Context {
    Context {
        quick: args.quick,
        backends: args.backends.clone(),
        plan: Plan {
            warmups: 1,
            repeats: if args.quick { 3 } else { 5 },
            time_limit: measure::HUNG_AFTER,
        },
        short_plan: Plan {
            warmups: 1,
            repeats: if args.quick { 10 } else { 20 },
            time_limit: measure::HUNG_AFTER,
        },
        workers: parjob::cpu_count(),
        peers: args.peers,
    }
}

/// The `mpi` group's rows from the files `cargo xtask bench` wrote, or rows saying why not.
fn mpi_rows(args: &Args) -> Vec<Measurement> {
    use crate::measure::Group;
    use crate::scenarios::mpi::{SCENARIO, unavailable};
    let scenario = [SCENARIO.to_string()];
    let mut rows = Vec::new();
    let sources = [
        (&args.mpi_json, "parjob mpi", Group::Parjob),
        (&args.mpi_peers_json, "mpi4py.futures", Group::Peer),
    ];
    for (file, implementation, group) in sources {
        let loaded = match file {
            Some(path) => peers::load(path, &scenario).map(|(rows, _)| rows),
            None if group == Group::Peer => Err("not asked for (run with --peers)".to_string()),
            None => Err(
                "this group runs under mpirun: `cargo xtask bench` starts it when `mpirun` is \
                 on PATH"
                    .to_string(),
            ),
        };
        match loaded {
            Ok(found) => rows.extend(found),
            Err(why) => rows.push(unavailable(implementation, group, &why)),
        }
    }
    rows
}

fn bench(args: &Args) -> Result<(), String> {
    let started = Instant::now();
    let ctx = context(args);
    let mut machine = Machine::read();
    let (mut peer_rows, peers_unavailable) = match &args.peers_json {
        None if args.peers => (
            Vec::new(),
            Some("not run (no --peers-json: `cargo xtask bench --peers` runs them)".to_string()),
        ),
        None => (
            Vec::new(),
            Some("not asked for (run with --peers)".to_string()),
        ),
        Some(path) => match peers::load(path, &args.scenarios) {
            Ok((rows, versions)) => {
                eprintln!("parjob-bench: {} Python peer rows ({versions})", rows.len());
                (rows, None)
            }
            // One row per scenario, so that the table itself says why the peers are missing.
            // (The `mpi` group's peer, mpi4py.futures, has rows of its own: see `mpi_rows`.)
            Err(why) => {
                let scenarios: Vec<String> = args
                    .scenarios
                    .iter()
                    .filter(|s| *s != scenarios::mpi::SCENARIO)
                    .cloned()
                    .collect();
                (peers::unavailable_rows(&scenarios, &why), Some(why))
            }
        },
    };
    // `crash` runs last: a backend that hangs on a dead worker then costs nothing else.
    let mut order: Vec<&String> = args.scenarios.iter().filter(|s| *s != "crash").collect();
    order.extend(args.scenarios.iter().filter(|s| *s == "crash"));
    let mut measured: Vec<Measurement> = Vec::new();
    let mut settings = Settings {
        quick: args.quick,
        warmups: ctx.plan.warmups,
        repeats: ctx.plan.repeats,
        startup_repeats: ctx.short_plan.repeats,
        backends: args.backends.iter().map(|b| b.to_string()).collect(),
        scenarios: args.scenarios.clone(),
        sizes: args
            .scenarios
            .iter()
            .map(|s| (s.clone(), scenarios::size(s, &ctx)))
            .collect(),
        elapsed: 0.0,
    };
    for scenario in order {
        let t = Instant::now();
        eprintln!("parjob-bench: {scenario} ...");
        if scenario == scenarios::mpi::SCENARIO {
            measured.extend(mpi_rows(args));
        } else {
            measured.extend(scenarios::run(scenario, &ctx));
        }
        eprintln!(
            "parjob-bench: {scenario} done in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        // Written after every scenario, so a run that is stopped leaves what it found.
        machine.load_end = machine::load_average();
        settings.elapsed = started.elapsed().as_secs_f64();
        let all: Vec<Measurement> = measured.iter().chain(&peer_rows).cloned().collect();
        let partial = Report {
            machine: machine.clone(),
            settings: settings.clone(),
            rows: report::rows(&all),
            peers_unavailable: peers_unavailable.clone(),
        };
        partial.write(&args.out)?;
    }
    measured.append(&mut peer_rows);
    machine.load_end = machine::load_average();
    settings.elapsed = started.elapsed().as_secs_f64();
    let report = Report {
        machine,
        settings,
        rows: report::rows(&measured),
        peers_unavailable,
    };
    report.write(&args.out)?;
    let plots = plot::write_all(&report.rows, &args.out)?;
    println!("{}", report::text_table(&report.rows));
    for line in report::reasons(&report.rows) {
        println!("  {line}");
    }
    // When the peers were asked for and could not run, their rows above already say why.
    if let (Some(why), None) = (&report.peers_unavailable, &args.peers_json) {
        println!("  Python peers: {why}");
    }
    println!(
        "\nmachine: {} x {} ({}), load {} -> {}; {} in {:.1} s{}",
        report.machine.nproc,
        report.machine.cpu_model,
        report.machine.kernel,
        report.machine.load_start,
        report.machine.load_end,
        if args.quick { "quick run" } else { "full run" },
        report.settings.elapsed,
        if args.quick {
            " (3 repeats, smaller sizes: not figures to quote)"
        } else {
            ""
        }
    );
    println!(
        "report: {}, {}",
        args.out.join("report.md").display(),
        args.out.join("report.json").display()
    );
    for p in plots {
        println!("plot: {}", p.display());
    }
    Ok(())
}
