//! `cargo xtask trace-shot`: the picture of a run in docs/. Runs the `flaky` example with
//! `PARJOB_TRACE` set, puts the trace it wrote into `timeline.html` (parjob's own rendering
//! of the trace-event JSON: a row per worker, a bar per batch, a marker per crash,
//! replacement and retry) and screenshots that page with headless Chromium.
//!
//! Chromium's own viewer is not used: headless Chromium 148 does not open `chrome://tracing`
//! from its command line (it shows the new-tab page instead), the viewer loads a file only
//! through its file dialog, and Perfetto is a web page this machine cannot reach. The PNG is
//! therefore parjob's rendering of the very JSON those viewers open.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

/// Flags of `cargo xtask trace-shot`.
#[derive(clap::Args)]
pub struct TraceShotArgs {
    /// Where the PNG goes.
    #[arg(long, default_value = "docs/flaky-trace.png")]
    out: PathBuf,
    /// The Chromium (or Chrome) to screenshot with.
    #[arg(long, default_value = "/usr/bin/chromium")]
    chromium: PathBuf,
    /// Build the example without --release (faster to build; the run takes longer).
    #[arg(long)]
    debug: bool,
    /// Render this trace instead of running the example.
    #[arg(long)]
    trace: Option<PathBuf>,
}

const TEMPLATE: &str = include_str!("timeline.html");

pub fn run(args: TraceShotArgs) -> ExitCode {
    match shoot(&args) {
        Ok(()) => {
            eprintln!("xtask trace-shot: wrote {}", args.out.display());
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("xtask trace-shot: {why}");
            ExitCode::FAILURE
        }
    }
}

fn shoot(args: &TraceShotArgs) -> Result<(), String> {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| "target".into(), PathBuf::from);
    let work = target.join("trace-shot");
    std::fs::create_dir_all(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;
    let work = work
        .canonicalize()
        .map_err(|e| format!("cannot resolve {}: {e}", work.display()))?;
    let trace = match &args.trace {
        Some(trace) => trace.clone(),
        None => {
            let trace = work.join("flaky.json");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut command = Command::new(cargo);
            command.args(["run", "--package", "parjob", "--example", "flaky"]);
            if !args.debug {
                command.arg("--release");
            }
            eprintln!("xtask trace-shot: running the flaky example");
            let status = command
                .env("PARJOB_TRACE", &trace)
                .status()
                .map_err(|e| format!("cannot run cargo: {e}"))?;
            if !status.success() {
                return Err(format!("the flaky example failed ({status})"));
            }
            trace
        }
    };
    let json = std::fs::read_to_string(&trace)
        .map_err(|e| format!("cannot read the trace {}: {e}", trace.display()))?;
    // The page embeds the JSON as a script literal: `</` must not end the script early.
    let page = TEMPLATE.replace("TRACE_JSON", &json.replace("</", "<\\/"));
    // The header, then a row of 46 pixels per worker (see timeline.html).
    let rows = json.matches("\"thread_name\"").count().max(1);
    let height = 140 + 46 * rows;
    let html = work.join("timeline.html");
    std::fs::write(&html, page).map_err(|e| format!("cannot write {}: {e}", html.display()))?;
    let profile = work.join("chromium-profile");
    let _ = std::fs::remove_dir_all(&profile);
    let png = work.join("shot.png");
    let _ = std::fs::remove_file(&png);
    let status = Command::new(&args.chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--window-size=1400,{height}"))
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", html.display()))
        .status()
        .map_err(|e| format!("cannot run {}: {e}", args.chromium.display()))?;
    let _ = std::fs::remove_dir_all(&profile);
    if !status.success() || !png.exists() {
        return Err(format!("chromium made no screenshot ({status})"));
    }
    std::fs::copy(&png, &args.out)
        .map_err(|e| format!("cannot copy the screenshot to {}: {e}", args.out.display()))?;
    Ok(())
}
