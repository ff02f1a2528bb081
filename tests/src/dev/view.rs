//! What `confroute-dev` prints: the addresses to try, a live status refreshed in place (or
//! plain lines when stdout is not a terminal), and the summary at the end.

use std::io::Write;

use confroute_shared::types::NodeRecord;

use super::cluster::Cluster;
use super::stats;
use super::traffic::Traffic;

/// The addresses and token a user needs to try the cluster.
pub fn banner(cluster: &Cluster, token: &str, log: &std::path::Path) {
    println!(
        "confroute-dev: cluster up (Redis {}, pid {})",
        cluster.redis.url(),
        cluster.redis.pid().unwrap_or(0)
    );
    for (i, c) in cluster.controllers.iter().enumerate() {
        println!(
            "  controller {}: SIP udp/tcp {}  HTTP http://{}  WebSocket ws://{}/v1/rpc  metrics http://{}/metrics",
            i + 1,
            c.sip,
            c.http,
            c.http,
            c.http
        );
    }
    for n in &cluster.nodes {
        let asterisk = n
            .sim
            .as_ref()
            .map(|s| format!("simulated Asterisk {}", s.base_url()))
            .unwrap_or_else(|| {
                format!(
                    "real Asterisk {}, Stasis app {}, callers sent to {}; the generated calls do not reach it",
                    n.ari_url, n.ari_app, n.sip_uri
                )
            });
        println!("  {}: agent http://{}  ({asterisk})", n.id, n.http);
    }
    if let Some(c) = cluster.controllers.first() {
        println!("  API token: {token}");
        println!(
            "  try: curl -H 'Authorization: Bearer {token}' http://{}/v1/nodes",
            c.http
        );
        println!(
            "       cargo run --release -p confroute-controller --bin confroute-ctl -- --url http://{} --token {token} conferences list",
            c.http
        );
    }
    if let Some(c) = cluster.controllers.first() {
        println!("       {}", sipp_line(c.sip));
        println!("         (one SIP INVITE; the log shows the 302's Contact and X-Conference-Node: the node; sipp is Debian's sip-tester)");
    }
    println!("  logs: {}", log.display());
    println!();
}

/// A `sipp` command that sends one INVITE to the controller at `sip` and prints what the
/// scenario logs of the 302 (its `<log>` actions write only with `-trace_logs`). The
/// controllers listen on 127.0.0.1, so sipp must call from there too.
fn sipp_line(sip: std::net::SocketAddr) -> String {
    format!(
        "sipp {sip} -sf tests/sipp/invite.xml -s my-room -m 1 -i 127.0.0.1 -trace_logs -log_file sipp-invite.log; cat sipp-invite.log"
    )
}

/// The live view's note of calls routed to the real Asterisk, which the tool does not dial.
fn not_dialled(s: &stats::Stats) -> String {
    if s.not_dialled == 0 {
        String::new()
    } else {
        format!("  to the real Asterisk (not dialled) {}", s.not_dialled)
    }
}

fn lines(traffic: &Traffic, nodes: &[NodeRecord], names: &[String], t: f64) -> Vec<String> {
    let per_node = match traffic.members.lock() {
        Ok(m) => (m.per_node(names.len()), m.active()),
        Err(p) => {
            let m = p.into_inner();
            (m.per_node(names.len()), m.active())
        }
    };
    stats::with(&traffic.stats, |s| {
        let rate = if t > 0.0 { s.placed as f64 / t } else { 0.0 };
        let mut out = vec![
            format!(
                "t={t:>5.0}s  calls placed {} ({rate:.1}/s)  routed {}  route failures {}  joined {}  join failures {}  in conferences {}{}",
                s.placed, s.routed, s.failed_routes(), s.joined, s.failed_joins(), per_node.1, not_dialled(s)
            ),
            format!("  route latency {}   join latency {}", s.route_latency.describe(), s.join_latency.describe()),
            format!(
                "  dial-outs {}   splits {}   conferences moved {}",
                if s.dialouts.is_empty() {
                    "-".to_string()
                } else {
                    s.dialouts.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
                },
                s.splits,
                s.rehomes.len()
            ),
            format!("  {:<10} {:<14} {:>11} {:>13} {:>13}", "node", "state", "conferences", "participants", "claimed/cap"),
        ];
        for (i, name) in names.iter().enumerate() {
            let rec = nodes.iter().find(|n| n.info.id.as_str() == name);
            let state = rec.map(|r| r.info.state.as_str()).unwrap_or("gone");
            let claimed = rec
                .map(|r| format!("{}/{}", r.claimed, r.info.capacity))
                .unwrap_or_else(|| "-".into());
            out.push(format!(
                "  {:<10} {:<14} {:>11} {:>13} {:>13}",
                name, state, per_node.0[i].0, per_node.0[i].1, claimed
            ));
        }
        out
    })
}

