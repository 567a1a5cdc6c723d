use parjob::{Backend, Error, Parallel, cpu_count, delayed, effective_n_jobs, worker_info};
use parjob_tests::run_child_test;

fn identity(x: u32) -> u32 {
    x
}

#[test]
fn minus_one_means_every_cpu() {
    assert_eq!(effective_n_jobs(-1), Ok(cpu_count()));
    assert_eq!(Parallel::new(-1).effective_n_jobs(), Ok(cpu_count()));
}

#[test]
fn minus_two_leaves_one_cpu_free_but_keeps_one_worker() {
    assert_eq!(effective_n_jobs(-2), Ok((cpu_count() - 1).max(1)));
}

#[test]
fn zero_jobs_is_reported_by_run_not_new() {
    for backend in [Backend::Sequential, Backend::Threading, Backend::Process] {
        let parallel = Parallel::new(0).backend(backend);
        let err = parallel
            .run((0..3u32).map(|i| delayed(identity, i)))
            .unwrap_err();
        assert!(
            matches!(err, Error::InvalidNJobs { value: 0, .. }),
            "{backend}: {err:?}"
        );
        assert!(err.to_string().contains("-1 for all CPUs"), "{err}");
    }
}

#[test]
fn zero_jobs_is_the_only_item_of_run_iter() {
    let items: Vec<_> = Parallel::new(0)
        .backend(Backend::Threading)
        .run_iter((0..3u32).map(|i| delayed(identity, i)))
        .collect();
    assert!(
        matches!(items.as_slice(), [Err(Error::InvalidNJobs { .. })]),
        "{items:?}"
    );
}

#[test]
fn backend_names_and_aliases_parse() {
    for (name, backend) in [
        ("sequential", Backend::Sequential),
        ("threading", Backend::Threading),
        ("threads", Backend::Threading),
        ("process", Backend::Process),
        ("processes", Backend::Process),
        ("loky", Backend::Process),
        ("multiprocessing", Backend::Process),
    ] {
        assert_eq!(name.parse::<Backend>(), Ok(backend), "{name}");
    }
    assert_eq!(Backend::Threading.to_string(), "threading");
}

#[test]
fn unknown_backend_name_lists_the_valid_ones() {
    let err = "gpu".parse::<Backend>().unwrap_err();
    let text = err.to_string();
    assert!(text.contains("\"gpu\""), "{text}");
    for valid in ["sequential", "threading", "process"] {
        assert!(text.contains(valid), "{text}");
    }
}

#[test]
fn process_backend_is_built_in_and_named_by_its_aliases() {
    let backend: Backend = "loky".parse().unwrap();
    let out = Parallel::new(2)
        .backend(backend)
        .run((0..3u32).map(|i| delayed(identity, i)))
        .unwrap();
    assert_eq!(out, [0, 1, 2]);
}

#[test]
fn env_backend_is_the_default() {
    run_child_test(
        "config::child_env_backend_sequential",
        &[("PARJOB_BACKEND", "sequential")],
    );
}

#[test]
#[ignore = "run by env_backend_is_the_default in a child process"]
fn child_env_backend_sequential() {
    let parallel = Parallel::new(2);
    assert_eq!(parallel.effective_backend(), Ok(Backend::Sequential));
    let backends = parallel
        .run((0..4u32).map(|i| delayed(backend_of_worker, i)))
        .unwrap();
    assert!(
        backends.iter().all(|b| b == "Some(Sequential)"),
        "{backends:?}"
    );
    // An explicit call wins over the environment.
    let explicit = Parallel::new(2).backend(Backend::Threading);
    assert_eq!(explicit.effective_backend(), Ok(Backend::Threading));
}

fn backend_of_worker(_: u32) -> String {
    format!("{:?}", worker_info().backend)
}

#[test]
fn env_unknown_backend_names_the_variable() {
    run_child_test(
        "config::child_env_backend_unknown",
        &[("PARJOB_BACKEND", "gpu")],
    );
}

#[test]
#[ignore = "run by env_unknown_backend_names_the_variable in a child process"]
fn child_env_backend_unknown() {
    let err = Parallel::new(2)
        .run((0..4u32).map(|i| delayed(identity, i)))
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("gpu") && text.contains("PARJOB_BACKEND"),
        "{text}"
    );
}

