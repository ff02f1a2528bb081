//! The traffic of `confroute-dev`: callers routed through a controller (SIP INVITE → 302,
//! or `POST /v1/route`), then dialled into the chosen node's Asterisk, staying a while and
//! hanging up; a few dial-outs through the JSON-RPC API; and an observer on every Asterisk
//! that sees callers enter and leave bridges, to time joins and check that no conference is
//! ever on two nodes at once.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::{json, Value};
use tokio::net::UdpSocket;

use super::stats::{self, Rehome, Shared};
use crate::ari_sim::{AriSim, DialIn};

/// How calls reach a controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Entry {
    /// SIP INVITE over UDP, answered with a 302.
    Sip,
    /// `POST /v1/route`.
    Http,
    /// Alternate between the two.
    Mixed,
}

/// Which conference each of our channels belongs to and where it sits.
#[derive(Default)]
pub struct Membership {
    /// channel id → (conference, node index).
    channels: HashMap<String, (String, usize)>,
    /// channel id → when it was dialled in (until it enters a bridge).
    pending: HashMap<String, Instant>,
    /// (conference, node index) → channels of ours in a bridge there.
    in_bridge: HashMap<(String, usize), HashSet<String>>,
}

impl Membership {
    /// Conferences and participants per node, from what the observers saw.
    pub fn per_node(&self, nodes: usize) -> Vec<(usize, usize)> {
        let mut out = vec![(0usize, 0usize); nodes];
        for ((_, node), members) in &self.in_bridge {
            if !members.is_empty() && *node < nodes {
                out[*node].0 += 1;
                out[*node].1 += members.len();
            }
        }
        out
    }

    /// Callers currently in a bridge.
    pub fn active(&self) -> usize {
        self.in_bridge.values().map(HashSet::len).sum()
    }
}

