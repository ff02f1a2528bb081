//! The fuzz targets' short form: every committed seed and crash input under `fuzz/seeds/`
//! goes through the same checks as `cargo fuzz` runs (`confroute_tests::fuzz_checks`), once
//! each, so a regression of a fixed crash fails the suite without libFuzzer.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use confroute_tests::fuzz_checks::{Target, TARGETS};

fn seeds_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target)
}

/// Runs every file of `target`'s seed directory; returns the failures, by file name.
fn run(target: &Target) -> (usize, Vec<String>) {
    let (name, check) = target;
    let dir = seeds_dir(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut failures = Vec::new();
    for file in &files {
        let data = std::fs::read(file).expect("read seed");
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| check(&data))) {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!("{name}/{}: {why}", file.display()));
        }
    }
    (files.len(), failures)
}

macro_rules! corpus_test {
    ($test:ident, $target:literal) => {
        #[test]
        fn $test() {
            let target = TARGETS
                .iter()
                .find(|(name, _)| *name == $target)
                .expect("a fuzz target of that name");
            let (count, failures) = run(target);
            assert!(count > 0, "no seeds for {}", $target);
            assert!(failures.is_empty(), "{}", failures.join("\n"));
        }
    };
}

corpus_test!(sip_message_seeds, "sip_message");
corpus_test!(conference_name_seeds, "conference_name");
corpus_test!(config_toml_seeds, "config_toml");
corpus_test!(jsonrpc_request_seeds, "jsonrpc_request");
corpus_test!(ari_event_seeds, "ari_event");

/// Each fuzz target binary has a check and a seed directory, and the other way round.
#[test]
fn every_target_has_a_binary_and_seeds() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    for (name, _) in TARGETS {
        assert!(
            fuzz.join("fuzz_targets")
                .join(format!("{name}.rs"))
                .is_file(),
            "fuzz/fuzz_targets/{name}.rs is missing"
        );
        assert!(seeds_dir(name).is_dir(), "fuzz/seeds/{name} is missing");
    }
    let binaries = std::fs::read_dir(fuzz.join("fuzz_targets"))
        .expect("fuzz_targets")
        .count();
    assert_eq!(binaries, TARGETS.len(), "a fuzz target without a check");
}
