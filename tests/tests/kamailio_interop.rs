//! A real Kamailio 5.6 running the shipped example configuration
//! (`examples/kamailio/kamailio.cfg`) in front of a real controller and Redis: a sipp caller
//! dials a conference through Kamailio, Kamailio asks the controller, follows its 302 with
//! `uac_redirect`, and a sipp UAS playing the conference node answers the INVITE, which must
//! carry the controller's `X-Conference` and `X-Conference-Node` headers (and not the
//! `X-Conference` the caller sent, which would otherwise choose the conference).

use std::collections::HashMap;
use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use confroute_shared::store::Store;
use confroute_tests::fixtures::{self, metric, scrape};
use confroute_tests::harness::{
    free_udp_tcp_port, kamailio_example_config, require_tool, run_sipp, scenario, wait_for,
    ControllerProc, KamailioOptions, KamailioProc, Proc, RedisServer, SippTransport, TempDir,
};

/// A sipp UAS playing a conference node on a free loopback UDP port, for one call.
struct NodeUas {
    proc: Proc,
    port: u16,
    dir: TempDir,
}

impl NodeUas {
    /// A node that answers the call, saying it is `name`.
    fn start(name: &str) -> Self {
        Self::start_with("conference_node_uas.xml", &[("uas_name", name)])
    }

    /// A UAS playing `scenario` with these `-key` values.
    fn start_with(scenario_file: &str, keys: &[(&str, &str)]) -> Self {
        let sipp = require_tool("sipp", "sip-tester").expect("sipp installed");
        let dir = TempDir::new("sipp-uas").expect("temp dir");
        let port = free_udp_tcp_port();
        let mut cmd = Command::new(sipp);
        cmd.current_dir(dir.path())
            .arg("-sf")
            .arg(scenario(scenario_file))
            .args(["-i", "127.0.0.1", "-p", &port.to_string(), "-t", "u1"]);
        for (k, v) in keys {
            cmd.args(["-key", k, v]);
        }
        cmd.args(["-m", "1", "-timeout", "30s", "-timeout_error", "-nostdin"])
            .args(["-trace_logs", "-log_file"])
            .arg(dir.path().join("actions.log"))
            .args(["-trace_err", "-error_file"])
            .arg(dir.path().join("errors.log"))
            .args(["-trace_msg", "-message_file"])
            .arg(dir.path().join("messages.log"));
        let mut proc =
            Proc::spawn("sipp UAS", cmd, &dir.path().join("sipp.out")).expect("start sipp UAS");
        // Ready once its socket is bound: our own bind on that port then fails.
        let bound = wait_for("sipp UAS to bind its port", Duration::from_secs(10), || {
            if !proc.is_running() {
                return Some(false);
            }
            UdpSocket::bind(("127.0.0.1", port))
                .is_err()
                .then_some(true)
        })
        .expect("sipp UAS start-up");
        assert!(bound, "sipp UAS exited at start:\n{}", proc.output());
        NodeUas { proc, port, dir }
    }