/// Shared traffic state.
#[derive(Clone)]
pub struct Traffic {
    /// Counters.
    pub stats: Shared,
    /// Bridge membership.
    pub members: Arc<Mutex<Membership>>,
    started: Instant,
    node_ids: Arc<Vec<String>>,
    /// Set once the run stops: callers cut while joining then were cut by the stop.
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Traffic {
    /// Traffic over nodes named `node_ids`.
    pub fn new(node_ids: Vec<String>) -> Self {
        Traffic {
            stats: Default::default(),
            members: Default::default(),
            started: Instant::now(),
            node_ids: Arc::new(node_ids),
            stopping: Arc::default(),
        }
    }

    /// The run stops: every caller is hung up, including those still joining, which is no
    /// failure of theirs.
    pub fn stop(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Seconds since the start.
    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Records a caller entering a bridge on `node` (observer event).
    fn record_entered(&self, node: usize, channel: &str) {
        let mut m = lock(&self.members);
        let Some((conference, _)) = m.channels.get(channel).cloned() else {
            return;
        };
        if let Some(at) = m.pending.remove(channel) {
            stats::with(&self.stats, |s| {
                s.joined += 1;
                s.join_latency.add(at.elapsed());
            });
        }
        m.in_bridge
            .entry((conference, node))
            .or_default()
            .insert(channel.to_string());
    }

    /// Records a caller leaving its bridge or hanging up.
    fn record_left(&self, node: usize, channel: &str, destroyed: bool) {
        let mut m = lock(&self.members);
        let Some((conference, _)) = m.channels.get(channel).cloned() else {
            return;
        };
        if let Some(set) = m.in_bridge.get_mut(&(conference.clone(), node)) {
            set.remove(channel);
        }
        if destroyed {
            m.channels.remove(channel);
            let stopping = self.stopping.load(std::sync::atomic::Ordering::SeqCst);
            if m.pending.remove(channel).is_some() && !stopping {
                stats::with(&self.stats, |s| s.join_failed("hung up before joining"));
            }
        }
    }

    /// Forgets everything on a node whose Asterisk is gone.
    pub fn node_lost(&self, node: usize) {
        let mut m = lock(&self.members);
        m.in_bridge.retain(|(_, n), _| *n != node);
        let gone: Vec<String> = m
            .channels
            .iter()
            .filter(|(_, (_, n))| *n == node)
            .map(|(c, _)| c.clone())
            .collect();
        let mut lost = 0;
        for c in gone {
            m.channels.remove(&c);
            if m.pending.remove(&c).is_some() {
                lost += 1;
            }
        }
        drop(m);
        if lost > 0 {
            stats::with(&self.stats, |s| {
                *s.join_failures.entry("node lost".into()).or_default() += lost
            });
        }
    }

    /// Checks, once, that every conference has members on one node at most.
    pub fn check(&self) {
        let m = lock(&self.members);
        let mut nodes_of: HashMap<&str, Vec<usize>> = HashMap::new();
        for ((conf, node), members) in &m.in_bridge {
            if !members.is_empty() {
                nodes_of.entry(conf.as_str()).or_default().push(*node);
            }
        }
        let at = self.elapsed();
        stats::with(&self.stats, |s| {
            for (conf, nodes) in nodes_of {
                if nodes.len() > 1 {
                    s.splits += 1;
                    s.notes.push(format!(
                        "{at:.1}s: conference {conf} has members on {} nodes at once",
                        nodes.len()
                    ));
                }
            }
        });
    }
}

/// What an observer of one Asterisk reports: callers entering and leaving bridges.
pub trait BridgeEvents: Clone + Send + Sync + 'static {
    /// `channel` entered bridge `bridge` on node `node`.
    fn entered(&self, node: usize, channel: &str, bridge: &str);
    /// `channel` left bridge `bridge` on node `node`.
    fn left(&self, node: usize, channel: &str, bridge: &str);
    /// `channel` on node `node` is gone, hung up with Q.850 `cause`.
    fn destroyed(&self, node: usize, channel: &str, cause: i64);
    /// The events socket is (again) connected: what happened while it was not was missed.
    fn connected(&self, _node: usize, _sim: &AriSim) {}
    /// The events socket closed.
    fn disconnected(&self, _node: usize, _sim: &AriSim) {}
}

impl BridgeEvents for Traffic {
    fn entered(&self, node: usize, channel: &str, _bridge: &str) {
        self.record_entered(node, channel);
    }

    fn left(&self, node: usize, channel: &str, _bridge: &str) {
        self.record_left(node, channel, false);
    }

    fn destroyed(&self, node: usize, channel: &str, _cause: i64) {
        self.record_left(node, channel, true);
    }

