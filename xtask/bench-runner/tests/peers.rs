//! `--peers` runs procspawn's `Pool` beside parjob's process backend in one executable: both
//! re-run it for their workers, so each `init()` must let the other's workers through.

use std::process::Command;

#[test]
fn parjob_and_procspawn_workers_both_run_in_the_bench_executable() {
    let out = std::env::temp_dir().join(format!("parjob-bench-peers-{}", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_parjob-bench"))
        .args(["--quick", "--peers", "--backend", "process"])
        .args(["--scenario", "crash", "--out"])
        .arg(&out)
        .status()
        .expect("the bench executable runs");
    assert!(status.success(), "parjob-bench ended with {status}");
    let report = std::fs::read_to_string(out.join("report.json")).expect("report.json written");
    let _ = std::fs::remove_dir_all(&out);
    let json: serde_json::Value = serde_json::from_str(&report).expect("report.json is JSON");
    let rows = json["rows"].as_array().expect("rows");
    for implementation in ["parjob process", "procspawn Pool"] {
        for variant in ["abort to error", "next call"] {
            let found = rows
                .iter()
                .find(|r| r["implementation"] == implementation && r["variant"] == variant)
                .unwrap_or_else(|| panic!("no {implementation} {variant} row in {report}"));
            assert_eq!(
                found["status"]["kind"], "measured",
                "{implementation} {variant}: {found}"
            );
            assert_eq!(found["samples"].as_array().map(Vec::len), Some(10));
        }
    }
}
