//! Helpers of the deploy tests (`tests/tests/deploy_*.rs`, which include this file): the
//! project-local tools (Helm's library through PyPI helm-python-sdk, kubernetes-validate, tsc,
//! the Prometheus Operator schemas), rendering the chart, and reading what it rendered.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use confroute_tests::harness::TempDir;
use serde_json::Value;

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `tests/deploy/`.
pub fn deploy_dir() -> PathBuf {
    repo().join("tests/deploy")
}

/// The chart.
pub fn chart_dir() -> PathBuf {
    repo().join("helm/confroute")
}

/// Paths of the installed tools.
pub struct Tools {
    /// Python of the venv (helm-python-sdk, PyYAML).
    pub python: PathBuf,
    /// kubernetes-validate.
    pub kubernetes_validate: PathBuf,
    /// TypeScript's compiler.
    pub tsc: PathBuf,
}

/// Installs the Python and npm tools once per test process (tests/deploy/install-tools is
/// quick when they are there, and serialises concurrent installs); panics with the command
/// to run when that fails, so a missing tool fails the test rather than skipping it.
pub fn tools() -> &'static Tools {
    static TOOLS: OnceLock<Tools> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let script = deploy_dir().join("install-tools");
        let out = Command::new(&script)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "installing the deploy test tools failed; run `{}` (needs python3 with venv or \
             virtualenv, and npm: `sudo apt-get install -y python3 python3-virtualenv npm`):\n{}{}",
            script.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let d = deploy_dir();
        let tools = Tools {
            python: d.join(".venv/bin/python"),
            kubernetes_validate: d.join(".venv/bin/kubernetes-validate"),
            tsc: d.join("node_modules/.bin/tsc"),
        };
        for p in [&tools.python, &tools.kubernetes_validate, &tools.tsc] {
            assert!(
                p.is_file(),
                "{} is missing after {}",
                p.display(),
                script.display()
            );
        }
        tools
    })
}

/// Runs `cmd`, returning its output (stdout and stderr are both kept).
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Stdout and stderr of an output, for failure messages.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `tests/deploy/chart.py` with `args`.
pub fn chart_py(args: &[&str]) -> Output {
    let t = tools();
    run(Command::new(&t.python)
        .arg(deploy_dir().join("chart.py"))
        .args(args))
}

/// Writes `values` (JSON) to a file in `dir` and returns its path.
pub fn values_file(dir: &Path, name: &str, values: &Value) -> PathBuf {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(values).expect("json"))
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path
}

/// One rendering of the chart.
pub struct Rendered {
    /// Every manifest, as JSON, in rendering order.
    pub docs: Vec<Value>,
    /// The folder holding each manifest as `.yaml` and `.json`, and NOTES.txt.
    pub dir: TempDir,
}

impl Rendered {
    /// The manifests of `kind`.
    pub fn all(&self, kind: &str) -> Vec<&Value> {
        self.docs.iter().filter(|d| d["kind"] == kind).collect()
    }

    /// The one manifest of `kind` whose name ends with `suffix`.
    pub fn one(&self, kind: &str, suffix: &str) -> &Value {
        let found: Vec<&Value> = self
            .all(kind)
            .into_iter()
            .filter(|d| {
                d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with(suffix))
            })
            .collect();
        assert_eq!(
            found.len(),
            1,
            "expected one {kind} named *{suffix}, rendered: {:?}",
            self.names()
        );
        found[0]
    }

    /// `Kind/name` of every manifest.
    pub fn names(&self) -> Vec<String> {
        self.docs
            .iter()
            .map(|d| format!("{}/{}", d["kind"], d["metadata"]["name"]))
            .collect()
    }

    /// Files of the manifests, by extension (`yaml` or `json`).
    pub fn files(&self, ext: &str) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .expect("render dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == ext))
            .collect();
        files.sort();
        files
    }

    /// NOTES.txt as rendered.
    pub fn notes(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("NOTES.txt")).unwrap_or_default()
    }

    /// A container of a Deployment's or StatefulSet's pod template.
    pub fn container<'a>(&self, workload: &'a Value, name: &str) -> &'a Value {
        workload["spec"]["template"]["spec"]["containers"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == name))
            .unwrap_or_else(|| panic!("no container {name} in {}", workload["metadata"]["name"]))
    }

    /// A value of a Secret rendered by the chart, decoded.
    pub fn secret_value(&self, name: &str, key: &str) -> Option<String> {
        let s = self
            .all("Secret")
            .into_iter()
            .find(|s| s["metadata"]["name"] == name)?;
        let b64 = s["data"][key].as_str()?;
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("base64");
        Some(String::from_utf8(bytes).expect("utf-8"))
    }
}

