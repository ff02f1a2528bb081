//! The Helm chart (helm/confroute), rendered and linted by Helm's own Go library (PyPI
//! helm-python-sdk, offline): every values scenario of tests/deploy/values renders, passes
//! `helm lint --strict`, and every manifest validates with `kubernetes-validate --strict`
//! (Kubernetes kinds) or against the Prometheus Operator's CRD schemas and TypeScript types
//! (ServiceMonitor, PrometheusRule). Values that break values.schema.json are refused.

#[path = "../deploy/common.rs"]
mod common;

use std::collections::BTreeSet;
use std::process::Command;

use common::*;
use confroute_tests::harness::TempDir;
use serde_json::{json, Value};

/// Kinds kubernetes-validate has no schema for, checked by tests/deploy/validate-crs.mjs.
const OPERATOR_KINDS: &[&str] = &["ServiceMonitor", "PrometheusRule"];

/// Renders a scenario, lints it strictly and validates every manifest; returns the rendering.
fn check_scenario(name: &str) -> Rendered {
    let values = scenario(name);
    let r = render(&values);

    let lint = chart_py(&[
        "lint",
        chart_dir().to_str().expect("path"),
        values.to_str().expect("path"),
    ]);
    assert!(
        lint.status.success(),
        "helm lint --strict with {name}:\n{}",
        text(&lint)
    );

    let t = tools();
    let yaml = r.files("yaml");
    assert!(!yaml.is_empty(), "{name} rendered nothing");
    // The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest known.
    let mut out = String::new();
    for version in ["1.26.0", "1.37.0"] {
        let kv = run(Command::new(&t.kubernetes_validate)
            .args(["--strict", "--kubernetes-version", version])
            .args(&yaml));
        let o = text(&kv);
        assert!(
            kv.status.success(),
            "kubernetes-validate --strict -k {version} with {name}:\n{o}"
        );
        out.push_str(&o);
    }
    // A kind it has no schema for is only a warning there; only the operator's kinds may be
    // unknown, and those are checked below.
    for line in out.lines().filter(|l| l.contains("Couldn't find schema")) {
        assert!(
            OPERATOR_KINDS
                .iter()
                .any(|k| line.contains(&format!("kind {k} "))),
            "{name}: no schema for a rendered kind: {line}"
        );
    }

    let crs: Vec<std::path::PathBuf> = r
        .files("json")
        .into_iter()
        .filter(|p| {
            let doc: Value =
                serde_json::from_slice(&std::fs::read(p).expect("read")).expect("json");
            OPERATOR_KINDS.iter().any(|k| doc["kind"] == *k)
        })
        .collect();
    if !crs.is_empty() {
        let v = run(Command::new("node")
            .current_dir(deploy_dir())
            .arg("validate-crs.mjs")
            .args(&crs));
        assert!(
            v.status.success(),
            "operator resources of {name} invalid:\n{}",
            text(&v)
        );
        typecheck_crs(name, &r);
    }
    r
}

/// `satisfies IServiceMonitor` / `IPrometheusRule` under `tsc --noEmit`: the TypeScript types
/// reject misspelt fields, which the CRD schemas (open objects) let through.
fn typecheck_crs(name: &str, r: &Rendered) {
    let mut ts = String::from(
        "import type { IServiceMonitor } from \"@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor\";\n\
         import type { IPrometheusRule } from \"@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule\";\n",
    );
    for (i, d) in r.docs.iter().enumerate() {
        let ty = match d["kind"].as_str() {
            Some("ServiceMonitor") => "IServiceMonitor",
            Some("PrometheusRule") => "IPrometheusRule",
            _ => continue,
        };
        ts.push_str(&format!(
            "export const r{i} = {} satisfies {ty};\n",
            serde_json::to_string_pretty(d).expect("json")
        ));
    }
    let out = tsc_check("crs", &ts);
    assert!(
        out.status.success(),
        "operator resources of {name} do not type-check:\n{}",
        text(&out)
    );
}

