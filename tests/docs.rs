//! The API docs a user copies from: every example on a page of the `parjob` crate is written
//! with `parjob::` paths.
//!
//! Items that `parjob` re-exports from its backend crates are documented where they are
//! defined, and their examples run as doc tests of that crate (which has `parjob` as a
//! dev-dependency for this): they compile against `parjob`'s public API only if they never
//! name the defining crate.

use std::path::{Path, PathBuf};

/// The crates whose items `parjob` re-exports, and so whose item docs appear on its pages.
const DEFINING_CRATES: [&str; 3] = ["parjob-core", "parjob-threading", "parjob-memory"];

fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "rs"))
        .collect();
    files.sort();
    files
}

/// Each line of an example in an item's doc comment (`///`, not the crate's own `//!` page)
/// that names a crate other than `parjob`, as `file:line: text`.
fn foreign_paths(file: &Path, text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut in_example = false;
    for (number, line) in text.lines().enumerate() {
        let Some(doc) = line.trim_start().strip_prefix("///") else {
            in_example = false;
            continue;
        };
        let doc = doc.trim_start();
        if doc.starts_with("```") {
            in_example = !in_example;
            continue;
        }
        let names_one = DEFINING_CRATES
            .iter()
            .any(|krate| doc.contains(&krate.replace('-', "_")));
        if in_example && names_one {
            found.push(format!("{}:{}: {doc}", file.display(), number + 1));
        }
    }
    found
}

#[test]
fn examples_of_re_exported_items_use_parjob_paths() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut found = Vec::new();
    for krate in DEFINING_CRATES {
        for file in sources(&root.join("crates").join(krate).join("src")) {
            let text = std::fs::read_to_string(&file).unwrap();
            found.extend(foreign_paths(&file, &text));
        }
    }
    assert!(
        found.is_empty(),
        "examples a user copies from parjob's docs name another crate (write `parjob::`):\n{}",
        found.join("\n")
    );
}
