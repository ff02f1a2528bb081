//! docs/metrics.md lists every Prometheus series the processes register, each once and in
//! the section of the process that exports it, and nothing they do not register.

use std::collections::BTreeMap;
use std::path::Path;

/// Where each process registers its series, by the doc section that lists them.
const SOURCES: &[(&str, &[&str])] = &[
    ("Controller", &["controller/src/metrics.rs"]),
    ("Conference-node agent", &["conference-node/src/metrics.rs"]),
    (
        "Both processes",
        &[
            "shared/src/store/metrics.rs",
            "shared/src/runtime_metrics.rs",
        ],
    ),
];

fn read(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `"confroute_…"` string literal of a source: the names its series register.
fn registered(source: &str) -> Vec<String> {
    source
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            s.starts_with("confroute_")
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
        .map(str::to_string)
        .collect()
}

/// The series of the doc's tables (rows whose first cell is a name in backticks), by the
/// `## ` section they are in.
fn documented(doc: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut section = String::new();
    for line in doc.lines() {
        if let Some(s) = line.strip_prefix("## ") {
            section = s.trim().to_string();
            continue;
        }
        let Some(cell) = line.strip_prefix("| `") else {
            continue;
        };
        if let Some((name, _)) = cell.split_once('`') {
            if name.starts_with("confroute_") {
                out.entry(name.to_string())
                    .or_default()
                    .push(section.clone());
            }
        }
    }
    out
}

#[test]
fn every_registered_series_is_documented_once_in_its_process_section() {
    let doc = documented(&read("docs/metrics.md"));
    let mut expected: BTreeMap<String, String> = BTreeMap::new();
    for (section, files) in SOURCES {
        for file in *files {
            let names = registered(&read(file));
            assert!(!names.is_empty(), "{file} registers no series");
            for name in names {
                let before = expected.insert(name.clone(), section.to_string());
                assert!(before.is_none(), "{name} is registered twice");
            }
        }
    }
    let mut faults = Vec::new();
    for (name, section) in &expected {
        match doc.get(name).map(Vec::as_slice) {
            None => faults.push(format!("{name} is not documented")),
            Some([s]) if s == section => {}
            Some(found) => faults.push(format!(
                "{name} is documented under {found:?}, expected once under \"{section}\""
            )),
        }
    }
    for name in doc.keys() {
        if !expected.contains_key(name) {
            faults.push(format!("{name} is documented but no process registers it"));
        }
    }
    assert!(faults.is_empty(), "docs/metrics.md: {faults:#?}");
}

#[test]
fn the_doc_reader_sees_rows_sections_and_literals() {
    let doc = "## Controller\n| Series | Type |\n|---|---|\n| `confroute_a_total` | counter |\n\
               ## Both processes\n| `confroute_b` | gauge |\ntext `confroute_c` here\n";
    let d = documented(doc);
    assert_eq!(d.len(), 2, "{d:?}");
    assert_eq!(d["confroute_a_total"], ["Controller"]);
    assert_eq!(d["confroute_b"], ["Both processes"]);
    assert_eq!(
        registered(r#"IntGauge::new("confroute_x", "Help with confroute_y in it.")"#),
        ["confroute_x"]
    );
}
