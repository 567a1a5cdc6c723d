use parjob::{Backend, Parallel, delayed};
use parjob_tests::run_child_test;

fn zero() -> u8 {
    0
}
fn one(a: u8) -> u8 {
    a
}
fn two(a: u8, b: u16) -> u32 {
    u32::from(a) + u32::from(b)
}
#[allow(clippy::too_many_arguments)] // delayed() supports up to eight parameters: test the most
fn eight(a: u8, b: u8, c: u8, d: u8, e: u8, f: u8, g: u8, h: u8) -> u64 {
    [a, b, c, d, e, f, g, h].into_iter().map(u64::from).sum()
}
fn words(text: String, sep: char) -> Vec<String> {
    text.split(sep).map(str::to_owned).collect()
}

#[test]
fn delayed_spreads_tuples_over_parameters() {
    let p = Parallel::new(2).backend(Backend::Threading);
    assert_eq!(p.run([delayed(zero, ())]).unwrap(), [0]);
    assert_eq!(p.run([delayed(one, 9)]).unwrap(), [9]);
    assert_eq!(p.run([delayed(two, (1, 300))]).unwrap(), [301]);
    assert_eq!(
        p.run([delayed(eight, (1, 2, 3, 4, 5, 6, 7, 8))]).unwrap(),
        [36]
    );
    assert_eq!(
        p.run([delayed(words, ("a,b".to_string(), ','))]).unwrap(),
        [vec!["a".to_string(), "b".to_string()]]
    );
}

#[test]
fn verbose_prints_joblib_lines_on_stderr() {
    let output = run_child_test("api::child_verbose_run", &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "[Parallel(n_jobs=2)]: Using backend ThreadingBackend with 2 concurrent workers."
        ),
        "{stderr}"
    );
    // The last progress line is the closing one; the Insights summary comes after it.
    let progress: Vec<&str> = stderr
        .lines()
        .take_while(|l| !l.contains("Insights:"))
        .filter(|l| l.starts_with("[Parallel"))
        .collect();
    let last = progress.last().copied().unwrap_or_default();
    assert!(
        last.starts_with("[Parallel(n_jobs=2)]: Done 100 out of 100 | elapsed: ")
            && last.ends_with("s finished"),
        "{stderr}"
    );
    assert!(
        stderr.contains("[Parallel(n_jobs=2)]: Insights: "),
        "{stderr}"
    );
}

#[test]
#[ignore = "run by verbose_prints_joblib_lines_on_stderr in a child process"]
fn child_verbose_run() {
    let out = Parallel::new(2)
        .backend(Backend::Threading)
        .verbose(5)
        .run((0..100u8).map(|i| delayed(one, i)))
        .unwrap();
    assert_eq!(out.len(), 100);
}

fn fails_on_one(a: u8) -> u8 {
    assert!(a != 1, "task one fails");
    a
}

#[test]
fn a_run_stopped_at_a_failure_does_not_say_finished() {
    let output = run_child_test("api::child_verbose_failing_run", &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("Using backend"), "{stderr}");
    assert!(!stderr.contains("finished"), "{stderr}");
}

#[test]
#[ignore = "run by a_run_stopped_at_a_failure_does_not_say_finished in a child process"]
fn child_verbose_failing_run() {
    // Every task is sent before the failure is seen (one batch each, the input ends), and
    // every batch comes back: only the stop tells that the run did not finish.
    let result = Parallel::new(2)
        .backend(Backend::Threading)
        .batch_size(parjob::BatchSize::Fixed(1))
        .verbose(5)
        .run((0..3u8).map(|i| delayed(fails_on_one, i)));
    assert!(result.is_err());
}

#[test]
fn progress_bar_is_silent_off_a_terminal() {
    let output = run_child_test("api::child_progress_run", &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("tasks ("), "{stderr}");
}

#[test]
#[ignore = "run by progress_bar_is_silent_off_a_terminal in a child process"]
fn child_progress_run() {
    let out = Parallel::new(2)
        .backend(Backend::Threading)
        .progress(true)
        .run((0..100u8).map(|i| delayed(one, i)))
        .unwrap();
    assert_eq!(out.len(), 100);
}