/// Renders the chart with the values file `values` (YAML or JSON); panics with Helm's message
/// when the values are refused or a template fails.
pub fn render(values: &Path) -> Rendered {
    render_chart(&chart_dir(), values)
}

/// [`render`] for the chart in `chart` (a modified copy, say).
pub fn render_chart(chart: &Path, values: &Path) -> Rendered {
    let dir = TempDir::new("chart").expect("temp dir");
    let out = chart_py(&[
        "render",
        chart.to_str().expect("utf-8 path"),
        values.to_str().expect("utf-8 path"),
        dir.path().to_str().expect("utf-8 path"),
    ]);
    assert!(
        out.status.success(),
        "rendering with {} failed:\n{}",
        values.display(),
        text(&out)
    );
    let summary: Vec<Value> = serde_json::from_slice(&out.stdout).expect("render summary");
    let docs = summary
        .iter()
        .map(|s| {
            let file = dir
                .path()
                .join(format!("{}.json", s["file"].as_str().expect("file")));
            serde_json::from_slice(&std::fs::read(&file).expect("manifest")).expect("json")
        })
        .collect();
    Rendered { docs, dir }
}

/// The values scenarios of `tests/deploy/values/`, by name (file stem).
pub fn scenarios() -> Vec<(String, PathBuf)> {
    let mut v: Vec<(String, PathBuf)> = std::fs::read_dir(deploy_dir().join("values"))
        .expect("tests/deploy/values")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| {
            (
                p.file_stem().expect("stem").to_string_lossy().into_owned(),
                p,
            )
        })
        .collect();
    v.sort();
    v
}

/// A values scenario by name.
pub fn scenario(name: &str) -> PathBuf {
    let p = deploy_dir().join("values").join(format!("{name}.yaml"));
    assert!(p.is_file(), "no values scenario {}", p.display());
    p
}

/// Parses a YAML file with the venv's PyYAML (the tests crate has no YAML parser).
pub fn yaml_to_json(path: &Path) -> Value {
    let out = run(Command::new(&tools().python).args([
        "-c",
        "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1], encoding='utf-8')), sys.stdout)",
        path.to_str().expect("utf-8 path"),
    ]));
    assert!(
        out.status.success(),
        "cannot read {}: {}",
        path.display(),
        text(&out)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// The dashboard as JSON.
pub fn dashboard() -> Value {
    let path = chart_dir().join("dashboards/confroute.json");
    serde_json::from_slice(&std::fs::read(&path).expect("dashboard")).expect("dashboard JSON")
}

/// Every PromQL expression of the dashboard's panels, as (panel title, expression).
pub fn dashboard_queries(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        for t in p["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            if let Some(e) = t["expr"].as_str() {
                out.push((p["title"].as_str().unwrap_or("").to_string(), e.to_string()));
            }
        }
    }
    out
}

/// Every alert of the rules file, as (alert name, expression).
pub fn alert_rules() -> Vec<(String, String)> {
    let rules = yaml_to_json(&chart_dir().join("rules/confroute.rules.yaml"));
    rules["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| {
            Some((
                r["alert"].as_str()?.to_string(),
                r["expr"].as_str()?.to_string(),
            ))
        })
        .collect()
}

/// The metric names an expression reads: identifiers starting with `confroute_`.
pub fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("confroute_") {
        let start = i + pos;
        let boundary = start == 0 || {
            let c = bytes[start - 1];
            !(c.is_ascii_alphanumeric() || c == b'_' || c == b'"')
        };
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary {
            names.push(expr[start..end].to_string());
        }
        i = end;
    }
    names.sort();
    names.dedup();
    names
}