#[test]
fn env_n_jobs_sets_the_default_but_not_an_explicit_value() {
    run_child_test("config::child_env_n_jobs", &[("PARJOB_N_JOBS", "3")]);
}

#[test]
#[ignore = "run by env_n_jobs_sets_the_default_but_not_an_explicit_value in a child process"]
fn child_env_n_jobs() {
    assert_eq!(Parallel::default().effective_n_jobs(), Ok(3));
    assert_eq!(Parallel::new(5).effective_n_jobs(), Ok(5));
}

#[test]
fn env_n_jobs_zero_is_an_error_naming_the_variable() {
    run_child_test("config::child_env_n_jobs_zero", &[("PARJOB_N_JOBS", "0")]);
}

#[test]
#[ignore = "run by env_n_jobs_zero_is_an_error_naming_the_variable in a child process"]
fn child_env_n_jobs_zero() {
    let err = Parallel::default()
        .run((0..4u32).map(|i| delayed(identity, i)))
        .unwrap_err();
    assert!(err.to_string().contains("PARJOB_N_JOBS"), "{err}");
    let err = Parallel::new(0).effective_n_jobs().unwrap_err();
    assert!(!err.to_string().contains("PARJOB_N_JOBS"), "{err}");
}

#[test]
fn n_jobs_takes_a_usize_or_u32_count() {
    let half: usize = cpu_count().div_ceil(2);
    assert_eq!(Parallel::new(half).effective_n_jobs(), Ok(half));
    assert_eq!(Parallel::new(3u32).effective_n_jobs(), Ok(3));
    assert_eq!(parjob::Executor::new(2usize).effective_n_jobs(), Ok(2));
    let out = Parallel::new(4usize)
        .backend(Backend::Threading)
        .run((0..8u32).map(|i| delayed(identity, i)))
        .unwrap();
    assert_eq!(out, (0..8).collect::<Vec<_>>());
}

#[test]
fn a_usize_count_beyond_any_backend_is_an_error_not_a_panic() {
    let err = Parallel::new(usize::MAX)
        .backend(Backend::Threading)
        .run((0..3u32).map(|i| delayed(identity, i)))
        .unwrap_err();
    assert!(matches!(err, Error::TooManyWorkers { .. }), "{err:?}");
    let zero = Parallel::new(0usize).effective_n_jobs().unwrap_err();
    assert!(
        matches!(zero, Error::InvalidNJobs { value: 0, .. }),
        "{zero:?}"
    );
}

/// The examples read `--backend`, else `PARJOB_BACKEND`: a bad name in the variable is reported
/// as coming from the variable, not from the `--backend` flag the user never typed. The example
/// binaries are built by `cargo test --workspace` (CI's command), not by `cargo test -p
/// parjob-tests`; without them this says so and checks nothing, except under CI.
#[test]
fn examples_report_a_bad_parjob_backend_as_the_variable() {
    let test_binary = std::env::current_exe().expect("the test binary's path");
    let Some(examples) = test_binary
        .parent()
        .and_then(std::path::Path::parent)
        .map(|profile| profile.join("examples"))
    else {
        panic!("no profile folder above {}", test_binary.display());
    };
    for name in ["sleepy_tasks", "flaky", "resume"] {
        let example = examples.join(name);
        if !example.exists() {
            assert!(
                std::env::var_os("CI").is_none(),
                "{} was not built (cargo test --workspace builds it)",
                example.display()
            );
            eprintln!(
                "{} not built: run cargo test --workspace",
                example.display()
            );
            continue;
        }
        let out = std::process::Command::new(&example)
            .env("PARJOB_BACKEND", "gpu")
            .output()
            .expect("the example starts");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(
            stderr.contains("\"gpu\" (from PARJOB_BACKEND)") && !stderr.contains("--backend"),
            "{name}: {stderr}"
        );
        // A bad `--backend` is still reported as the flag.
        let out = std::process::Command::new(&example)
            .args(["--backend", "gpu"])
            .env("PARJOB_BACKEND", "threading")
            .output()
            .expect("the example starts");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("'gpu' for '--backend"), "{name}: {stderr}");
    }
}