/// Runs `tsc --noEmit` on one generated file inside tests/deploy (so node_modules resolves).
fn tsc_check(stem: &str, source: &str) -> std::process::Output {
    let dir = deploy_dir().join(format!(".gen-{stem}-{:016x}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).expect("gen dir");
    std::fs::write(dir.join(format!("{stem}.ts")), source).expect("write ts");
    std::fs::write(
        dir.join("tsconfig.json"),
        r#"{ "extends": "../tsconfig.json", "include": ["*.ts"] }"#,
    )
    .expect("write tsconfig");
    let out = run(Command::new(&tools().tsc)
        .arg("-p")
        .arg(dir.join("tsconfig.json")));
    let _ = std::fs::remove_dir_all(&dir);
    out
}

fn env_of<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
}

fn config_of(r: &Rendered, cm_suffix: &str, key: &str) -> String {
    r.one("ConfigMap", cm_suffix)["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("no {key} in ConfigMap *{cm_suffix}"))
        .to_string()
}

#[test]
fn every_values_scenario_has_a_test() {
    let names: BTreeSet<String> = scenarios().into_iter().map(|(n, _)| n).collect();
    let tested: BTreeSet<String> = [
        "default",
        "hpa",
        "servicemonitor",
        "prometheusrule",
        "networkpolicy",
        "sentinel",
        "cluster",
        "existing-secret",
        "host-network",
        "custom-headers",
        "udp-only",
        "everything",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(
        names, tested,
        "tests/deploy/values/ and the tests below differ"
    );
}

#[test]
fn defaults_render_a_complete_deployment() {
    let r = check_scenario("default");
    let d = r.one("Deployment", "-controller");
    let spec = &d["spec"]["template"]["spec"];
    assert_eq!(d["spec"]["replicas"], 2);
    assert!(
        spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
            .is_array()
    );
    assert_eq!(spec["enableServiceLinks"], false);
    let c = r.container(d, "controller");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    // Not `/readyz`: a Redis outage would leave the SIP Service without an endpoint, where
    // the controllers must answer 503 with Retry-After.
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/healthz");
    // But a new controller is ready only once it has reached Redis: a release that cannot
    // stalls its rollout rather than replacing the working controllers.
    assert_eq!(c["startupProbe"]["httpGet"]["path"], "/readyz");
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert!(
        d["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
            .as_str()
            .is_some_and(|s| s.len() == 64)
    );
    assert_eq!(
        env_of(c, "CONFROUTE_HTTP__API_TOKEN").expect("token")["valueFrom"]["secretKeyRef"]["name"],
        "confroute"
    );
    let toml = config_of(&r, "-controller", "controller.toml");
    assert!(toml.contains("listen = \"0.0.0.0:5060\""), "{toml}");
    assert!(toml.contains("url = \"redis://redis:6379\""), "{toml}");

    // One SIP service with both protocols, and the HTTP service.
    let sip = r.one("Service", "-sip");
    let protocols: BTreeSet<&str> = sip["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .filter_map(|p| p["protocol"].as_str())
        .collect();
    assert_eq!(protocols, BTreeSet::from(["TCP", "UDP"]));
    r.one("Service", "-http");
    assert!(r.all("HorizontalPodAutoscaler").is_empty());
    assert!(r.all("NetworkPolicy").is_empty());
    assert!(r.all("ServiceMonitor").is_empty());
    assert!(r.all("PrometheusRule").is_empty());
    assert_eq!(r.all("PodDisruptionBudget").len(), 2);

    // The node pod: Asterisk and the agent, identity from the pod, drain before stopping.
    let s = r.one("StatefulSet", "-node");
    let pod = &s["spec"]["template"]["spec"];
    assert_eq!(pod["terminationGracePeriodSeconds"], 14_400 + 300);
    assert_eq!(pod["enableServiceLinks"], false);
    assert!(pod["hostNetwork"].is_null());
    let agent = r.container(s, "agent");
    assert_eq!(
        env_of(agent, "CONFROUTE_NODE__ID").expect("id")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    assert_eq!(
        env_of(agent, "NODE_IP").expect("ip")["valueFrom"]["fieldRef"]["fieldPath"],
        "status.podIP"
    );
    assert_eq!(
        env_of(agent, "CONFROUTE_NODE__SIP_URI").expect("uri")["value"],
        "sip:$(NODE_IP):5060"
    );
    assert!(env_of(agent, "CONFROUTE_ARI__PASSWORD").is_some());
    // The liveness probe waits for the start-up, which watches a last life's record for
    // two heartbeats (up to 60 s each) before serving HTTP.
    let startup = &agent["startupProbe"];
    assert_eq!(startup["httpGet"]["path"], "/healthz");
    // An agent that never came up holds no call: killed by its startup probe, it does not
    // wait out the pod's hours-long grace period.
    assert_eq!(startup["terminationGracePeriodSeconds"], 30);
    // Autoscalers cap the grace period far below a drain: they leave node pods alone.
    let annotations = &s["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(
        annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"],
        "false"
    );
    assert_eq!(annotations["karpenter.sh/do-not-disrupt"], "true");
    let allowed = startup["periodSeconds"].as_u64().unwrap_or(0)
        * startup["failureThreshold"].as_u64().unwrap_or(0);
    assert!(
        allowed >= 121,
        "a start-up of 2 x 60 s + 0.5 s fits: {allowed} s"
    );
    assert_eq!(
        agent["lifecycle"]["preStop"]["exec"]["command"],
        json!(["sh", "/etc/confroute/prestop-drain.sh"])
    );
    let asterisk = r.container(s, "asterisk");
    assert_eq!(asterisk["image"], "andrius/asterisk:20");
    assert!(asterisk["lifecycle"]["preStop"]["exec"]["command"].is_array());

    let node_toml = config_of(&r, "-node", "node.toml");
    assert!(
        node_toml.contains("url = \"http://127.0.0.1:8088\""),
        "{node_toml}"
    );
    assert!(
        node_toml.contains("drain_deadline = \"14400s\""),
        "{node_toml}"
    );
    let drain = config_of(&r, "-node", "prestop-drain.sh");
    // The drain of a stop, not an admin's: a restarted agent must not resume it.
    assert!(drain.contains("/v1/drain?shutdown=true") && drain.contains("/v1/conferences"));

    let http = config_of(&r, "-asterisk", "http.conf");
    assert!(http.contains("bindaddr = 127.0.0.1") && http.contains("bindport = 8088"));
    // Asterisk's default: the agent's 40 REST calls hold at most 80 connections and its events
    // WebSocket one more.
    assert!(http.contains("\nsessionlimit = 100\n"), "{http}");
    // Raised with the agent's calls in flight, which Asterisk would otherwise refuse.
    let dir = TempDir::new("values").expect("dir");
    let raised = render(&values_file(
        dir.path(),
        "ari-connections",
        &json!({"node": {"config": {"ari": {"max_connections": 200}}}}),
    ));
    let http = config_of(&raised, "-asterisk", "http.conf");
    assert!(http.contains("\nsessionlimit = 420\n"), "{http}");
    let ari = config_of(&r, "-asterisk", "ari.conf");
    assert!(ari.contains("enabled = yes") && ari.contains("#include \"confroute/ari-user.conf\""));
    let ext = config_of(&r, "-asterisk", "extensions.conf");
    assert!(
        ext.contains("Set(CONFROUTE_NAME=${PJSIP_HEADER(read,X-Conference)})")
            && ext.contains(
                "Stasis(confroute,${IF($[\"${CONFROUTE_NAME}\" != \"\"]?${CONFROUTE_NAME}:${EXTEN})})"
            ),
        "{ext}"
    );
    config_of(&r, "-asterisk", "pjsip.conf");

    // Random ARI password and API token, long enough for the binaries' checks.
    assert!(r
        .secret_value("confroute", "ari-password")
        .is_some_and(|v| v.len() >= 16));
    assert!(r
        .secret_value("confroute", "api-token")
        .is_some_and(|v| v.len() >= 16));
    assert!(r.secret_value("confroute", "redis-password").is_none());
    let dash = r.one("ConfigMap", "-dashboard");
    assert_eq!(dash["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped: Value =
        serde_json::from_str(dash["data"]["confroute.json"].as_str().expect("json"))
            .expect("dashboard JSON in the ConfigMap");
    assert_eq!(shipped, dashboard());
    assert!(
        r.notes().contains("confroute-sip.voice.svc"),
        "{}",
        r.notes()
    );
}

/// A stopping controller keeps serving SIP for a few seconds: kube-proxy and the edges take a
/// moment to learn that its endpoint left, and requests sent meanwhile would go unanswered.
#[test]
fn controllers_serve_on_while_their_endpoint_is_withdrawn() {
    let dir = TempDir::new("values").expect("dir");
    let controller = |values: Value| -> Value {
        let r = render(&values_file(dir.path(), "prestop", &values));
        r.container(r.one("Deployment", "-controller"), "controller")
            .clone()
    };
    assert_eq!(
        controller(json!({}))["lifecycle"]["preStop"],
        json!({"exec": {"command": ["sleep", "5"]}})
    );
    assert_eq!(
        controller(json!({"controller": {"preStopSleepSeconds": 12}}))["lifecycle"]["preStop"]
            ["exec"]["command"],
        json!(["sleep", "12"])
    );
    assert!(
        controller(json!({"controller": {"preStopSleepSeconds": 0}}))["lifecycle"].is_null(),
        "0: no hook"
    );
}

/// On an IPv6 cluster every listener binds `[::]` (an IPv4 wildcard refuses the probes and
/// the calls), Asterisk offers IPv6 RTP, and the pod's address goes in brackets in the
/// node's URIs: unbracketed, the agent refuses its control URL and crash-loops.
#[test]
fn ipv6_pods_listen_on_ipv6_and_get_bracketed_node_uris() {
    let dir = TempDir::new("values").expect("dir");
    // The edge's calls must match an IPv6 range, or Asterisk refuses them all.
    refused_at_render(
        dir.path(),
        "IPv6 pods with only IPv4 trusted ranges",
        &json!({"ipFamily": "IPv6"}),
        &["asterisk.trustedCidrs", "IPv6"],
    );
    refused_at_render(
        dir.path(),
        "IPv6 pods with only IPv4-mapped trusted ranges",
        &json!({"ipFamily": "IPv6", "asterisk": {"trustedCidrs": ["::ffff:10.0.0.0/104"]}}),
        &["asterisk.trustedCidrs", "IPv6"],
    );
    let r = render(&values_file(
        dir.path(),
        "ipv6",
        &json!({"ipFamily": "IPv6", "asterisk": {"trustedCidrs": ["fd00:10::/56"]}}),
    ));
    let controller_toml = config_of(&r, "-controller", "controller.toml");
    assert!(
        controller_toml.contains("listen = \"[::]:5060\"")
            && controller_toml.contains("listen = \"[::]:8080\""),
        "{controller_toml}"
    );
    let node_toml = config_of(&r, "-node", "node.toml");
    assert!(node_toml.contains("listen = \"[::]:9090\""), "{node_toml}");
    let pjsip = config_of(&r, "-asterisk", "pjsip.conf");
    assert!(
        pjsip.contains("bind = [::]:5060")
            && pjsip.contains("rtp_ipv6 = yes")
            && pjsip.contains("match = fd00:10::/56"),
        "{pjsip}"
    );
    // The default stays IPv4 throughout.
    let v4 = check_scenario("default");
    assert!(config_of(&v4, "-asterisk", "pjsip.conf").contains("bind = 0.0.0.0:5060"));
    assert!(!config_of(&v4, "-asterisk", "pjsip.conf").contains("rtp_ipv6"));
    let s = r.one("StatefulSet", "-node");
    let agent = r.container(s, "agent");
    assert_eq!(
        env_of(agent, "CONFROUTE_NODE__SIP_URI").expect("uri")["value"],
        "sip:[$(NODE_IP)]:5060"
    );
    assert_eq!(
        env_of(agent, "CONFROUTE_NODE__CONTROL").expect("control")["value"],
        "http://[$(NODE_IP)]:9090"
    );
}

/// Node pods roll one at a time by default, each after its drain; `OnDelete` leaves the
/// operator to drain and delete several at once, with no partition to keep.
#[test]
fn node_update_strategy_is_rolling_or_on_delete() {
    let dir = TempDir::new("values").expect("dir");
    let strategy = |values: Value| -> Value {
        let r = render(&values_file(dir.path(), "strategy", &values));
        r.one("StatefulSet", "-node")["spec"]["updateStrategy"].clone()
    };
    assert_eq!(
        strategy(json!({})),
        json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 0}})
    );
    assert_eq!(
        strategy(json!({"node": {"updateStrategy": "OnDelete"}})),
        json!({"type": "OnDelete"})
    );
}

/// An operator whose autoscaler must be free to move node pods turns the protection off.
#[test]
fn autoscaler_protection_can_be_turned_off() {
    let dir = TempDir::new("values").expect("dir");
    let r = render(&values_file(
        dir.path(),
        "unprotected",
        &json!({"node": {"protectFromAutoscalers": false}}),
    ));
    let annotations = &r.one("StatefulSet", "-node")["spec"]["template"]["metadata"]["annotations"];
    assert!(annotations["checksum/config"].is_string(), "{annotations}");
    assert!(
        annotations
            .get("cluster-autoscaler.kubernetes.io/safe-to-evict")
            .is_none()
            && annotations.get("karpenter.sh/do-not-disrupt").is_none(),
        "{annotations}"
    );
}

#[test]
fn hpa_replaces_the_fixed_replica_count() {
    let r = check_scenario("hpa");
    let hpa = r.one("HorizontalPodAutoscaler", "-controller");
    assert_eq!(hpa["spec"]["minReplicas"], 3);
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        "confroute-controller"
    );
    assert!(r.one("Deployment", "-controller")["spec"]["replicas"].is_null());
}

/// A controller PDB that can never allow an eviction (one controller, minAvailable 1) blocks
/// `kubectl drain` of its host forever: it is left out then. An unready controller may always
/// be evicted: it serves nothing.
#[test]
fn the_controller_pdb_never_blocks_a_drain_for_good() {
    let dir = TempDir::new("values").expect("dir");
    let pdb = |values: Value| -> Option<Value> {
        let r = render(&values_file(dir.path(), "pdb", &values));
        let found: Vec<Value> = r
            .all("PodDisruptionBudget")
            .into_iter()
            .filter(|d| d["metadata"]["name"] == "confroute-controller")
            .cloned()
            .collect();
        assert!(found.len() <= 1);
        found.into_iter().next()
    };
    for values in [
        json!({"controller": {"replicas": 1}}),
        json!({"controller": {"replicas": 3, "autoscaling": {"enabled": true, "minReplicas": 1}}}),
        json!({"controller": {"replicas": 3, "podDisruptionBudget": {"minAvailable": 3}}}),
        // Kubernetes rounds a percentage up: 50% of one controller is one.
        json!({"controller": {"replicas": 1, "podDisruptionBudget": {"minAvailable": "50%"}}}),
    ] {
        assert!(
            pdb(values.clone()).is_none(),
            "{values}: a PDB no eviction can pass"
        );
    }
    for values in [
        json!({}),
        json!({"controller": {"replicas": 1, "autoscaling": {"enabled": true, "minReplicas": 2}}}),
        json!({"controller": {"replicas": 4, "podDisruptionBudget": {"minAvailable": "50%"}}}),
    ] {
        let p = pdb(values.clone()).unwrap_or_else(|| panic!("{values}: no controller PDB"));
        assert_eq!(
            p["spec"]["unhealthyPodEvictionPolicy"], "AlwaysAllow",
            "{values}"
        );
    }
    // A string is a percentage: "2" would be taken for 2 % and rendered as 2 pods.
    for bad in ["2", "abc", "50 %"] {
        refused_at_render(
            dir.path(),
            &format!("minAvailable {bad:?}"),
            &json!({"controller": {"replicas": 2, "podDisruptionBudget": {"minAvailable": bad}}}),
            &["minAvailable"],
        );
    }
}

#[test]
fn service_monitors_label_nodes_by_pod_name_and_zone() {
    let r = check_scenario("servicemonitor");
    let sm = r.one("ServiceMonitor", "-node");
    assert_eq!(sm["metadata"]["labels"]["release"], "prometheus");
    let relabel = &sm["spec"]["endpoints"][0]["relabelings"];
    assert_eq!(
        relabel[0]["sourceLabels"],
        json!(["__meta_kubernetes_pod_name"])
    );
    assert_eq!(relabel[0]["targetLabel"], "node");
    assert_eq!(relabel[1]["targetLabel"], "zone");
    assert_eq!(relabel[1]["replacement"], "eu-west-1a");
    let ctl = r.one("ServiceMonitor", "-controller");
    assert_eq!(ctl["spec"]["endpoints"][0]["port"], "http");
}

#[test]
fn prometheus_rule_carries_the_rules_file() {
    let r = check_scenario("prometheusrule");
    let pr = r.one("PrometheusRule", "confroute");
    let grace = r.one("StatefulSet", "-node")["spec"]["template"]["spec"]
        ["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace");
    let file = yaml_to_json(&chart_dir().join("rules/confroute.rules.yaml"));
    let rendered = pr["spec"]["groups"].as_array().expect("groups");
    let expected = file["groups"].as_array().expect("groups");
    assert_eq!(rendered.len(), expected.len());
    for (g, e) in rendered.iter().zip(expected) {
        let (rs, es) = (
            g["rules"].as_array().expect("rules"),
            e["rules"].as_array().expect("rules"),
        );
        assert_eq!(rs.len(), es.len());
        for (r, e) in rs.iter().zip(es) {
            assert_eq!(r["alert"], e["alert"]);
            // Kept to the release's namespace ("voice"), the controllers' absence included.
            let ari = "confroute_nodes_ari_down{namespace=\"voice\"}";
            let scoped = e["expr"]
                .as_str()
                .expect("expr")
                .replace(
                    "absent(confroute_nodes_ari_down)",
                    &format!("absent({ari})"),
                )
                .replace(
                    "group(present_over_time(confroute_nodes_ari_down[6h]))",
                    &format!("group(present_over_time({ari}[6h]))"),
                );
            assert_eq!(
                r["expr"].as_str().expect("expr"),
                format!(
                    "({scoped})\nand on (namespace) label_replace(vector(1), \"namespace\", \"voice\", \"\", \"\")"
                ),
                "{}",
                e["alert"]
            );
            assert_eq!(r["annotations"], e["annotations"], "{}", e["alert"]);
            assert_eq!(r["labels"]["severity"], e["labels"]["severity"]);
            assert_eq!(
                r["labels"]["team"], "voice",
                "alertLabels reach {}",
                e["alert"]
            );
            assert_eq!(r["for"], e["for"], "{}", e["alert"]);
            if r["alert"] == "ConfrouteDrainStuck" {
                // Two minutes past drainDeadlineSeconds (3600), plus its `for` of a minute: it
                // must fire before Kubernetes kills the stopping pod at its grace period
                // (3600 + 300), or it never fires there.
                assert_eq!(r["for"], "1m");
                assert!(
                    3600 + 120 + 60 + 60 < grace,
                    "fires a minute before the kill at {grace}"
                );
            }
        }
    }
}

/// The alerts are kept to the release's namespace, which series scraped without the chart's
/// ServiceMonitors may not carry: every scoped alert would stay silent and the controllers'
/// absence page for ever. The chart refuses that pairing, and renders the rules file as it is
/// for a scrape configuration of one's own.
#[test]
fn scoped_alerts_need_the_service_monitors_or_go_unscoped() {
    let dir = TempDir::new("values").expect("dir");
    refused_at_render(
        dir.path(),
        "scoped rules without ServiceMonitors",
        &json!({"prometheusRule": {"enabled": true}}),
        &["serviceMonitor.enabled", "prometheusRule.scopeToNamespace"],
    );
    // Values from before the key (an upgrade with --reuse-values) keep the scoping.
    let r = render(&values_file(
        dir.path(),
        "reused",
        &json!({"prometheusRule": {"enabled": true, "scopeToNamespace": null},
            "serviceMonitor": {"enabled": true}}),
    ));
    let pr = r.one("PrometheusRule", "confroute");
    let first = pr["spec"]["groups"][0]["rules"][0]["expr"]
        .as_str()
        .expect("expr");
    assert!(
        first.contains("label_replace(vector(1), \"namespace\", \"voice\""),
        "{first}"
    );
    let r = render(&values_file(
        dir.path(),
        "unscoped",
        &json!({"prometheusRule": {"enabled": true, "scopeToNamespace": false}}),
    ));
    let pr = r.one("PrometheusRule", "confroute");
    let file = yaml_to_json(&chart_dir().join("rules/confroute.rules.yaml"));
    let rendered = pr["spec"]["groups"].as_array().expect("groups");
    let expected = file["groups"].as_array().expect("groups");
    assert_eq!(rendered.len(), expected.len());
    for (g, e) in rendered.iter().zip(expected) {
        for (r, e) in g["rules"]
            .as_array()
            .expect("rules")
            .iter()
            .zip(e["rules"].as_array().expect("rules"))
        {
            assert_eq!(r["expr"], e["expr"], "{} as in the file", e["alert"]);
        }
    }
}

#[test]
fn network_policies_admit_the_named_peers() {
    let r = check_scenario("networkpolicy");
    let np = r.one("NetworkPolicy", "-node");
    let ingress = np["spec"]["ingress"].as_array().expect("ingress");
    assert_eq!(ingress.len(), 3, "SIP, RTP and HTTP");
    assert_eq!(ingress[1]["ports"][0]["endPort"], 20000);
    assert_eq!(
        ingress[2]["from"].as_array().map(Vec::len),
        Some(2),
        "httpFrom and metricsFrom"
    );
    r.one("NetworkPolicy", "-controller");
}

/// `/metrics` shares its port with the API, and a NetworkPolicy cannot tell them apart: the
/// HTTP ports admit both lists together, and are open to any peer only when both are empty.
/// An empty `metricsFrom` beside a set `httpFrom` (or the reverse) must not open the API.
#[test]
fn one_http_peer_list_alone_keeps_the_http_ports_closed_to_others() {
    let dir = TempDir::new("values").expect("dir");
    let apps =
        json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}}}]);
    for list in ["httpFrom", "metricsFrom"] {
        let r = render(&values_file(
            dir.path(),
            "np",
            &json!({"networkPolicy": {"enabled": true, list: apps}}),
        ));
        for (suffix, port) in [("-controller", "http"), ("-node", "agent-http")] {
            let np = r.one("NetworkPolicy", suffix);
            let rules: Vec<&Value> = np["spec"]["ingress"]
                .as_array()
                .expect("ingress")
                .iter()
                .filter(|i| i["ports"][0]["port"] == port)
                .collect();
            assert!(!rules.is_empty(), "{list}: no rule for {port}");
            for rule in rules {
                assert_eq!(rule["from"], apps, "{list}: {port} admits others");
            }
        }
    }
}