    fn disconnected(&self, node: usize, sim: &AriSim) {
        // The socket closes when this Asterisk dies: its callers are gone.
        if !sim.snapshot().up {
            self.node_lost(node);
        }
    }
}

/// Follows one Asterisk's events as an observer application subscribed to everything.
pub async fn observe<E: BridgeEvents>(events: E, node: usize, sim: AriSim) {
    loop {
        let url = format!(
            "{}&subscribeAll=true",
            sim.events_url("confroute-dev-observer")
        );
        if let Ok((mut ws, _)) = tokio_tungstenite::connect_async(url.as_str()).await {
            events.connected(node, &sim);
            while let Some(Ok(msg)) = ws.next().await {
                let tokio_tungstenite::tungstenite::Message::Text(text) = msg else {
                    continue;
                };
                let Ok(ev) = serde_json::from_str::<Value>(text.as_str()) else {
                    continue;
                };
                let channel = ev["channel"]["id"].as_str().unwrap_or("");
                let bridge = ev["bridge"]["id"].as_str().unwrap_or("");
                match ev["type"].as_str().unwrap_or("") {
                    "ChannelEnteredBridge" => events.entered(node, channel, bridge),
                    "ChannelLeftBridge" => events.left(node, channel, bridge),
                    "ChannelDestroyed" => {
                        events.destroyed(node, channel, ev["cause"].as_i64().unwrap_or(0))
                    }
                    _ => {}
                }
            }
            let _ = ws.close(None).await;
            events.disconnected(node, &sim);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Where a controller sent a conference.
pub enum Routed {
    /// The node id.
    Node(String),
    /// Why not.
    Failed(String),
}

/// A controller's final answer to an INVITE.
pub struct SipAnswer {
    /// Status code.
    pub status: u16,
    /// The whole message.
    pub text: String,
}

impl SipAnswer {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<String> {
        self.text.split("\r\n").find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// Sends an INVITE for `conference` over UDP and ACKs the final answer (provisional ones
/// are passed over); `Err` when none comes within `wait`.
pub async fn sip_invite(
    controller: SocketAddr,
    conference: &str,
    wait: Duration,
) -> Result<SipAnswer, String> {
    let socket = UdpSocket::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("local socket: {e}"))?;
    let port = socket.local_addr().map(|a| a.port()).unwrap_or(0);
    let branch = format!("z9hG4bK{:016x}", rand::random::<u64>());
    let call_id = format!("{:016x}@confroute-dev", rand::random::<u64>());
    let head = |method: &str, to_tag: &str| {
        format!(
            "{method} sip:{conference}@{controller} SIP/2.0\r\n\
             Via: SIP/2.0/UDP 127.0.0.1:{port};branch={branch};rport\r\n\
             Max-Forwards: 70\r\nFrom: <sip:dev@127.0.0.1>;tag=dev1\r\n\
             To: <sip:{conference}@{controller}>{to_tag}\r\nCall-ID: {call_id}\r\n\
             CSeq: 1 {method}\r\nContent-Length: 0\r\n\r\n"
        )
    };
    socket
        .send_to(head("INVITE", "").as_bytes(), controller)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    // A `100 Trying` comes first when routing takes a while; the answer is the final one.
    let answer = loop {
        let n = match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => {
                return Err(format!(
                    "no final SIP answer within {} s",
                    wait.as_secs_f64()
                ))
            }
        };
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        let status: u16 = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if !(100..200).contains(&status) {
            break SipAnswer { status, text };
        }
    };
    let to_tag = answer
        .header("To")
        .and_then(|t| t.split(";tag=").nth(1).map(|t| format!(";tag={t}")))
        .unwrap_or_default();
    let _ = socket
        .send_to(head("ACK", &to_tag).as_bytes(), controller)
        .await;
    Ok(answer)
}

/// Asks a controller over SIP: INVITE, then ACK the final answer.
pub async fn route_sip(controller: SocketAddr, conference: &str) -> Routed {
    let answer = match sip_invite(controller, conference, Duration::from_secs(2)).await {
        Ok(a) => a,
        Err(why) => return Routed::Failed(why),
    };
    match (answer.status, answer.header("X-Conference-Node")) {
        (302, Some(node)) => Routed::Node(node),
        _ => Routed::Failed(format!(
            "SIP {} {}",
            answer.status,
            answer.header("Warning").unwrap_or_default()
        )),
    }
}

/// A controller's answer to `POST /v1/route`.
pub struct HttpAnswer {
    /// HTTP status.
    pub status: u16,
    /// The `Retry-After` header.
    pub retry_after: Option<String>,
    /// The JSON body (`Null` when it is not JSON).
    pub body: Value,
}

/// `POST /v1/route` for `conference`, with `token` as bearer token unless it is empty.
pub async fn http_route(
    http: &reqwest::Client,
    controller: SocketAddr,
    token: &str,
    conference: &str,
) -> Result<HttpAnswer, String> {
    let mut req = http
        .post(format!("http://{controller}/v1/route"))
        .json(&json!({"conference": conference}));
    if !token.is_empty() {
        req = req.bearer_auth(token);
    }
    let r = req.send().await.map_err(|e| format!("HTTP: {e}"))?;
    let status = r.status().as_u16();
    let retry_after = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let body: Value = r.json().await.unwrap_or(Value::Null);
    Ok(HttpAnswer {
        status,
        retry_after,
        body,
    })
}

/// Asks a controller over HTTP.
pub async fn route_http(
    http: &reqwest::Client,
    controller: SocketAddr,
    token: &str,
    conference: &str,
) -> Routed {
    match http_route(http, controller, token, conference).await {
        Ok(a) => match a.body["node_id"].as_str() {
            Some(n) if (200..300).contains(&a.status) => Routed::Node(n.to_string()),
            _ => Routed::Failed(format!(
                "HTTP {} {}",
                a.status,
                a.body["error"]["code"].as_str().unwrap_or("")
            )),
        },
        Err(e) => Routed::Failed(e),
    }
}

/// One caller: routed, dialled into the chosen node, in the conference for `hold`, gone.
#[allow(clippy::too_many_arguments)]
pub async fn call(
    traffic: Traffic,
    sims: Arc<Vec<Option<AriSim>>>,
    http: reqwest::Client,
    controller: (SocketAddr, SocketAddr),
    token: String,
    use_sip: bool,
    conference: String,
    hold: Duration,
) {
    stats::with(&traffic.stats, |s| s.placed += 1);
    let started = Instant::now();
    let routed = if use_sip {
        route_sip(controller.0, &conference).await
    } else {
        route_http(&http, controller.1, &token, &conference).await
    };
    let node_id = match routed {
        Routed::Node(n) => n,
        Routed::Failed(why) => {
            // Nodes drain as the run stops: a call still on its way then finds no room.
            if !traffic.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                stats::with(&traffic.stats, |s| s.route_failed(why));
            }
            return;
        }
    };
    let at = traffic.elapsed();
    stats::with(&traffic.stats, |s| {
        s.routed += 1;
        s.route_latency.add(started.elapsed());
        // A conference the controllers now send somewhere else: re-homed (its node died or
        // drained empty) or ended and started again elsewhere.
        if let Some(k) = &mut s.killed {
            if k.node != node_id
                && k.hosted.contains(&conference)
                && !k.rehomed.iter().any(|(c, _, _)| *c == conference)
            {
                k.rehomed
                    .push((conference.clone(), node_id.clone(), at - k.at));
            }
        }
        match s.last_node.insert(conference.clone(), node_id.clone()) {
            Some(before) if before != node_id => s.rehomes.push(Rehome {
                conference: conference.clone(),
                from: before,
                to: node_id.clone(),
                at,
            }),
            _ => {}
        }
    });
    let Some(node) = traffic.node_ids.iter().position(|n| *n == node_id) else {
        stats::with(&traffic.stats, |s| {
            s.join_failed("routed to an unknown node")
        });
        return;
    };
    let Some(Some(sim)) = sims.get(node).cloned() else {
        stats::with(&traffic.stats, |s| s.not_dialled += 1);
        return;
    };
    let channel_id = format!("dev-{:016x}", rand::random::<u64>());
    {
        let mut m = lock(&traffic.members);
        m.channels
            .insert(channel_id.clone(), (conference.clone(), node));
        m.pending.insert(channel_id.clone(), Instant::now());
    }
    let dial = DialIn {
        app: "confroute".into(),
        args: vec![conference.clone()],
        caller_number: format!("+1555{:07}", rand::rng().random_range(0..10_000_000)),
        extension: conference.clone(),
        channel_id: Some(channel_id.clone()),
        ..DialIn::default()
    };
    if let Err(e) = sim.dial_in(dial).await {
        let mut m = lock(&traffic.members);
        m.channels.remove(&channel_id);
        m.pending.remove(&channel_id);
        drop(m);
        stats::with(&traffic.stats, |s| s.join_failed(format!("dial-in: {e}")));
        return;
    }
    tokio::time::sleep(hold).await;
    // Gone already (kicked, conference ended, node lost) is fine.
    let _ = sim.hangup_far_end(&channel_id, 16).await;
}

/// One dial-out through a controller's JSON-RPC WebSocket, followed to its last status.
pub async fn dialout(
    traffic: Traffic,
    controller: SocketAddr,
    token: String,
    conference: String,
    sims: Arc<Vec<Option<AriSim>>>,
    hold: Duration,
) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let count = |what: &str| {
        stats::with(&traffic.stats, |s| {
            *s.dialouts.entry(what.to_string()).or_default() += 1
        })
    };
    let Ok(mut req) = format!("ws://{controller}/v1/rpc").into_client_request() else {
        return;
    };
    if let Ok(v) = format!("Bearer {token}").parse() {
        req.headers_mut().insert("authorization", v);
    }
    let Ok((mut ws, _)) = tokio_tungstenite::connect_async(req).await else {
        count("error: websocket");
        return;
    };
    let to = format!("+1555{:07}", rand::rng().random_range(0..10_000_000));
    let msg = json!({"jsonrpc": "2.0", "method": "dialout", "params": {"conference": conference, "to": to, "timeout": 10}, "id": 1});
    if ws
        .send(Message::Text(msg.to_string().into()))
        .await
        .is_err()
    {
        count("error: websocket");
        return;
    }
    count("placed");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut callid = None;
    while let Ok(Some(Ok(Message::Text(t)))) = tokio::time::timeout_at(deadline, ws.next()).await {
        let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
        if v["id"] == json!(1) {
            if let Some(e) = v.get("error") {
                count(&format!("error: {}", e["message"].as_str().unwrap_or("?")));
                return;
            }
            callid = v["result"]["callid"].as_str().map(String::from);
        } else if v["method"] == "dialout.status" {
            let status = v["params"]["status"].as_str().unwrap_or("?").to_string();
            count(&status);
            if status == "connected" {
                break;
            }
            if status == "rejected" || status == "cleared" {
                return;
            }
        }
    }
    let _ = ws.close(None).await;
    // The callee stays a while, then hangs up on whichever Asterisk it is on.
    tokio::time::sleep(hold).await;
    if let Some(id) = callid {
        for sim in sims.iter().flatten() {
            if sim.hangup_far_end(&id, 16).await.is_ok() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `100 Trying` before the redirect is passed over: the 302 is the answer, and it is
    /// the one acknowledged.
    #[tokio::test]
    async fn a_provisional_answer_is_not_taken_for_the_final_one() {
        let server = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = server.local_addr().expect("local address");
        let peer = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let (_, from) = server.recv_from(&mut buf).await.expect("INVITE");
            for answer in [
                "SIP/2.0 100 Trying\r\nContent-Length: 0\r\n\r\n",
                "SIP/2.0 302 Moved Temporarily\r\nTo: <sip:c@x>;tag=t9\r\nX-Conference-Node: node-a\r\nContent-Length: 0\r\n\r\n",
            ] {
                server.send_to(answer.as_bytes(), from).await.expect("answer");
            }
            let (n, _) = server.recv_from(&mut buf).await.expect("ACK");
            String::from_utf8_lossy(&buf[..n]).to_string()
        });
        let answer = sip_invite(addr, "c", Duration::from_secs(5))
            .await
            .expect("an answer");
        assert_eq!(answer.status, 302);
        assert_eq!(
            answer.header("X-Conference-Node").as_deref(),
            Some("node-a")
        );
        let ack = tokio::time::timeout(Duration::from_secs(5), peer)
            .await
            .expect("the ACK within 5 s")
            .expect("peer task");
        assert!(ack.starts_with("ACK "), "{ack}");
        assert!(ack.contains(";tag=t9"), "{ack}");
    }
}