    fn sip_uri(&self) -> String {
        format!("sip:127.0.0.1:{};transport=udp", self.port)
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(file)).unwrap_or_default()
    }

    /// Waits for the one call to end and returns what the scenario logged.
    fn finish(mut self) -> HashMap<String, String> {
        let code = self
            .proc
            .wait_exit(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("sipp UAS did not finish: {e}\n{}", self.proc.output()));
        assert_eq!(
            code,
            Some(0),
            "the conference node's call failed\n--- errors\n{}\n--- messages\n{}\n--- output\n{}",
            self.read("errors.log"),
            self.read("messages.log"),
            self.proc.output()
        );
        self.read("actions.log")
            .lines()
            .find_map(|l| l.trim().strip_prefix("RESULT "))
            .map(|l| {
                l.split('|')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every message the UAS received and sent (for failure messages).
    fn messages(&self) -> String {
        self.read("messages.log")
    }

    /// The INVITE the UAS received, as sipp traced it.
    fn received_invite(&self) -> String {
        let log = self.messages();
        let Some(start) = log.find("INVITE sip:") else {
            return String::new();
        };
        let rest = &log[start..];
        rest[..rest.find("\n---").unwrap_or(rest.len())].to_string()
    }
}

struct Setup {
    _redis: RedisServer,
    store: Store,
    controller: ControllerProc,
}

/// Redis, a controller, and (when `node` is given) one serving node at that SIP URI.
async fn setup(node: Option<(&str, String)>) -> Setup {
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let store = fixtures::store(&cfg);
    if let Some((id, sip_uri)) = node {
        let mut info = fixtures::node(id, 100);
        info.sip_uri = sip_uri;
        store
            .register(&info, Duration::from_secs(300))
            .await
            .expect("register node");
    }
    let controller = ControllerProc::start(&fixtures::redis_env(&cfg)).expect("controller");
    Setup {
        _redis: redis,
        store,
        controller,
    }
}

/// The example configuration, pointed at `controller` over `transport` (`udp` or `tcp`).
fn kamailio(controller: &ControllerProc, transport: &str) -> KamailioProc {
    let config: PathBuf = kamailio_example_config();
    let opts = KamailioOptions::new(config)
        .define(
            "CONTROLLER",
            format!(
                "\"sip:127.0.0.1:{};transport={transport}\"",
                controller.sip_port
            ),
        )
        .define("UDP_CHILDREN", "2")
        .define("TCP_CHILDREN", "2")
        .define("LOG_LEVEL", "2");
    KamailioProc::start(&opts).expect("kamailio")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_reaches_the_conference_node_through_kamailio_with_the_conference_headers() {
    // Caller → Kamailio over UDP with Kamailio → controller over UDP, then both over TCP.
    // Kamailio → node is UDP in both cases (the node's registered URI says so).
    for (caller, to_controller) in [(SippTransport::Udp, "udp"), (SippTransport::Tcp, "tcp")] {
        let uas = NodeUas::start("node-a");
        let s = setup(Some(("node-a", uas.sip_uri()))).await;
        let kam = kamailio(&s.controller, to_controller);
        let conf = format!("sales-{to_controller}");

        let run =
            run_sipp("edge_caller.xml", kam.sip_addr(), caller, &conf, 1).expect("sipp caller");
        if run.code != Some(0) {
            panic!(
                "caller failed ({caller:?}, controller over {to_controller})\n--- caller errors\n{}\n\
                 --- caller messages\n{}\n--- node messages\n{}\n--- kamailio\n{}\n--- controller\n{}",
                run.errors,
                run.messages,
                uas.messages(),
                kam.output(),
                s.controller.output()
            );
        }
        assert_eq!(
            run.get("answered_by"),
            Some("node-a"),
            "the 200 came from the node"
        );

        let invite = uas.received_invite();
        for name in ["X-Conference:", "X-Conference-Node:"] {
            let count = invite
                .lines()
                .filter(|l| l.trim_start().starts_with(name))
                .count();
            assert_eq!(
                count, 1,
                "{name} exactly once in the node's INVITE:\n{invite}"
            );
        }
        let seen = uas.finish();
        assert_eq!(
            seen.get("node").map(String::as_str),
            Some("node-a"),
            "X-Conference-Node on the INVITE the node received: {seen:?}"
        );
        assert_eq!(
            seen.get("conference").map(String::as_str),
            Some(conf.as_str()),
            "X-Conference, exactly once, on the INVITE the node received: {seen:?}"
        );
        assert_eq!(
            seen.get("ruri_user").map(String::as_str),
            Some(conf.as_str()),
            "the Request-URI is the 302's Contact: {seen:?}"
        );

        let rec = s
            .store
            .lookup(&conf.parse().expect("name"))
            .await
            .expect("lookup")
            .expect("claimed");
        assert_eq!(rec.owner.node.as_str(), "node-a");
        let injected = format!("injected-{conf}");
        assert!(
            s.store
                .lookup(&injected.parse().expect("name"))
                .await
                .expect("lookup")
                .is_none(),
            "the caller's own X-Conference was dropped by the edge, nothing routed by it"
        );

        // One 302, and Kamailio's ACK for it absorbed by the controller.
        let m = scrape(&s.controller.http_url()).await;
        assert_eq!(
            metric(
                &m,
                r#"confroute_sip_requests_total{code="302",method="INVITE"}"#
            ),
            1.0,
            "{to_controller}"
        );
        assert_eq!(
            metric(
                &m,
                r#"confroute_sip_requests_total{code="none",method="ACK"}"#
            ),
            1.0,
            "{to_controller}"
        );
        assert_eq!(metric(&m, "confroute_sip_retransmissions_total"), 0.0);
    }
}

/// A node the conference moved away from while the call was on its way answers 302 to the
/// node that has it (the agent's default `node.wrong_node = "redirect"`): the edge follows
/// that too, so the caller is answered by the conference's node, not sent the 302.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kamailio_follows_a_conference_nodes_redirect_to_its_owner() {
    let owner = NodeUas::start("node-b");
    let owner_host = format!("127.0.0.1:{}", owner.port);
    let stale = NodeUas::start_with("wrong_node_uas.xml", &[("owner", owner_host.as_str())]);
    let s = setup(Some(("node-a", stale.sip_uri()))).await;
    let kam = kamailio(&s.controller, "udp");
    let conf = "moved-room";
    let run = run_sipp(
        "edge_caller.xml",
        kam.sip_addr(),
        SippTransport::Udp,
        conf,
        1,
    )
    .expect("sipp caller");
    assert_eq!(
        run.code,
        Some(0),
        "caller failed\n--- caller messages\n{}\n--- stale node\n{}\n--- owner\n{}\n--- kamailio\n{}",
        run.messages,
        stale.messages(),
        owner.messages(),
        kam.output()
    );
    assert_eq!(run.get("answered_by"), Some("node-b"), "{}", run.messages);
    let seen = owner.finish();
    assert_eq!(
        seen.get("conference").map(String::as_str),
        Some(conf),
        "{seen:?}"
    );
    assert_eq!(
        seen.get("ruri_user").map(String::as_str),
        Some(conf),
        "{seen:?}"
    );
    assert_eq!(
        seen.get("node").map(String::as_str),
        Some(""),
        "the controller named the node that redirected, not this one: {seen:?}"
    );
    stale.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_refusals_reach_the_caller_through_kamailio_unchanged() {
    // No node registered: the controller answers 503 with Retry-After, and Kamailio passes
    // that answer back rather than treating it as a redirect or inventing its own.
    let s = setup(None).await;
    for (caller, to_controller) in [(SippTransport::Udp, "udp"), (SippTransport::Tcp, "tcp")] {
        let kam = kamailio(&s.controller, to_controller);
        let run = run_sipp(
            "invite_status.xml",
            kam.sip_addr(),
            caller,
            "nobody-home",
            1,
        )
        .expect("sipp");
        if run.code != Some(0) {
            panic!(
                "caller failed ({caller:?})\n--- errors\n{}\n--- messages\n{}\n--- kamailio\n{}",
                run.errors,
                run.messages,
                kam.output()
            );
        }
        assert_eq!(run.get("status"), Some("503"), "{to_controller}");
        assert_eq!(run.get("retry_after"), Some("5"), "{to_controller}");
        assert!(
            run.get("warning").is_some_and(|w| w.contains("room")),
            "{:?}",
            run.results
        );

        // A bad conference name: the controller's 404 comes back as it is.
        let run =
            run_sipp("invite_status.xml", kam.sip_addr(), caller, "bad{name", 1).expect("sipp");
        run.assert_ok();
        assert_eq!(run.get("status"), Some("404"), "{to_controller}");
    }
    let page = s.store.list_conferences(None, 10).await.expect("list");
    assert!(page.items.is_empty(), "nothing claimed: {:?}", page.items);
}

/// A UDP caller at `source` (a loopback address of its own, as Kamailio's flood protection
/// counts by address) that sends INVITEs for made-up conferences straight from a socket.
struct RawCaller {
    socket: UdpSocket,
    /// Final status of each call answered so far, by Call-ID.
    finals: HashMap<String, u16>,
}

impl RawCaller {
    fn new(source: &str) -> Self {
        let socket = UdpSocket::bind((source, 0)).expect("bind caller");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        RawCaller {
            socket,
            finals: HashMap::new(),
        }
    }

    /// Sends `count` INVITEs at once, each for a conference of its own; returns their Call-IDs.
    fn invite(&self, edge: std::net::SocketAddr, tag: &str, count: usize) -> Vec<String> {
        let local = self.socket.local_addr().expect("local addr");
        (0..count)
            .map(|i| {
                let call_id = format!("{tag}-{i}@{}", local.ip());
                let invite = format!(
                    "INVITE sip:{tag}-{i}@{edge} SIP/2.0\r\n\
                     Via: SIP/2.0/UDP {local};branch=z9hG4bK-{tag}-{i}\r\n\
                     Max-Forwards: 70\r\nFrom: <sip:caller@{local}>;tag=f{i}\r\n\
                     To: <sip:{tag}-{i}@{edge}>\r\nCall-ID: {call_id}\r\n\
                     CSeq: 1 INVITE\r\nContact: <sip:caller@{local}>\r\n\
                     Content-Length: 0\r\n\r\n"
                );
                self.socket.send_to(invite.as_bytes(), edge).expect("send");
                call_id
            })
            .collect()
    }

    /// Reads what has arrived, recording each final answer.
    fn read(&mut self) {
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]);
            let status = text
                .strip_prefix("SIP/2.0 ")
                .and_then(|rest| rest.get(..3))
                .and_then(|code| code.parse::<u16>().ok());
            let call_id = text
                .lines()
                .find_map(|l| l.strip_prefix("Call-ID: "))
                .map(str::to_string);
            if let (Some(status @ 200..), Some(call_id)) = (status, call_id) {
                self.finals.insert(call_id, status);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_antiflood_option_drops_a_flooding_source_but_not_trusted_ones() {
    // No node: every INVITE that gets through is answered 503 by the controller, passed on by
    // Kamailio; one the flood protection drops is answered by nobody, and logged.
    let s = setup(None).await;
    let opts = KamailioOptions::new(kamailio_example_config())
        .define(
            "CONTROLLER",
            format!("\"sip:127.0.0.1:{};transport=udp\"", s.controller.sip_port),
        )
        .define("UDP_CHILDREN", "2")
        .define("TCP_CHILDREN", "2")
        .define("LOG_LEVEL", "2")
        .define("WITH_ANTIFLOOD", "1")
        .define("ANTIFLOOD_DENSITY", "10")
        .define("ANTIFLOOD_TRUSTED", "\"192.0.2.1,127.0.0.3/32\"");
    let kam = KamailioProc::start(&opts).expect("kamailio");
    let edge = kam.sip_addr();
    const FLOOD: usize = 200;

    // The flooding source: every INVITE is either answered or logged as dropped, and some
    // are dropped.
    let mut flooder = RawCaller::new("127.0.0.2");
    flooder.invite(edge, "flood", FLOOD);
    let dropped = || {
        kam.output()
            .lines()
            .filter(|l| {
                l.contains("antiflood:") && l.contains("127.0.0.2") && l.contains("dropped")
            })
            .count()
    };
    wait_for(
        "every flooding INVITE answered or dropped",
        Duration::from_secs(20),
        || {
            flooder.read();
            (flooder.finals.len() + dropped() >= FLOOD).then_some(())
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {} answered, {} dropped\n--- kamailio\n{}",
            flooder.finals.len(),
            dropped(),
            kam.output()
        )
    });
    assert!(dropped() > 0, "nothing dropped:\n{}", kam.output());
    assert!(
        !flooder.finals.is_empty(),
        "the first INVITEs of a source get through"
    );
    assert!(
        flooder.finals.values().all(|s| *s == 503),
        "{:?}",
        flooder.finals
    );
    assert!(
        kam.output()
            .contains("antiflood: 127.0.0.2 banned for 300 s"),
        "{}",
        kam.output()
    );
    // Once banned, a source stays banned: a single INVITE of it is dropped too.
    let before = dropped();
    flooder.invite(edge, "again", 1);
    wait_for(
        "the banned source's next INVITE dropped",
        Duration::from_secs(10),
        || (dropped() > before).then_some(()),
    )
    .expect("dropped");

    // A trusted source sending as fast is never banned: every INVITE is answered.
    let mut trunk = RawCaller::new("127.0.0.3");
    trunk.invite(edge, "trunk", FLOOD);
    wait_for(
        "every trusted INVITE answered",
        Duration::from_secs(20),
        || {
            trunk.read();
            (trunk.finals.len() >= FLOOD).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {} answered", trunk.finals.len()));

    // Another caller is not held to the flooder's ban.
    let mut other = RawCaller::new("127.0.0.4");
    other.invite(edge, "other", 1);
    wait_for("another caller answered", Duration::from_secs(10), || {
        other.read();
        (!other.finals.is_empty()).then_some(())
    })
    .expect("answered");
    assert!(
        !kam.output().contains("127.0.0.3 banned") && !kam.output().contains("127.0.0.4 banned"),
        "{}",
        kam.output()
    );
}
