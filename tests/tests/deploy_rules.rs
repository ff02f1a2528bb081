//! The Prometheus alerts (helm/confroute/rules/confroute.rules.yaml): `promtool check rules`
//! accepts them, and `promtool test rules` runs tests/deploy/alerts.test.yaml, which makes
//! each alert fire on its trouble and stay quiet without it.

#[path = "../deploy/common.rs"]
mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::*;
use confroute_tests::harness::require_tool;

#[test]
fn promtool_checks_the_rules_file() {
    let promtool = require_tool("promtool", "prometheus").expect("promtool");
    let out = run(Command::new(promtool)
        .arg("check")
        .arg("rules")
        .arg(chart_dir().join("rules/confroute.rules.yaml")));
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("SUCCESS"), "{}", text(&out));
}

/// Runs `promtool test rules` on the unit-test file `file` of tests/deploy; asserts it passes.
fn promtool_test_rules(file: &str) {
    let promtool = require_tool("promtool", "prometheus").expect("promtool");
    let out = run(Command::new(promtool)
        .current_dir(deploy_dir())
        .args(["test", "rules", file]));
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn promtool_unit_tests_of_every_alert_pass() {
    promtool_test_rules("alerts.test.yaml");
}

/// The heartbeat alert at Prometheus's default 1 minute scrape interval, evaluated between
/// scrapes: it keeps firing at every alignment.
#[test]
fn the_heartbeat_alert_fires_at_every_alignment_with_one_minute_scrapes() {
    promtool_test_rules("alerts.scrape-phase.test.yaml");
}

/// Each alert has a case where it fires and one where it does not.
#[test]
fn every_alert_is_tested_firing_and_quiet() {
    let tests = yaml_to_json(&deploy_dir().join("alerts.test.yaml"));
    let mut seen: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    for t in tests["tests"].as_array().expect("tests") {
        for case in t["alert_rule_test"].as_array().expect("alert_rule_test") {
            let name = case["alertname"].as_str().expect("alertname").to_string();
            let fires = case["exp_alerts"].as_array().is_some_and(|a| !a.is_empty());
            let e = seen.entry(name).or_default();
            if fires {
                e.0 = true;
            } else {
                e.1 = true;
            }
        }
    }
    for (alert, _) in alert_rules() {
        let (fires, quiet) = seen.get(&alert).copied().unwrap_or_default();
        assert!(fires, "{alert}: no test where it fires");
        assert!(quiet, "{alert}: no test where it stays quiet");
    }
}

/// The alerts the issue asks for are all there.
#[test]
fn the_required_alerts_exist() {
    let names: Vec<String> = alert_rules().into_iter().map(|(n, _)| n).collect();
    for a in [
        "ConfrouteNoServingNode",
        "ConfrouteNodeLost",
        "ConfrouteControllersDown",
        "ConfrouteClaimsFailing",
        "ConfrouteRedisErrors",
        "ConfrouteRouteLatencyHigh",
        "ConfrouteJoinLatencyHigh",
        "ConfrouteHigh503Rate",
        "ConfrouteDrainStuck",
    ] {
        assert!(names.iter().any(|n| n == a), "{a} missing from {names:?}");
    }
}