#[test]
fn sentinel_settings_and_password_reach_both_binaries() {
    let r = check_scenario("sentinel");
    for (cm, key) in [("-controller", "controller.toml"), ("-node", "node.toml")] {
        let toml = config_of(&r, cm, key);
        assert!(toml.contains("[redis.sentinel]"), "{toml}");
        assert!(toml.contains("master_name = \"confroute\""), "{toml}");
        assert!(toml.contains("wait_replicas = 1"), "{toml}");
        assert!(!toml.contains("redis://redis:6379"), "{toml}");
    }
    let c = r.container(r.one("Deployment", "-controller"), "controller");
    for var in [
        "CONFROUTE_REDIS__PASSWORD",
        "CONFROUTE_REDIS__SENTINEL__PASSWORD",
    ] {
        assert_eq!(
            env_of(c, var).unwrap_or_else(|| panic!("{var}"))["valueFrom"]["secretKeyRef"]["key"],
            "redis-password"
        );
    }
    assert_eq!(
        r.secret_value("confroute", "redis-password").as_deref(),
        Some("redis-s3cret")
    );
}

#[test]
fn cluster_seeds_and_an_existing_password_secret() {
    let r = check_scenario("cluster");
    let toml = config_of(&r, "-node", "node.toml");
    assert!(
        toml.contains("[redis.cluster]") && toml.contains("seeds = ["),
        "{toml}"
    );
    assert!(
        toml.contains("tls = true") && toml.contains("username = \"confroute\""),
        "{toml}"
    );
    let agent = r.container(r.one("StatefulSet", "-node"), "agent");
    assert_eq!(
        env_of(agent, "CONFROUTE_REDIS__PASSWORD").expect("password")["valueFrom"]["secretKeyRef"],
        json!({"name": "redis-cluster-auth", "key": "password"})
    );
    // The TLS Secret reaches both binaries where their [redis] section says.
    for (suffix, file) in [("-node", "node.toml"), ("-controller", "controller.toml")] {
        let toml = config_of(&r, suffix, file);
        for line in [
            "tls_ca_file = \"/etc/confroute/redis-tls/ca.crt\"",
            "tls_cert_file = \"/etc/confroute/redis-tls/tls.crt\"",
            "tls_key_file = \"/etc/confroute/redis-tls/tls.key\"",
        ] {
            assert!(toml.contains(line), "{file}: {line}\n{toml}");
        }
    }
    for (kind, suffix, container) in [
        ("StatefulSet", "-node", "agent"),
        ("Deployment", "-controller", "controller"),
    ] {
        let workload = r.one(kind, suffix);
        let mounted = r.container(workload, container)["volumeMounts"]
            .as_array()
            .is_some_and(|m| {
                m.iter().any(|v| {
                    v["name"] == "redis-tls" && v["mountPath"] == "/etc/confroute/redis-tls"
                })
            });
        assert!(mounted, "{suffix}: the TLS Secret is mounted");
        let volume = workload["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == "redis-tls"))
            .expect("redis-tls volume");
        assert_eq!(volume["secret"]["secretName"], "redis-cluster-tls");
    }
}

/// A Redis TLS Secret from a public issuer has no `ca.crt`: with `caCertificate: false` the
/// binaries keep the public roots and take only the client certificate from it.
#[test]
fn a_redis_tls_secret_without_a_ca_serves_the_client_certificate_only() {
    let dir = TempDir::new("values").expect("dir");
    let values = values_file(
        dir.path(),
        "public-ca",
        &json!({"redis": {"url": "rediss://redis.example.com:6380",
            "tlsSecret": {"name": "redis-client", "caCertificate": false, "clientCertificate": true}}}),
    );
    let r = render(&values);
    for (suffix, file) in [("-node", "node.toml"), ("-controller", "controller.toml")] {
        let toml = config_of(&r, suffix, file);
        assert!(!toml.contains("tls_ca_file"), "{file}: {toml}");
        assert!(
            toml.contains("tls_cert_file = \"/etc/confroute/redis-tls/tls.crt\""),
            "{file}: {toml}"
        );
    }
}

#[test]
fn existing_secrets_replace_the_charts_own() {
    let r = check_scenario("existing-secret");
    assert!(r.all("Secret").is_empty(), "{:?}", r.names());
    let s = r.one("StatefulSet", "-node");
    let agent = r.container(s, "agent");
    let refs = |var: &str| env_of(agent, var).expect(var)["valueFrom"]["secretKeyRef"].clone();
    assert_eq!(
        refs("CONFROUTE_HTTP__API_TOKEN"),
        json!({"name": "confroute-api", "key": "token"})
    );
    assert_eq!(
        refs("CONFROUTE_ARI__PASSWORD"),
        json!({"name": "confroute-ari", "key": "password"})
    );
    assert_eq!(
        refs("CONFROUTE_REDIS__PASSWORD"),
        json!({"name": "confroute-redis", "key": "redis-password"})
    );
    let init = &s["spec"]["template"]["spec"]["initContainers"][0];
    assert_eq!(
        init["env"][1]["valueFrom"]["secretKeyRef"],
        json!({"name": "confroute-ari", "key": "password"})
    );
}

/// The dialplan reads the conference name from the header the controller writes it in: with
/// a renamed header, a dialplan still reading `X-Conference` would pass Stasis an empty
/// name and every call would be refused. The dialled user part (the name, from the 302's
/// Contact) stands in while nodes still run an older dialplan, and the agent's own fallback
/// header is the renamed one too.
#[test]
fn renamed_headers_reach_the_dialplan() {
    let r = check_scenario("custom-headers");
    let ext = config_of(&r, "-asterisk", "extensions.conf");
    assert!(
        ext.contains("Set(CONFROUTE_NAME=${PJSIP_HEADER(read,X-Room)})")
            && ext.contains(":${EXTEN})})"),
        "{ext}"
    );
    let node_toml = config_of(&r, "-node", "node.toml");
    assert!(
        node_toml.contains("conference_header = \"X-Room\""),
        "{node_toml}"
    );
    assert!(ext.contains("${PJSIP_HEADER(read,X-Room-Node)}"), "{ext}");
    assert!(!ext.contains("X-Conference"), "{ext}");
    // Every first character a conference name may have is matched.
    assert!(ext.contains("exten => _[+0-9a-zA-Z._~]!,1,"), "{ext}");
}

/// A controller serving only UDP gets no Service port for TCP: callers sent there would
/// reach nothing.
#[test]
fn services_offer_only_the_transports_served() {
    let r = check_scenario("udp-only");
    let udp = r.one("Service", "-sip-udp");
    assert_eq!(udp["spec"]["ports"][0]["protocol"], "UDP");
    assert_eq!(udp["spec"]["ports"].as_array().map(Vec::len), Some(1));
    let tcp = r.all("Service").into_iter().any(|d| {
        d["metadata"]["name"]
            .as_str()
            .is_some_and(|n| n.ends_with("-sip-tcp"))
    });
    assert!(
        !tcp,
        "no Service for a transport not served: {:?}",
        r.names()
    );
    // The notes point edges at the Services that exist.
    let notes = r.notes();
    assert!(notes.contains("-sip-udp."), "{notes}");
    assert!(!notes.contains("-sip-tcp"), "{notes}");
    let dir = TempDir::new("values").expect("dir");
    let tcp_only = render(&values_file(
        dir.path(),
        "tcp-only",
        &json!({"controller": {"config": {"sip": {"transports": ["tcp"]}},
            "service": {"sip": {"split": true}}}}),
    ));
    let notes = tcp_only.notes();
    assert!(notes.contains("-sip-tcp."), "{notes}");
    assert!(!notes.contains("-sip-udp"), "{notes}");
    tcp_only.one("Service", "-sip-tcp");
}

/// Outside the cluster the SIP Services keep the caller's source address unless told
/// otherwise: with `Cluster` kube-proxy replaces it by a node's, so answers to requests
/// without `rport` go to the wrong host and `sip.trusted_cidrs` only ever sees node
/// addresses.
#[test]
fn external_sip_services_keep_the_callers_address() {
    let dir = TempDir::new("values").expect("dir");
    let policy = |values: Value, suffix: &str| -> Value {
        let r = render(&values_file(dir.path(), "etp", &values));
        r.one("Service", suffix)["spec"]["externalTrafficPolicy"].clone()
    };
    for ty in ["NodePort", "LoadBalancer"] {
        assert_eq!(
            policy(
                json!({"controller": {"service": {"sip": {"type": ty}}}}),
                "-sip"
            ),
            "Local",
            "{ty}"
        );
        let split = json!({"controller": {"service": {"sip": {"type": ty, "split": true}}}});
        assert_eq!(policy(split.clone(), "-sip-udp"), "Local", "{ty} split");
        assert_eq!(policy(split, "-sip-tcp"), "Local", "{ty} split");
    }
    assert_eq!(
        policy(
            json!({"controller": {"service": {"sip": {"type": "LoadBalancer", "externalTrafficPolicy": "Cluster"}}}}),
            "-sip"
        ),
        "Cluster",
        "an explicit choice stands"
    );
    assert!(policy(json!({}), "-sip").is_null(), "ClusterIP has none");
    // The HTTP Service keeps Kubernetes' default.
    assert!(policy(
        json!({"controller": {"service": {"http": {"type": "NodePort"}}}}),
        "-http"
    )
    .is_null());
}

/// kube-proxy pins an edge's UDP flow to one controller pod; an edge that spreads and fails
/// over itself (Kamailio's dispatcher) resolves the headless Service to every ready
/// controller instead.
#[test]
fn a_headless_sip_service_names_each_controller() {
    let dir = TempDir::new("values").expect("dir");
    let headless = |values: Value| -> Option<Value> {
        let r = render(&values_file(dir.path(), "headless", &values));
        r.all("Service")
            .into_iter()
            .find(|d| d["metadata"]["name"] == "confroute-sip-headless")
            .cloned()
    };
    assert!(headless(json!({})).is_none(), "off by default");
    let svc = headless(json!({"controller": {"service": {"sip": {
        "headless": true, "type": "LoadBalancer", "split": true
    }}}}))
    .expect("headless Service");
    assert_eq!(svc["spec"]["clusterIP"], "None");
    assert!(svc["spec"]["type"].is_null() || svc["spec"]["type"] == "ClusterIP");
    assert!(svc["spec"]["externalTrafficPolicy"].is_null());
    assert_eq!(
        svc["spec"]["selector"]["app.kubernetes.io/component"],
        "controller"
    );
    let protocols: BTreeSet<&str> = svc["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .filter_map(|p| p["protocol"].as_str())
        .collect();
    assert_eq!(protocols, BTreeSet::from(["TCP", "UDP"]));
    let udp_only = headless(json!({"controller": {
        "service": {"sip": {"headless": true}},
        "config": {"sip": {"transports": ["udp"]}}
    }}))
    .expect("headless Service");
    assert_eq!(udp_only["spec"]["ports"].as_array().map(Vec::len), Some(1));
    assert_eq!(udp_only["spec"]["ports"][0]["protocol"], "UDP");
}

#[test]
fn host_network_advertises_the_host_address() {
    let r = check_scenario("host-network");
    let s = r.one("StatefulSet", "-node");
    let pod = &s["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["terminationGracePeriodSeconds"], 7500);
    assert!(
        pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            .is_array(),
        "one node per host: its ports are the host's"
    );
    let agent = r.container(s, "agent");
    assert_eq!(
        env_of(agent, "NODE_IP").expect("ip")["valueFrom"]["fieldRef"]["fieldPath"],
        "status.hostIP"
    );
    let rtp = config_of(&r, "-asterisk", "rtp.conf");
    assert!(rtp.contains("rtpstart = 20000") && rtp.contains("rtpend = 29999"));
}

#[test]
fn everything_at_once() {
    let r = check_scenario("everything");
    r.one("Service", "-sip-udp");
    r.one("Service", "-sip-tcp");
    let udp = r.one("Service", "-sip-udp");
    assert_eq!(udp["spec"]["type"], "LoadBalancer");
    assert_eq!(udp["spec"]["externalTrafficPolicy"], "Local");
    assert_eq!(udp["spec"]["ports"][0]["nodePort"], 30060);
    assert_eq!(
        r.one("Service", "-sip-headless")["spec"]["clusterIP"],
        "None"
    );
    let toml = config_of(&r, "-controller", "controller.toml");
    for line in [
        "retry_after = 10",
        "candidates = 6",
        "trusted_cidrs = [\"10.0.0.0/8\", \"192.0.2.7\"]",
        "level = \"confroute_controller=debug,info\"",
    ] {
        assert!(toml.contains(line), "{line} missing:\n{toml}");
    }
    let node = config_of(&r, "-node", "node.toml");
    for line in [
        "[profiles.moderator]",
        "[profiles.plain]",
        "participant_capacity = 600",
        "end_conference_on_exit = true",
        "beep = \"onEnter\"",
    ] {
        assert!(node.contains(line), "{line} missing:\n{node}");
    }
    let modules = config_of(&r, "-asterisk", "modules.conf");
    assert!(modules.contains("autoload = yes"));
    let ext = config_of(&r, "-asterisk", "extensions.conf");
    assert!(ext.contains("_X."), "configFiles replaces the chart's file");
    let dash = r.one("ConfigMap", "-dashboard");
    assert_eq!(dash["metadata"]["namespace"], "monitoring");
    assert_eq!(dash["metadata"]["labels"]["grafana_dashboard"], "confroute");
}

/// A trunk's password has a place outside the ConfigMaps: the Secret `asterisk.configSecret`
/// names is mounted in Asterisk's /etc/asterisk/secret (for `#include secret/<key>`), and
/// nothing is mounted without it.
#[test]
fn asterisk_secrets_are_mounted_from_a_secret_not_a_config_map() {
    let dir = TempDir::new("values").expect("dir");
    let secret_mount = |r: &Rendered| {
        let workload = r.one("StatefulSet", "-node");
        let mount = r.container(workload, "asterisk")["volumeMounts"]
            .as_array()
            .and_then(|m| m.iter().find(|v| v["name"] == "asterisk-secret"))
            .cloned();
        let volume = workload["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == "asterisk-secret"))
            .cloned();
        (mount, volume)
    };
    let r = render(&values_file(
        dir.path(),
        "secret",
        &json!({"asterisk": {"configSecret": "trunk-auth"}}),
    ));
    let (mount, volume) = secret_mount(&r);
    let mount = mount.expect("mounted in the Asterisk container");
    assert_eq!(mount["mountPath"], "/etc/asterisk/secret");
    assert_eq!(mount["readOnly"], true);
    assert_eq!(
        volume.expect("volume")["secret"]["secretName"],
        "trunk-auth"
    );
    let r = render(&values_file(dir.path(), "none", &json!({})));
    assert_eq!(secret_mount(&r), (None, None));
    refused_at_render(
        dir.path(),
        "a Secret name Kubernetes refuses",
        &json!({"asterisk": {"configSecret": "Trunk_Auth"}}),
        &["configSecret"],
    );
}

#[test]
fn a_changed_configuration_changes_the_checksum() {
    let dir = TempDir::new("values").expect("dir");
    let base = render(&values_file(dir.path(), "base", &json!({})));
    let changed = render(&values_file(
        dir.path(),
        "changed",
        &json!({"controller": {"config": {"sip": {"retry_after": 9}}}, "node": {"capacity": 7}}),
    ));
    let unrelated = render(&values_file(
        dir.path(),
        "unrelated",
        &json!({"controller": {"replicas": 5}, "node": {"replicas": 4}}),
    ));
    let sum = |r: &Rendered, kind: &str, suffix: &str| {
        r.one(kind, suffix)["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
            .clone()
    };
    for (kind, suffix) in [("Deployment", "-controller"), ("StatefulSet", "-node")] {
        assert_ne!(
            sum(&base, kind, suffix),
            sum(&changed, kind, suffix),
            "{kind}"
        );
        assert_eq!(
            sum(&base, kind, suffix),
            sum(&unrelated, kind, suffix),
            "{kind}"
        );
    }
}

/// A secret given in the values rolls the pods that read it when it changes; generated
/// secrets (kept across upgrades, new on every `helm template`) add no checksum.
#[test]
fn a_changed_secret_value_rolls_the_pods_that_read_it() {
    let dir = TempDir::new("secret-values").expect("dir");
    let sum = |values: Value, kind: &str, suffix: &str| {
        let r = render(&values_file(dir.path(), "v", &values));
        r.one(kind, suffix)["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]
            .clone()
    };
    let controller = |v: Value| sum(v, "Deployment", "-controller");
    let node = |v: Value| sum(v, "StatefulSet", "-node");
    assert!(controller(json!({})).is_null());
    assert!(node(json!({})).is_null());
    let token = |t: &str| json!({"apiToken": {"value": t}});
    let ari = |p: &str| json!({"asterisk": {"ariPassword": {"value": p}}});
    let first = token("token-number-one-0001");
    let second = token("token-number-two-0002");
    assert!(controller(first.clone()).is_string());
    assert_ne!(controller(first.clone()), controller(second.clone()));
    assert_ne!(node(first.clone()), node(second));
    assert_eq!(controller(first.clone()), controller(first));
    assert_ne!(node(ari("one-ari-password")), node(ari("two-ari-password")));
    assert!(
        controller(ari("one-ari-password")).is_null(),
        "the controllers do not read the ARI password"
    );
    let redis = |p: &str| json!({"redis": {"password": {"value": p}}});
    assert_ne!(controller(redis("one")), controller(redis("two")));
    // A Secret of the operator's own is theirs to roll.
    let existing =
        json!({"apiToken": {"value": "token-number-one-0001", "existingSecret": "mine"}});
    assert!(controller(existing).is_null());
}

/// A new chart version with the same values leaves the pod templates alone: a changed
/// StatefulSet template rolls every conference node, each draining for hours.
#[test]
fn a_new_chart_version_rolls_no_pod() {
    let dir = TempDir::new("chart-bump").expect("dir");
    let bumped = dir.path().join("confroute");
    let cp = run(Command::new("cp").arg("-r").arg(chart_dir()).arg(&bumped));
    assert!(cp.status.success(), "{}", text(&cp));
    let chart_yaml = bumped.join("Chart.yaml");
    let meta = std::fs::read_to_string(&chart_yaml).expect("Chart.yaml");
    assert!(meta.contains("\nversion: "), "{meta}");
    let meta = meta
        .lines()
        .map(|l| {
            if l.starts_with("version: ") {
                "version: 99.0.0".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&chart_yaml, meta).expect("write Chart.yaml");

    let values = values_file(
        dir.path(),
        "values",
        &json!({"commonLabels": {"team": "voice"}}),
    );
    let old = render_chart(&chart_dir(), &values);
    let new = render_chart(&bumped, &values);
    for (kind, suffix) in [("Deployment", "-controller"), ("StatefulSet", "-node")] {
        let (o, n) = (old.one(kind, suffix), new.one(kind, suffix));
        assert_ne!(
            o["metadata"]["labels"]["helm.sh/chart"], n["metadata"]["labels"]["helm.sh/chart"],
            "{kind}: the object itself names its chart"
        );
        assert_eq!(
            o["spec"]["template"], n["spec"]["template"],
            "{kind}: the pod template changed with the chart version"
        );
        let labels = &o["spec"]["template"]["metadata"]["labels"];
        assert!(labels["helm.sh/chart"].is_null(), "{kind}: {labels}");
        assert!(
            labels["app.kubernetes.io/version"].is_null(),
            "{kind}: {labels}"
        );
        assert_eq!(
            labels["team"], "voice",
            "{kind}: commonLabels reach the pods"
        );
        for (k, v) in o["spec"]["selector"]["matchLabels"]
            .as_object()
            .expect("selector")
        {
            assert_eq!(&labels[k], v, "{kind}: pods match their selector");
        }
    }
}

#[test]
fn values_that_break_the_schema_are_refused() {
    let dir = TempDir::new("values").expect("dir");
    let cases = [
        (
            "typo at the top",
            json!({"controler": {"replicas": 3}}),
            "controler",
        ),
        (
            "typo in a section",
            json!({"node": {"hostNetwrok": true}}),
            "hostNetwrok",
        ),
        (
            "wrong type",
            json!({"controller": {"replicas": "two"}}),
            "replicas",
        ),
        (
            "unknown controller setting",
            json!({"controller": {"config": {"sip": {"retry_afterr": 3}}}}),
            "retry_afterr",
        ),
        (
            "setting the chart owns",
            json!({"controller": {"config": {"sip": {"listen": "0.0.0.0:5070"}}}}),
            "listen",
        ),
        (
            "bad enum in node settings",
            json!({"node": {"config": {"conference": {"beep": "loud"}}}}),
            "beep",
        ),
        (
            "bad duration",
            json!({"redis": {"timeout": "soon"}}),
            "timeout",
        ),
        (
            "unknown redis mode",
            json!({"redis": {"mode": "memcached"}}),
            "mode",
        ),
        (
            "a batch limit the controller refuses",
            json!({"controller": {"config": {"rpc": {"max_batch": 10001}}}}),
            "max_batch",
        ),
        (
            "a node budget that blocks every drain",
            json!({"node": {"podDisruptionBudget": {"maxUnavailable": 0}}}),
            "maxUnavailable",
        ),
        (
            "a node budget of 0 %",
            json!({"node": {"podDisruptionBudget": {"maxUnavailable": "0%"}}}),
            "maxUnavailable",
        ),
        (
            "sentinel without addresses",
            json!({"redis": {"mode": "sentinel"}}),
            "addresses",
        ),
        (
            "short API token",
            json!({"apiToken": {"value": "short"}}),
            "apiToken",
        ),
        (
            "an API token with a line end (made with echo)",
            json!({"apiToken": {"value": "token-number-one-0001\n"}}),
            "apiToken",
        ),
        (
            "port out of range",
            json!({"node": {"sipPort": 70000}}),
            "sipPort",
        ),
        // Both binaries refuse redis.tls beside a redis:// single server (every pod would
        // crash-loop); the chart's default URL is one.
        (
            "redis.tls with a redis:// URL",
            json!({"redis": {"tls": true}}),
            "url",
        ),
        (
            "redis.tls with an explicit redis:// URL",
            json!({"redis": {"tls": true, "url": "redis://cache:6379/0"}}),
            "url",
        ),
        // The URL lands in ConfigMaps, readable by anyone who may read the namespace's
        // configuration: a password belongs in redis.password.
        (
            "password in redis.url",
            json!({"redis": {"url": "redis://:s3cret@cache:6379"}}),
            "url",
        ),
        (
            "user and password in redis.url",
            json!({"redis": {"url": "rediss://confroute:s3cret@cache:6380/0"}}),
            "url",
        ),
        // What the agent refuses at start would crash-loop each pod as the roll reaches it.
        (
            "silence as the wait music",
            json!({"node": {"config": {"conference": {"wait_music": ""}}}}),
            "wait_music",
        ),
        (
            "a metadata address as a profile's callback",
            json!({"node": {"config": {"profiles": {"vip": {"status_callback": "http://169.254.169.254/latest"}}}}}),
            "status_callback",
        ),
        (
            "the unspecified address, spelt short, as the callback",
            json!({"node": {"config": {"conference": {"status_callback": "http://0/x"}}}}),
            "status_callback",
        ),
        (
            "a password in the callback URL (it would sit in a ConfigMap)",
            json!({"node": {"config": {"conference": {"status_callback": "https://app:s3cret@app.example/cb"}}}}),
            "status_callback",
        ),
        (
            "a password in a profile's callback URL",
            json!({"node": {"config": {"profiles": {"vip": {"status_callback": "https://app:s3cret@app.example/cb"}}}}}),
            "status_callback",
        ),
        (
            "password in a cluster seed",
            json!({"redis": {"mode": "cluster", "cluster": {"seeds": ["redis://:s3cret@redis-0:6379"]}}}),
            "seeds",
        ),
        (
            "password in a sentinel address",
            json!({"redis": {"mode": "sentinel", "sentinel": {"masterName": "m", "addresses": [":s3cret@sentinel-0:26379"]}}}),
            "addresses",
        ),
        (
            "an ARI password with a line end (ari.conf would split or trim it)",
            json!({"asterisk": {"ariPassword": {"value": "ari-password-0001\n"}}}),
            "ariPassword",
        ),
        (
            "a scrape interval the Prometheus Operator refuses",
            json!({"serviceMonitor": {"interval": "1m 30s"}}),
            "interval",
        ),
        (
            "a host name among the trusted networks",
            json!({"controller": {"config": {"sip": {"trusted_cidrs": ["edge.example.com"]}}}}),
            "trusted_cidrs",
        ),
        (
            "a node capacity past the binary's 32 bits",
            json!({"node": {"capacity": 4294967296u64}}),
            "capacity",
        ),
    ];
    for (what, values, key) in cases {
        let file = values_file(dir.path(), "bad", &values);
        let out = chart_py(&[
            "schema",
            chart_dir().to_str().expect("path"),
            file.to_str().expect("path"),
        ]);
        let msg = text(&out);
        assert_eq!(out.status.code(), Some(1), "{what}: accepted\n{msg}");
        assert!(
            msg.contains(key),
            "{what}: the message does not name {key}:\n{msg}"
        );
        let render = chart_py(&[
            "render",
            chart_dir().to_str().expect("path"),
            file.to_str().expect("path"),
            dir.path().join("out").to_str().expect("path"),
        ]);
        assert!(!render.status.success(), "{what}: rendered anyway");
        let lint = chart_py(&[
            "lint",
            chart_dir().to_str().expect("path"),
            file.to_str().expect("path"),
        ]);
        assert!(
            !lint.status.success(),
            "{what}: lint passed\n{}",
            text(&lint)
        );
    }
}

/// Asserts that the chart refuses to render `values`, naming each of `names`. (`helm lint`
/// only logs a template's `fail`, so it is not asked.)
fn refused_at_render(dir: &std::path::Path, what: &str, values: &Value, names: &[&str]) {
    let file = values_file(dir, "refused", values);
    let render = chart_py(&[
        "render",
        chart_dir().to_str().expect("path"),
        file.to_str().expect("path"),
        dir.join("out").to_str().expect("path"),
    ]);
    let msg = text(&render);
    assert!(!render.status.success(), "{what}: rendered anyway");
    for name in names {
        assert!(
            msg.contains(name),
            "{what}: the message does not name {name}:\n{msg}"
        );
    }
}

/// Values the schema cannot judge alone (they depend on each other) that would cost calls:
/// the chart refuses to render them, naming the values involved; their bounds render.
#[test]
fn values_that_would_drop_calls_are_refused_at_render() {
    let dir = TempDir::new("values").expect("dir");
    // Kubernetes kills a node pod at its grace period: one shorter than the drain deadline
    // plus 60 s (the agent's reconciliation wait, the teardown and the last callbacks) cuts
    // the preStop drain and drops the calls.
    refused_at_render(
        dir.path(),
        "node grace below the drain deadline",
        &json!({"node": {"drainDeadlineSeconds": 600, "terminationGracePeriodSeconds": 300}}),
        &[
            "node.terminationGracePeriodSeconds",
            "node.drainDeadlineSeconds",
            "660",
        ],
    );
    refused_at_render(
        dir.path(),
        "node grace without the wait past the deadline",
        &json!({"node": {"drainDeadlineSeconds": 600, "terminationGracePeriodSeconds": 659}}),
        &[
            "node.terminationGracePeriodSeconds",
            "node.drainDeadlineSeconds",
        ],
    );
    // The binaries refuse a CA file while no connection uses TLS; so does the chart.
    refused_at_render(
        dir.path(),
        "Redis TLS Secret without TLS",
        &json!({"redis": {"url": "redis://redis:6379", "tlsSecret": {"name": "redis-ca"}}}),
        &["redis.tlsSecret.name", "no connection to Redis uses TLS"],
    );
    refused_at_render(
        dir.path(),
        "Redis TLS Secret used for nothing",
        &json!({"redis": {"url": "rediss://redis:6379",
            "tlsSecret": {"name": "redis-tls", "caCertificate": false}}}),
        &[
            "redis.tlsSecret.caCertificate",
            "redis.tlsSecret.clientCertificate",
        ],
    );
    // Addresses the binaries refuse at start (a plaintext address beside a TLS flag, a
    // Cluster seed naming a database): pods that would crash-loop.
    refused_at_render(
        dir.path(),
        "a redis:// sentinel beside sentinel TLS",
        &json!({"redis": {"mode": "sentinel", "sentinel": {"tls": true,
            "addresses": ["s1:26379", "redis://s2:26379"]}}}),
        &["redis.sentinel.addresses[1]", "redis.sentinel.tls"],
    );
    refused_at_render(
        dir.path(),
        "a redis:// seed beside TLS",
        &json!({"redis": {"mode": "cluster", "tls": true,
            "cluster": {"seeds": ["redis://c1:7000"]}}}),
        &["redis.cluster.seeds[0]", "redis.tls"],
    );
    refused_at_render(
        dir.path(),
        "a seed naming a database",
        &json!({"redis": {"mode": "cluster", "cluster": {"seeds": ["c1:7000", "redis://c2:7000/2"]}}}),
        &["redis.cluster.seeds[1]", "database"],
    );
    // Asterisk with no RTP port, or two of a node pod's listeners on one port.
    refused_at_render(
        dir.path(),
        "RTP range upside down",
        &json!({"asterisk": {"rtp": {"start": 20000, "end": 10000}}}),
        &["asterisk.rtp.start", "asterisk.rtp.end"],
    );
    refused_at_render(
        dir.path(),
        "agent on Asterisk's HTTP port",
        &json!({"node": {"httpPort": 8088}, "asterisk": {"ariPort": 8088}}),
        &["node.httpPort", "asterisk.ariPort", "8088"],
    );
    refused_at_render(
        dir.path(),
        "agent on Asterisk's SIP port",
        &json!({"node": {"httpPort": 5060, "sipPort": 5060}}),
        &["node.httpPort", "node.sipPort"],
    );
    // A rediss:// seed uses TLS as the binaries read it: the Secret is not refused (nor is a
    // block of another mode dropped with null).
    let seeds = render(&values_file(
        dir.path(),
        "tls-seeds",
        &json!({"redis": {"mode": "cluster", "cluster": {"seeds": ["rediss://c1:6379"]},
            "sentinel": null, "tlsSecret": {"name": "redis-ca"}}}),
    ));
    assert!(
        config_of(&seeds, "-controller", "controller.toml").contains("tls_ca_file"),
        "the CA reaches the controller"
    );
    // The grace period counts the preStop sleep: one no longer kills the controller mid-sleep,
    // before it has stopped at all.
    refused_at_render(
        dir.path(),
        "controller grace within its preStop sleep",
        &json!({"controller": {"preStopSleepSeconds": 30, "terminationGracePeriodSeconds": 30}}),
        &[
            "controller.terminationGracePeriodSeconds",
            "controller.preStopSleepSeconds",
        ],
    );
    // A raised webhook.shutdown_wait (the last status callbacks) needs its time past the
    // deadline too; so does a raised command timeout in a controller's stop.
    refused_at_render(
        dir.path(),
        "node grace without a raised callbacks wait",
        &json!({"node": {"drainDeadlineSeconds": 600, "terminationGracePeriodSeconds": 660,
            "config": {"webhook": {"shutdown_wait": "2m"}}}}),
        &[
            "node.terminationGracePeriodSeconds",
            "120 s for the last callbacks",
            "765",
        ],
    );
    // Every unit spelling the binaries read counts, not only the common ones.
    refused_at_render(
        dir.path(),
        "node grace without a callbacks wait in another spelling",
        &json!({"node": {"drainDeadlineSeconds": 600, "terminationGracePeriodSeconds": 700,
            "config": {"webhook": {"shutdown_wait": "2mins"}}}}),
        &["120 s for the last callbacks", "765"],
    );
    refused_at_render(
        dir.path(),
        "a scrape timeout longer than its interval",
        &json!({"serviceMonitor": {"enabled": true, "interval": "15s", "scrapeTimeout": "1m"}}),
        &["serviceMonitor.scrapeTimeout", "serviceMonitor.interval"],
    );
    // Empty: Prometheus's global interval, which the chart does not know; left out.
    let r = render(&values_file(
        dir.path(),
        "global-interval",
        &json!({"serviceMonitor": {"enabled": true, "interval": ""}}),
    ));
    let endpoint = &r.one("ServiceMonitor", "-node")["spec"]["endpoints"][0];
    assert!(endpoint.get("interval").is_none(), "{endpoint}");
    assert_eq!(endpoint["scrapeTimeout"], "10s");
    // The last bus messages get twice webhook.timeout: a longer one counts instead.
    refused_at_render(
        dir.path(),
        "node grace without a raised callbacks timeout",
        &json!({"node": {"drainDeadlineSeconds": 600, "terminationGracePeriodSeconds": 700,
            "config": {"webhook": {"timeout": "30s"}}}}),
        &[
            "60 s for the last callbacks",
            "node.config.webhook.timeout",
            "705",
        ],
    );
    refused_at_render(
        dir.path(),
        "controller grace below a command timeout in another spelling",
        &json!({"controller": {"config": {"rpc": {"command_timeout": "1min 30secs"}}}}),
        &["controller.config.rpc.command_timeout", "100"],
    );
    refused_at_render(
        dir.path(),
        "controller grace below a raised command timeout",
        &json!({"controller": {"config": {"rpc": {"command_timeout": "60s"}}}}),
        &[
            "controller.terminationGracePeriodSeconds (30)",
            "controller.config.rpc.command_timeout",
            "70",
        ],
    );
    let r = render(&values_file(
        dir.path(),
        "bound",
        &json!({"node": {"drainDeadlineSeconds": 600, "terminationGracePeriodSeconds": 660},
            "controller": {"terminationGracePeriodSeconds": 15}}),
    ));
    assert_eq!(
        r.one("StatefulSet", "-node")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"],
        660
    );
    assert_eq!(
        r.one("Deployment", "-controller")["spec"]["template"]["spec"]
            ["terminationGracePeriodSeconds"],
        15,
        "5 s of preStop sleep, 5 s command timeout, 1 s routing deadline, 4 s"
    );
    // Left unset, the node's grace counts a raised callbacks wait.
    let r = render(&values_file(
        dir.path(),
        "computed",
        &json!({"node": {"drainDeadlineSeconds": 600,
            "config": {"webhook": {"shutdown_wait": "1m30s"}}}}),
    ));
    assert_eq!(
        r.one("StatefulSet", "-node")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"],
        600 + 285 + 90
    );
}

/// TLS to a single Redis through a rediss:// URL, with or without redis.tls, and TLS to
/// Sentinel or Cluster through redis.tls: the schema accepts them all.
#[test]
fn redis_tls_the_binaries_accept_passes_the_schema() {
    let dir = TempDir::new("values").expect("dir");
    for values in [
        json!({"redis": {"tls": true, "url": "rediss://cache:6380/0"}}),
        json!({"redis": {"url": "rediss://cache:6380"}}),
        json!({"redis": {"tls": true, "mode": "sentinel", "sentinel": {"addresses": ["s1:26379"]}}}),
        json!({"redis": {"tls": true, "mode": "cluster", "cluster": {"seeds": ["c1:6379"]}}}),
    ] {
        let file = values_file(dir.path(), "tls", &values);
        let out = chart_py(&[
            "schema",
            chart_dir().to_str().expect("path"),
            file.to_str().expect("path"),
        ]);
        assert!(out.status.success(), "{values}: refused\n{}", text(&out));
    }
}

/// Every spelling of `beep` and `record` the agent reads (any case, the booleans, 1 and 0)
/// passes the schema, and the node.toml the chart renders from it gives the agent the
/// option it means.
#[test]
fn conference_options_the_agent_reads_pass_the_schema() {
    use confroute_shared::options::{Beep, Record};
    let dir = TempDir::new("values").expect("dir");
    let cases = [
        (json!({"beep": "yes"}), Some(Beep::True), None),
        (json!({"beep": "OFF"}), Some(Beep::False), None),
        (json!({"beep": "onenter"}), Some(Beep::OnEnter), None),
        (json!({"beep": " onExit "}), Some(Beep::OnExit), None),
        (json!({"beep": 0}), Some(Beep::False), None),
        (json!({"beep": true}), Some(Beep::True), None),
        (json!({"record": true}), None, Some(Record::RecordFromStart)),
        (
            json!({"record": "Record-From-Start"}),
            None,
            Some(Record::RecordFromStart),
        ),
        (json!({"record": "no"}), None, Some(Record::DoNotRecord)),
        (json!({"record": 1}), None, Some(Record::RecordFromStart)),
    ];
    for (i, (conference, beep, record)) in cases.into_iter().enumerate() {
        let values = json!({"node": {"config": {"conference": conference.clone()}}});
        let r = render(&values_file(dir.path(), &format!("options-{i}"), &values));
        let toml = dir.path().join(format!("node-{i}.toml"));
        std::fs::write(&toml, config_of(&r, "-node", "node.toml")).expect("write node.toml");
        let cfg: confroute_node::config::NodeConfig =
            confroute_shared::config::load_from(Some(&toml), &[]).unwrap_or_else(|e| {
                panic!("{conference}: the agent refuses the chart's file: {e}")
            });
        if let Some(beep) = beep {
            assert_eq!(cfg.conference.beep, beep, "{conference}");
        }
        if let Some(record) = record {
            assert_eq!(cfg.conference.record, record, "{conference}");
        }
    }
}

/// A user name in the Redis URL is no secret and passes; the notes name the Redis server by
/// its address alone, never by the URL.
#[test]
fn the_redis_url_stays_out_of_the_notes() {
    let dir = TempDir::new("values").expect("dir");
    let r = render(&values_file(
        dir.path(),
        "url",
        &json!({"redis": {"url": "rediss://confroute@cache.example:6380/2"}}),
    ));
    let notes = r.notes();
    assert!(notes.contains("cache.example:6380"), "{notes}");
    assert!(
        !notes.contains("rediss://") && !notes.contains("confroute@"),
        "{notes}"
    );
}

/// Every value of values.yaml has a row in the chart README's table.
#[test]
fn every_value_is_documented_in_the_readme() {
    let out = chart_py(&["values", chart_dir().to_str().expect("path")]);
    assert!(out.status.success(), "{}", text(&out));
    let values: Value = serde_json::from_slice(&out.stdout).expect("values");
    let readme = std::fs::read_to_string(chart_dir().join("README.md")).expect("README.md");
    let mut missing = Vec::new();
    fn walk(v: &Value, path: String, out: &mut Vec<String>) {
        match v {
            // Maps of Kubernetes objects or settings are documented as one value.
            Value::Object(m)
                if !m.is_empty()
                    && !path.ends_with("resources")
                    && !path.ends_with("Probe")
                    && !path.ends_with("securityContext")
                    && !path.ends_with("SecurityContext")
                    && !path.ends_with(".config") =>
            {
                for (k, v) in m {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(v, p, out);
                }
            }
            _ => out.push(path),
        }
    }
    let mut paths = Vec::new();
    walk(&values, String::new(), &mut paths);
    for p in paths {
        if !readme.contains(&format!("| `{p}` |")) {
            missing.push(p);
        }
    }
    assert!(
        missing.is_empty(),
        "values without a README row: {missing:?}"
    );
}

/// The init container writes the ARI user for Asterisk with the password from the Secret,
/// `;` escaped, readable by every user of the pod: Asterisk started as root with
/// `-U asterisk` drops the pod's fsGroup, so a file readable by that group only would leave
/// ARI without its user. Written so even under a restrictive inherited umask.
#[test]
fn the_ari_user_file_is_written_readable_with_its_password_escaped() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("ari-user").expect("tmp");
    let out = dir.path().join("ari-user.conf");
    let script = chart_dir().join("files/scripts/asterisk-init.sh");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("umask 077; sh '{}'", script.display()))
        .env("ARI_USER", "confroute")
        .env("ARI_PASSWORD", "pa;ss word")
        .env("ARI_USER_FILE", &out)
        .status()
        .expect("run the init script");
    assert!(status.success());
    let text = std::fs::read_to_string(&out).expect("written");
    assert!(text.contains("[confroute]"), "{text}");
    assert!(text.contains("password = pa\\;ss word"), "{text}");
    let mode = std::fs::metadata(&out).expect("stat").permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o644,
        "readable by Asterisk's user whatever its groups"
    );
}

/// Writes an executable `name` with `script` into `dir` and returns a PATH that finds it
/// first: a hook under test then runs it instead of the real command.
fn stub_on_path(dir: &std::path::Path, name: &str, script: &str) -> String {
    let bin = dir.join(name);
    std::fs::write(&bin, script).expect("stub");
    let status = Command::new("chmod")
        .arg("+x")
        .arg(&bin)
        .status()
        .expect("chmod");
    assert!(status.success());
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// A shell fragment answering its `n`-th call (counted in `state`) with the `n`-th of
/// `answers` (the last repeats; `fail` exits `fail_code`), printed with `print`.
fn answering(state: &std::path::Path, answers: &[&str], fail_code: u8, print: &str) -> String {
    let list = answers
        .iter()
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "n=$(cat '{s}' 2>/dev/null || echo 0); echo $((n + 1)) > '{s}'\n\
         i=0; for a in {list}; do last=\"$a\"; [ \"$i\" -eq \"$n\" ] && break; i=$((i + 1)); done\n\
         [ \"$last\" = fail ] && exit {fail_code}\nprintf '{print}' \"$last\"; exit 0\n",
        s = state.display()
    )
}

/// Runs the agent's preStop hook with `curl` on PATH answering each drain request and each
/// conference listing with the next of `drains` and `listings` (the last repeats; `fail`
/// exits 22 as `curl -f` does on an error status); returns how often each was asked.
fn agent_prestop(drains: &[&str], listings: &[&str], drain_retry: &str) -> (usize, usize) {
    let dir = TempDir::new("prestop-agent").expect("tmp");
    let stub = format!(
        "#!/bin/sh\ncase \"$*\" in\n*drain*)\n{}\n;;\n*)\n{}\n;;\nesac\n",
        answering(&dir.path().join("drains"), drains, 22, "%s"),
        answering(&dir.path().join("listings"), listings, 22, "%s")
    );
    let path = stub_on_path(dir.path(), "curl", &stub);
    let out = Command::new("sh")
        .arg(chart_dir().join("files/scripts/prestop-drain.sh"))
        .env("PATH", path)
        .env("AGENT_PORT", "9090")
        .env("MAX_WAIT", "600")
        .env("DRAIN_RETRY", drain_retry)
        .env("POLL_SECONDS", "0")
        .output()
        .expect("run the hook");
    assert!(out.status.success(), "{}", text(&out));
    let count = |kind: &str| {
        std::fs::read_to_string(dir.path().join(kind))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    (count("drains"), count("listings"))
}

/// The agent's preStop asks again while the agent is still starting (its HTTP port not yet
/// up), and a listing that fails once does not end the wait for the last conference.
#[test]
fn agent_prestop_retries_a_starting_agent_and_rides_out_a_failed_listing() {
    let busy = r#"{"items":[{"conference":"a"}]}"#;
    let empty = r#"{"items":[]}"#;
    assert_eq!(
        agent_prestop(&["fail", "fail", "{}"], &[busy, "fail", busy, empty], "600"),
        (3, 4),
        "drained once the agent answered; waited through the failed listing"
    );
    assert_eq!(
        agent_prestop(&["fail"], &[empty], "0"),
        (1, 0),
        "an agent that never answers is given up on after DRAIN_RETRY"
    );
}

/// Runs Asterisk's preStop hook with `asterisk` on PATH answering each `-rx` with the next
/// of `answers` (the last repeats; `fail` exits 1); returns how many times it was asked.
fn asterisk_prestop(answers: &[&str], max_wait: &str) -> usize {
    asterisk_prestop_with(answers, &[max_wait])
}

/// [`asterisk_prestop`] with the hook's arguments (`MAX_WAIT`, `MAX_FAILURES`).
fn asterisk_prestop_with(answers: &[&str], args: &[&str]) -> usize {
    asterisk_prestop_quiet(answers, args, "1")
}

/// [`asterisk_prestop_with`] needing `quiet` answers of no channel in a row.
fn asterisk_prestop_quiet(answers: &[&str], args: &[&str], quiet: &str) -> usize {
    let dir = TempDir::new("prestop").expect("tmp");
    let state = dir.path().join("asked");
    let stub = format!("#!/bin/sh\n{}", answering(&state, answers, 1, "%s\\n"));
    let path = stub_on_path(dir.path(), "asterisk", &stub);
    let out = Command::new("sh")
        .arg(chart_dir().join("files/scripts/asterisk-prestop.sh"))
        .args(args)
        .env("PATH", path)
        .env("POLL_SECONDS", "0")
        .env("QUIET_CHECKS", quiet)
        .output()
        .expect("run the hook");
    assert!(out.status.success(), "{}", text(&out));
    std::fs::read_to_string(&state)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn asterisk_prestop_waits_for_its_last_channel_through_a_slow_answer_and_not_for_a_hung_asterisk() {
    let calls = |n: u32| format!("{n} active channels\n{n} active calls\n0 calls processed");
    let (two, one, none) = (
        calls(2),
        "1 active channel\n1 active call".to_string(),
        calls(0),
    );
    assert_eq!(
        asterisk_prestop(&[&two, &one, &none], "600"),
        3,
        "asked until no channel was left"
    );
    assert_eq!(
        asterisk_prestop_with(&["fail"], &["600", "0"]),
        1,
        "an Asterisk that has not answered for MAX_FAILING seconds is not waited for"
    );
    assert_eq!(
        asterisk_prestop_with(&[&two, "fail", &one, &none], &["600", "60"]),
        4,
        "one failed ask during a drain does not end the wait"
    );
    let started = std::time::Instant::now();
    asterisk_prestop(&[&two], "2");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "MAX_WAIT bounds the wait"
    );
    // No channel must be seen several times in a row: a caller of a conference placed just
    // before the stop may still be on the way, and a channel seen meanwhile starts over.
    assert_eq!(
        asterisk_prestop_quiet(&[&two, &none, &one, &none], &["600"], "3"),
        6,
        "waited for three answers of no channel in a row"
    );
    assert_eq!(
        asterisk_prestop_quiet(&[&none, "fail", &none, &none, &none], &["600"], "3"),
        5,
        "a failed ask is no answer of no channel"
    );
}

/// The rendered alerts, run by promtool: each install's copy fires for its own namespace
/// alone (one Prometheus may watch several installs), the controllers' absence included,
/// and keeps each rule's own severity over `alertLabels`.
#[test]
fn rendered_alerts_fire_for_their_own_namespace_only() {
    let promtool =
        confroute_tests::harness::require_tool("promtool", "prometheus").expect("promtool");
    let r = check_scenario("prometheusrule");
    let pr = r.one("PrometheusRule", "confroute");
    let dir = confroute_tests::harness::TempDir::new("rendered-rules").expect("temp dir");
    // JSON is YAML: the rule file as the operator hands it to Prometheus.
    let rules = json!({"groups": pr["spec"]["groups"].clone()});
    std::fs::write(dir.path().join("rules.json"), rules.to_string()).expect("write rules");
    let tests = r#"
rule_files: [rules.json]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'confroute_nodes{namespace="voice", job="controller", instance="c1:8080", state="serving"}'
        values: '2 0 0 0 0 0'
      - series: 'confroute_nodes{namespace="other", job="controller", instance="c9:8080", state="serving"}'
        values: '2 0 0 0 0 0'
      - series: 'confroute_nodes_ari_down{namespace="other", job="controller", instance="c9:8080"}'
        values: '0x5'
    alert_rule_test:
      - eval_time: 4m
        alertname: ConfrouteNoServingNode
        exp_alerts:
          - exp_labels: {severity: critical, team: voice, namespace: voice, job: controller}
            exp_annotations:
              summary: No conference node is serving
              description: "The controllers see no node in state `serving`: every new conference is answered 503. Check the node pods, their agents' connection to Redis, and drains left on."
      # No controller series in this namespace ever (another install's do not count).
      - eval_time: 4m
        alertname: ConfrouteControllersDown
        exp_alerts:
          - exp_labels: {severity: critical, team: voice, namespace: voice}
            exp_annotations:
              summary: No confroute controller is up
              description: "No controller has answered a scrape for two minutes: INVITEs get no answer (edges time out), the HTTP API and call control are gone, and the alerts computed from the controllers' view cannot fire. Check the controller pods (crash-looping, not scheduled) and the scrape configuration."
"#;
    std::fs::write(dir.path().join("rendered.test.yaml"), tests).expect("write tests");
    let out = run(std::process::Command::new(promtool)
        .current_dir(dir.path())
        .args(["test", "rules", "rendered.test.yaml"]));
    assert!(out.status.success(), "{}", text(&out));
}
