//! The Grafana dashboard (helm/confroute/dashboards/confroute.json) type-checks against npm
//! `@grafana/schema` (`... satisfies Dashboard` under `tsc --noEmit`), and has the variables
//! and panels operators rely on. Its queries are run against real metrics in deploy_metrics.

#[path = "../deploy/common.rs"]
mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

#[test]
fn dashboard_satisfies_grafanas_dashboard_type() {
    let json =
        std::fs::read_to_string(chart_dir().join("dashboards/confroute.json")).expect("dashboard");
    let source = format!(
        "import type {{ Dashboard }} from \"@grafana/schema\";\n\
         export const dashboard = {} satisfies Dashboard;\n",
        json.trim_end()
    );
    let dir = deploy_dir().join(format!(".gen-dashboard-{:016x}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).expect("gen dir");
    std::fs::write(dir.join("dashboard.ts"), source).expect("write");
    std::fs::write(
        dir.join("tsconfig.json"),
        r#"{ "extends": "../tsconfig.json", "include": ["*.ts"] }"#,
    )
    .expect("write");
    let out = run(Command::new(&tools().tsc)
        .arg("-p")
        .arg(dir.join("tsconfig.json")));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "tsc --noEmit:\n{}", text(&out));
}

#[test]
fn dashboard_has_its_variables_and_panels() {
    let d = dashboard();
    let vars: Vec<&Value> = d["templating"]["list"]
        .as_array()
        .expect("variables")
        .iter()
        .collect();
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no variable {name}"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    // One install at a time: controller panels sum over every controller they see.
    assert_eq!(var("namespace")["type"], "query");
    assert_eq!(var("namespace")["includeAll"], false);
    assert_eq!(var("namespace")["multi"], false);
    for v in ["zone", "node"] {
        assert_eq!(var(v)["type"], "query");
        assert_eq!(var(v)["includeAll"], true);
    }
    let titles: Vec<&str> = d["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter_map(|p| p["title"].as_str())
        .collect();
    for t in [
        "Route rate by outcome",
        "SIP responses by code",
        "503 rate",
        "Route latency p50 / p99",
        "Conferences per node",
        "Participants per node",
        "Node states",
        "Join latency p50 / p99",
        "ARI errors and reconnects",
        "Redis latency p50 / p99",
        "Redis errors",
        "Webhook failures",
        "SIP dropped by reason",
        "Call-control errors by code",
        "Call-control connections and events lost",
    ] {
        assert!(titles.contains(&t), "panel {t:?} missing: {titles:?}");
    }
    // The controllers' drops (edges turned away at sip.tcp_max_connections, untrusted TCP
    // peers) and call-control errors are shown by their bounded label.
    let exprs: Vec<String> = dashboard_queries(&d).into_iter().map(|(_, e)| e).collect();
    for (metric, by) in [
        ("confroute_sip_dropped_total", "by (reason)"),
        ("confroute_rpc_errors_total", "by (code)"),
        ("confroute_rpc_events_lost_total", "by (reason)"),
    ] {
        assert!(
            exprs.iter().any(|e| e.contains(metric) && e.contains(by)),
            "no panel reads {metric} {by}: {exprs:?}"
        );
    }
    // Every query goes to the chosen data source and keeps to the chosen namespace (one
    // Prometheus may scrape several installs), and node panels honour the variables.
    for p in d["panels"].as_array().expect("panels") {
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        for t in p["targets"].as_array().expect("targets") {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{}", p["title"]);
            let expr = t["expr"].as_str().expect("expr");
            let selectors = expr.matches("confroute_").count();
            assert_eq!(
                expr.matches("{namespace=~\"$namespace\"").count(),
                selectors,
                "{}: every series of {expr}",
                p["title"]
            );
            if expr.contains("confroute_node_") || expr.contains("confroute_ari_") {
                assert!(
                    expr.contains("node=~\"$node\"") && expr.contains("zone=~\"$zone\""),
                    "{}: {expr}",
                    p["title"]
                );
            }
        }
    }
}

/// Picking a node or a zone narrows every panel over series the node agents export (the
/// Redis panels too, which controllers share: `node=~"$node|"` keeps their unlabelled
/// series), so one node with a bad path to Redis or Asterisk can be looked at alone.
#[test]
fn panels_over_agent_series_follow_the_node_and_zone_variables() {
    const AGENT_PREFIXES: [&str; 4] = [
        "confroute_node_",
        "confroute_ari_",
        "confroute_webhook_",
        "confroute_redis_",
    ];
    for (title, expr) in dashboard_queries(&dashboard()) {
        let mut rest = expr.as_str();
        while let Some(at) = rest.find("confroute_") {
            let tail = &rest[at..];
            let name_end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            let name = &tail[..name_end];
            if AGENT_PREFIXES.iter().any(|p| name.starts_with(p)) {
                let selector = tail[name_end..]
                    .strip_prefix('{')
                    .and_then(|s| s.split('}').next())
                    .unwrap_or("");
                for var in ["node", "zone"] {
                    assert!(
                        selector.contains(&format!("{var}=~\"${var}")),
                        "panel {title:?}: {name} ignores ${var}: {expr}"
                    );
                }
            }
            rest = &tail[name_end..];
        }
    }
}

/// A panel's series share one axis: per-second rates and per-interval counts (whose size
/// changes with the zoom) are never drawn on the same one.
#[test]
fn no_panel_mixes_rates_with_counts_per_interval() {
    let d = dashboard();
    for p in d["panels"].as_array().expect("panels") {
        let exprs: Vec<&str> = p["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(|t| t["expr"].as_str())
            .collect();
        let rates = exprs.iter().any(|e| e.contains("rate("));
        let counts = exprs.iter().any(|e| e.contains("increase("));
        assert!(
            !(rates && counts),
            "panel {:?} draws rates and increases together: {exprs:?}",
            p["title"]
        );
    }
}