/// One refresh of the status: in place on a terminal, every 5 s as plain lines otherwise.
pub fn show(
    traffic: &Traffic,
    cluster: &Cluster,
    nodes: &[NodeRecord],
    t: f64,
    live: bool,
    first: bool,
) {
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.id.clone()).collect();
    let text = lines(traffic, nodes, &names, t);
    let mut out = std::io::stdout().lock();
    if live {
        // Move up over the previous block and overwrite it.
        if !first {
            let _ = write!(out, "\x1b[{}A\x1b[J", text.len() + 1);
        }
        for l in &text {
            let _ = writeln!(out, "{l}");
        }
        let _ = writeln!(out, "  (Ctrl-C to stop)");
    } else if (t.round() as u64).is_multiple_of(5) {
        for l in &text {
            let _ = writeln!(out, "{l}");
        }
    }
    let _ = out.flush();
}

/// The end-of-run summary.
pub fn summary(traffic: &Traffic, nodes: &[NodeRecord], t: f64) {
    stats::with(&traffic.stats, |s| {
        println!("== confroute-dev summary after {t:.0} s");
        println!(
            "calls placed {}, routed {}, failed routes {}, joined {}, failed joins {}",
            s.placed,
            s.routed,
            s.failed_routes(),
            s.joined,
            s.failed_joins()
        );
        if s.not_dialled > 0 {
            println!(
                "routed to the real Asterisk and not dialled (call it yourself): {}",
                s.not_dialled
            );
        }
        for (why, n) in &s.route_failures {
            println!("  route failure: {why}: {n}");
        }
        for (why, n) in &s.join_failures {
            println!("  join failure: {why}: {n}");
        }
        println!("route latency {}", s.route_latency.describe());
        println!("join latency {}", s.join_latency.describe());
        if !s.dialouts.is_empty() {
            println!(
                "dial-outs: {}",
                s.dialouts
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if s.splits == 0 {
            println!("every conference was on exactly one node at every check (splits 0)");
        } else {
            println!(
                "SPLIT CONFERENCES: {} checks found a conference on two nodes",
                s.splits
            );
        }
        println!(
            "conferences routed to another node than before (re-homed, or ended and started again elsewhere): {}",
            s.rehomes.len()
        );
        for r in &s.rehomes {
            println!("  {:.1}s {}: {} -> {}", r.at, r.conference, r.from, r.to);
        }
        if let Some(k) = &s.killed {
            println!(
                "killed {} at {:.1}s hosting {} conference(s); re-homed on later calls: {} of {}",
                k.node,
                k.at,
                k.hosted.len(),
                k.rehomed.len(),
                k.hosted.len()
            );
            for (c, to, after) in &k.rehomed {
                println!("  rehomed {c} -> {to} ({after:.1}s after the kill)");
            }
        }
        for n in &s.notes {
            println!("note: {n}");
        }
        println!("nodes at the end:");
        for n in nodes {
            println!(
                "  {} {} claimed {}/{}",
                n.info.id, n.info.state, n.claimed, n.info.capacity
            );
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The printed sipp line calls from the controllers' loopback address and writes the
    /// scenario's log, where the 302's headers are, then shows it.
    #[test]
    fn the_sipp_line_calls_from_loopback_and_shows_the_302s_headers() {
        let line = sipp_line("127.0.0.1:5070".parse().expect("address"));
        assert!(line.starts_with("sipp 127.0.0.1:5070 -sf tests/sipp/invite.xml "));
        assert!(line.contains(" -i 127.0.0.1 "));
        assert!(line.contains(" -trace_logs -log_file sipp-invite.log"));
        assert!(line.ends_with("; cat sipp-invite.log"));
    }
}
