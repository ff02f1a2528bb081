//! SIP details checked on the wire with raw sockets: retransmissions answered without a
//! second Redis call, RFC 3261 §8.2.6 header copying, compact and folded headers, TCP
//! pipelining and keepalives, each class of bad input, the conference header, and the ACL.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use confroute_tests::fixtures::{self, metric, scrape};
use confroute_tests::harness::{ControllerProc, RedisServer, TcpProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Setup {
    _redis: RedisServer,
    controller: ControllerProc,
    store: confroute_shared::store::Store,
}

async fn setup(extra: &[(&str, &str)]) -> Setup {
    let redis = RedisServer::start().expect("redis");
    let cfg = fixtures::single(&redis.url());
    let store = fixtures::store(&cfg);
    let mut info = fixtures::node("node-a", 100);
    info.sip_uri = "sip:10.0.0.11:5060;transport=udp".into();
    store
        .register(&info, Duration::from_secs(300))
        .await
        .expect("register");
    let mut env = fixtures::redis_env(&cfg);
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let controller = ControllerProc::start(&env).expect("controller");
    Setup {
        _redis: redis,
        controller,
        store,
    }
}

struct Udp {
    socket: UdpSocket,
    to: SocketAddr,
}

impl Udp {
    fn new(to: SocketAddr) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        Udp { socket, to }
    }

    fn port(&self) -> u16 {
        self.socket.local_addr().expect("addr").port()
    }

    fn exchange(&self, msg: &str) -> String {
        self.exchange_from(msg).0
    }

    /// The next datagram that arrives (within the socket's read timeout).
    fn recv(&self) -> String {
        let mut buf = [0u8; 8192];
        let n = self.socket.recv(&mut buf).expect("an answer");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Sends and returns the answer with the address it came from.
    fn exchange_from(&self, msg: &str) -> (String, SocketAddr) {
        self.socket.send_to(msg.as_bytes(), self.to).expect("send");
        let mut buf = [0u8; 8192];
        let (n, from) = self.socket.recv_from(&mut buf).expect("an answer");
        (String::from_utf8_lossy(&buf[..n]).into_owned(), from)
    }

    /// Sends and expects no answer within `wait`.
    fn silence(&self, msg: &[u8], wait: Duration) {
        self.socket.send_to(msg, self.to).expect("send");
        self.socket.set_read_timeout(Some(wait)).expect("timeout");
        let mut buf = [0u8; 8192];
        let got = self.socket.recv(&mut buf);
        self.socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        assert!(
            got.is_err(),
            "unexpected answer: {}",
            String::from_utf8_lossy(&buf)
        );
    }
}

fn invite(uri: &str, port: u16, branch: &str, extra: &str) -> String {
    format!(
        "INVITE {uri} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch={branch}\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a1\r\nTo: <{uri}>\r\n\
         Call-ID: {branch}@test\r\nCSeq: 1 INVITE\r\n{extra}Content-Length: 0\r\n\r\n"
    )
}

fn header<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    msg.split("\r\n").find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn status(msg: &str) -> u16 {
    msg.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retransmitted_invite_gets_the_same_answer_without_touching_redis() {
    let s = setup(&[]).await;
    let udp = Udp::new(s.controller.sip_addr());
    let msg = invite("sip:retrans@router", udp.port(), "z9hG4bKretrans1", "");
    let first = udp.exchange(&msg);
    assert_eq!(status(&first), 302, "{first}");
    let before = scrape(&s.controller.http_url()).await;
    let second = udp.exchange(&msg);
    assert_eq!(first, second, "byte-identical answer, same To-tag");
    let after = scrape(&s.controller.http_url()).await;
    for series in [
        r#"confroute_redis_request_duration_seconds_count{op="lookup"}"#,
        r#"confroute_redis_request_duration_seconds_count{op="claim"}"#,
        r#"confroute_route_total{outcome="claimed"}"#,
    ] {
        assert_eq!(metric(&before, series), metric(&after, series), "{series}");
    }
    assert_eq!(metric(&after, "confroute_sip_retransmissions_total"), 1.0);

    // The ACK (same branch) is absorbed: no answer.
    let ack = msg
        .replace(
            "INVITE sip:retrans@router SIP/2.0",
            "ACK sip:retrans@router SIP/2.0",
        )
        .replace("CSeq: 1 INVITE", "CSeq: 1 ACK");
    udp.silence(ack.as_bytes(), Duration::from_millis(300));
}

/// A controller whose Redis stopped answering: node-a registered and one INVITE routed while
/// it answered, then the proxy in between swallows everything. `timeout` is both the routing
/// deadline and the Redis timeout.
struct Stalled {
    _redis: RedisServer,
    proxy: TcpProxy,
    controller: ControllerProc,
    udp: Udp,
}

async fn stalled(timeout: &str, extra: &[(&str, &str)]) -> Stalled {
    stalled_on(std::net::Ipv4Addr::LOCALHOST.into(), timeout, extra).await
}

/// [`stalled`] with the controller's SIP on `ip`.
async fn stalled_on(ip: std::net::IpAddr, timeout: &str, extra: &[(&str, &str)]) -> Stalled {
    let redis = RedisServer::start().expect("redis");
    let upstream: SocketAddr = format!("127.0.0.1:{}", redis.port()).parse().expect("addr");
    let proxy = TcpProxy::start(upstream).await.expect("proxy");
    fixtures::store(&fixtures::single(&redis.url()))
        .register(&fixtures::node("node-a", 100), Duration::from_secs(300))
        .await
        .expect("register");
    let mut env = fixtures::redis_env(&fixtures::single(&proxy.redis_url()));
    env.push(("CONFROUTE_ROUTING__DEADLINE".into(), timeout.into()));
    env.push(("CONFROUTE_REDIS__TIMEOUT".into(), timeout.into()));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let controller = ControllerProc::start_sip_on(ip, &env).expect("controller");
    let udp = Udp::new(controller.sip_addr());
    let warm = udp.exchange(&invite("sip:warm@router", udp.port(), "z9hG4bKwarm", ""));
    assert_eq!(status(&warm), 302, "{warm}");
    proxy.black_hole();
    Stalled {
        _redis: redis,
        proxy,
        controller,
        udp,
    }
}

/// A CANCEL sent right behind its INVITE (both datagrams waiting in the socket together,
/// or both in one TCP segment, as from a sender that does not wait for a provisional
/// answer) matches the INVITE still being routed: `200` for the CANCEL and `487` for the
/// INVITE, not `481` followed by a redirect the caller gave up on. With two worker threads
/// the socket's receivers read the pair in parallel, so the CANCEL may be looked at before
/// the INVITE's task has begun: 200 pairs make that order all but certain to come up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_right_behind_its_invite_ends_it_with_487() {
    const PAIRS: usize = 200;
    let cancel_of = |msg: &str, name: &str| {
        msg.replace(
            &format!("INVITE sip:{name}@router SIP/2.0"),
            &format!("CANCEL sip:{name}@router SIP/2.0"),
        )
        .replace("CSeq: 1 INVITE", "CSeq: 1 CANCEL")
    };
    for threads in ["1", "2"] {
        let Stalled {
            _redis,
            proxy: _proxy,
            controller,
            udp,
        } = stalled("30s", &[("CONFROUTE_RUNTIME__WORKER_THREADS", threads)]).await;
        for pair in 0..PAIRS {
            let (name, branch) = (format!("b2b{pair}"), format!("z9hG4bKb2b{pair}"));
            let msg = invite(&format!("sip:{name}@router"), udp.port(), &branch, "");
            udp.socket.send_to(msg.as_bytes(), udp.to).expect("send");
            udp.socket
                .send_to(cancel_of(&msg, &name).as_bytes(), udp.to)
                .expect("send");
        }
        let mut cancel_answers = HashMap::new();
        let mut invite_finals = HashMap::new();
        while cancel_answers.len() < PAIRS || invite_finals.len() < PAIRS {
            let a = udp.recv();
            let call = header(&a, "Call-ID").unwrap_or_default().to_string();
            let cseq = header(&a, "CSeq").unwrap_or_default().to_string();
            if cseq.ends_with("CANCEL") {
                // A CANCEL that missed its INVITE leaves that INVITE waiting on Redis, with
                // no final answer to wait for here.
                assert_eq!(
                    status(&a),
                    200,
                    "UDP, {threads} thread(s): the CANCEL of {call} matches its INVITE: {a}"
                );
                cancel_answers.insert(call, status(&a));
            } else if status(&a) >= 200 {
                invite_finals.insert(call, status(&a));
            }
        }
        for pair in 0..PAIRS {
            let call = format!("z9hG4bKb2b{pair}@test");
            assert_eq!(
                cancel_answers.get(&call),
                Some(&200),
                "UDP, {threads} thread(s): the CANCEL of {call} matches its INVITE"
            );
            assert_eq!(
                invite_finals.get(&call),
                Some(&487),
                "UDP, {threads} thread(s): {call}"
            );
        }

        // TCP: both in one write, so the connection's reader has the CANCEL in hand as soon
        // as it has handed the INVITE to its task.
        let mut tcp = tokio::net::TcpStream::connect(controller.sip_addr())
            .await
            .expect("connect");
        let msg = invite("sip:b2b-tcp@router", 5060, "z9hG4bKb2btcp", "")
            .replace("SIP/2.0/UDP", "SIP/2.0/TCP");
        let both = format!("{msg}{}", cancel_of(&msg, "b2b-tcp"));
        tcp.write_all(both.as_bytes()).await.expect("write");
        let mut got = String::new();
        read_until(&mut tcp, &mut got, |g| {
            g.contains("CSeq: 1 CANCEL")
                && (g.contains("SIP/2.0 487 ") || g.contains("SIP/2.0 481 "))
        })
        .await;
        assert!(
            got.contains("SIP/2.0 200 OK") && got.contains("SIP/2.0 487 "),
            "TCP, {threads} thread(s): the CANCEL matches its INVITE: {got}"
        );
    }
}

/// RFC 3261 §17.2.1 and §9.2: an INVITE still being routed after 200 ms gets `100 Trying`
/// without waiting for a retransmission (a TCP sender never retransmits), and a CANCEL for
/// it gets `200` while the INVITE is answered `487` at once, not when routing gives up.
/// Redis stops answering and the routing deadline is far off, so every answer read here
/// came without the routing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invite_slow_to_route_gets_100_trying_and_a_cancel_ends_it_with_487() {
    let Stalled {
        _redis,
        proxy,
        controller,
        udp,
    } = stalled("30s", &[]).await;

    // UDP: sent once, never retransmitted.
    let msg = invite(
        "sip:slow@router",
        udp.port(),
        "z9hG4bKslow",
        "Timestamp: 54.3 0.1\r\n",
    );
    udp.socket.send_to(msg.as_bytes(), udp.to).expect("send");
    let trying = udp.recv();
    assert_eq!(status(&trying), 100, "{trying}");
    assert!(
        header(&trying, "To").is_some_and(|t| !t.contains("tag=")),
        "100 Trying adds no To-tag: {trying}"
    );
    // RFC 3261 §8.2.6.1: the 100 carries the request's Timestamp.
    assert_eq!(header(&trying, "Timestamp"), Some("54.3 0.1"), "{trying}");
    let cancel = msg
        .replace(
            "INVITE sip:slow@router SIP/2.0",
            "CANCEL sip:slow@router SIP/2.0",
        )
        .replace("CSeq: 1 INVITE", "CSeq: 1 CANCEL");
    udp.socket.send_to(cancel.as_bytes(), udp.to).expect("send");
    let answers = [udp.recv(), udp.recv()];
    let ok = answers
        .iter()
        .find(|a| header(a, "CSeq").is_some_and(|c| c.ends_with("CANCEL")))
        .unwrap_or_else(|| panic!("no answer to the CANCEL: {answers:?}"));
    let last = answers
        .iter()
        .find(|a| header(a, "CSeq").is_some_and(|c| c.ends_with("INVITE")))
        .unwrap_or_else(|| panic!("no final answer to the INVITE: {answers:?}"));
    assert_eq!(status(ok), 200, "the CANCEL matches the INVITE: {ok}");
    assert_eq!(status(last), 487, "{last}");
    let tag = |m: &str| {
        header(m, "To")
            .and_then(|t| t.split_once("tag="))
            .map(|(_, t)| t.to_string())
    };
    assert!(tag(last).is_some());
    assert_eq!(
        tag(last),
        tag(ok),
        "the CANCEL's 200 and the 487 share the To-tag"
    );
    // A retransmission now gets the 487 again, from the table.
    assert_eq!(status(&udp.exchange(&msg)), 487);

    // TCP: the same, on one connection.
    let mut tcp = tokio::net::TcpStream::connect(controller.sip_addr())
        .await
        .expect("connect");
    let msg = invite("sip:slow-tcp@router", 5060, "z9hG4bKslowtcp", "")
        .replace("SIP/2.0/UDP", "SIP/2.0/TCP");
    tcp.write_all(msg.as_bytes()).await.expect("write");
    let mut got = String::new();
    read_until(&mut tcp, &mut got, |g| g.contains("SIP/2.0 100 Trying")).await;
    let cancel = msg
        .replace(
            "INVITE sip:slow-tcp@router SIP/2.0",
            "CANCEL sip:slow-tcp@router SIP/2.0",
        )
        .replace("CSeq: 1 INVITE", "CSeq: 1 CANCEL");
    tcp.write_all(cancel.as_bytes()).await.expect("write");
    read_until(&mut tcp, &mut got, |g| {
        g.contains("SIP/2.0 200 OK") && g.contains("SIP/2.0 487 Request Terminated")
    })
    .await;

    let m = scrape(&controller.http_url()).await;
    for (code, n) in [("100", 2.0), ("487", 2.0)] {
        let series = format!(r#"confroute_sip_requests_total{{code="{code}",method="INVITE"}}"#);
        assert_eq!(metric(&m, &series), n, "{series}");
    }
    proxy.heal();
}

/// An edge's one TCP connection with as many INVITEs waiting on a stalled Redis as the
/// connection may have in progress (64): a CANCEL sent next is still read and answered at
/// once, and its INVITE gets its 487, since a CANCEL never waits on Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_on_a_tcp_connection_full_of_waiting_invites_is_answered() {
    let Stalled {
        _redis,
        proxy,
        controller,
        udp: _udp,
    } = stalled("30s", &[]).await;

    let mut tcp = tokio::net::TcpStream::connect(controller.sip_addr())
        .await
        .expect("connect");
    let tcp_invite = |i: usize| {
        invite(
            &format!("sip:stuck-{i}@router"),
            5060,
            &format!("z9hG4bKstuck{i}"),
            "",
        )
        .replace("SIP/2.0/UDP", "SIP/2.0/TCP")
    };
    let mut batch = String::new();
    for i in 0..64 {
        batch.push_str(&tcp_invite(i));
    }
    tcp.write_all(batch.as_bytes()).await.expect("write");
    let mut got = String::new();
    read_until(&mut tcp, &mut got, |g| {
        g.matches("SIP/2.0 100 Trying").count() == 64
    })
    .await;
    let cancel = tcp_invite(0)
        .replace(
            "INVITE sip:stuck-0@router SIP/2.0",
            "CANCEL sip:stuck-0@router SIP/2.0",
        )
        .replace("CSeq: 1 INVITE", "CSeq: 1 CANCEL");
    tcp.write_all(cancel.as_bytes()).await.expect("write");
    read_until(&mut tcp, &mut got, |g| {
        g.contains("SIP/2.0 200 OK") && g.contains("SIP/2.0 487 Request Terminated")
    })
    .await;
    proxy.heal();
}

/// `sip.max_pending_invites` bounds INVITEs being routed over UDP and TCP together: many
/// connections, each under its own limit, must not pile up routing tasks and Redis commands
/// on a stalled Redis without bound. Over TCP, where nothing is retransmitted, one past the
/// limit is answered 503 with Retry-After at once, and counted as overloaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_invites_past_the_process_wide_limit_are_answered_503() {
    let Stalled {
        _redis,
        proxy,
        controller,
        udp: _udp,
    } = stalled("30s", &[("CONFROUTE_SIP__MAX_PENDING_INVITES", "2")]).await;
    let tcp_invite = |name: &str| {
        invite(
            &format!("sip:{name}@router"),
            5060,
            &format!("z9hG4bK{name}"),
            "",
        )
        .replace("SIP/2.0/UDP", "SIP/2.0/TCP")
    };
    let mut first = tokio::net::TcpStream::connect(controller.sip_addr())
        .await
        .expect("connect");
    first
        .write_all(format!("{}{}", tcp_invite("wait-1"), tcp_invite("wait-2")).as_bytes())
        .await
        .expect("write");
    let mut got = String::new();
    read_until(&mut first, &mut got, |g| {
        g.matches("SIP/2.0 100 Trying").count() == 2
    })
    .await;

    let mut second = tokio::net::TcpStream::connect(controller.sip_addr())
        .await
        .expect("connect");
    second
        .write_all(tcp_invite("over").as_bytes())
        .await
        .expect("write");
    let mut over = String::new();
    read_until(&mut second, &mut over, |g| g.contains("\r\n\r\n")).await;
    assert_eq!(status(&over), 503, "{over}");
    assert!(header(&over, "Retry-After").is_some(), "{over}");
    assert!(
        header(&over, "Warning").is_some_and(|w| w.contains("sip.max_pending_invites")),
        "{over}"
    );
    let m = scrape(&controller.http_url()).await;
    assert_eq!(
        metric(&m, r#"confroute_sip_dropped_total{reason="overloaded"}"#),
        1.0
    );
    proxy.heal();
}

/// The ACK a caller sends for `answer`, a non-2xx final answer to `invite` (RFC 3261
/// §17.1.1.3): the INVITE's Request-URI, Via, Call-ID and From, the answer's To.
fn ack_for(invite: &str, answer: &str) -> String {
    let to = header(answer, "To").expect("To");
    invite
        .split("\r\n")
        .map(|line| {
            if line.starts_with("INVITE ") {
                line.replacen("INVITE ", "ACK ", 1)
            } else if line.starts_with("To:") {
                format!("To: {to}")
            } else if line.starts_with("CSeq:") {
                line.replace("INVITE", "ACK")
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\r\n")
}

/// RFC 3261 §17.2.1: over UDP, the final answer to an INVITE that was sent `100 Trying` is
/// resent (Timer G: 500 ms, then 1 s, 2 s, ...) until its ACK, since the caller stopped
/// retransmitting when the 100 came and would never ask again for a lost answer. An answer
/// that came without a 100 is not resent: its caller retransmits by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_answer_after_100_trying_is_resent_over_udp_until_its_ack() {
    let Stalled {
        _redis,
        proxy,
        controller,
        udp,
    } = stalled("1s", &[]).await;
    let msg = invite("sip:lost@router", udp.port(), "z9hG4bKlost", "");
    let sent = std::time::Instant::now();
    udp.socket.send_to(msg.as_bytes(), udp.to).expect("send");
    assert_eq!(status(&udp.recv()), 100);
    // The routing deadline passes: 503. Taken as lost: no ACK.
    let first = udp.recv();
    assert_eq!(status(&first), 503, "{first}");
    let again = udp.recv();
    assert_eq!(again, first, "the same answer, resent");
    let second = udp.recv();
    assert_eq!(second, first);
    // The 503 came no sooner than the 1 s deadline, then T1 (0.5 s) and 2·T1 (1 s) apart:
    // a load that delays what is seen only adds to this.
    assert!(
        sent.elapsed() >= Duration::from_millis(2500),
        "resent at T1, then 2·T1: {:?}",
        sent.elapsed()
    );
    udp.socket
        .send_to(ack_for(&msg, &first).as_bytes(), udp.to)
        .expect("send");
    // The next resend was due 2 s after the last one.
    udp.silence(b"\r\n", Duration::from_millis(3000));
    let url = controller.http_url();
    assert_eq!(
        metric(&scrape(&url).await, "confroute_sip_answer_resends_total"),
        2.0
    );

    // Redis back: an INVITE routed at once gets its 302 without a 100 and, unacknowledged,
    // is not resent (the warm-up INVITE of the set-up was not acknowledged either).
    proxy.heal();
    // Routing works again once the controller's Redis connection is back: the conference is
    // homed over HTTP, so the INVITE below is a quick lookup.
    let client = fixtures::http();
    confroute_tests::harness::wait_for_async(
        "routing to work again",
        Duration::from_secs(10),
        || async {
            let r = client
                .post(format!("{url}/v1/route"))
                .json(&serde_json::json!({ "conference": "quick" }))
                .send()
                .await
                .ok()?;
            r.status().is_success().then_some(())
        },
    )
    .await
    .expect("routes again");
    let quick = udp.exchange(&invite("sip:quick@router", udp.port(), "z9hG4bKquick", ""));
    assert_eq!(status(&quick), 302, "{quick}");
    udp.silence(b"\r\n", Duration::from_millis(1200));
    assert_eq!(
        metric(&scrape(&url).await, "confroute_sip_answer_resends_total"),
        2.0
    );
}

/// Reads from `tcp` into `got` until `done` holds; fails after 10 s (the routing these
/// answers must not wait for would take a minute).
async fn read_until(
    tcp: &mut tokio::net::TcpStream,
    got: &mut String,
    done: impl Fn(&str) -> bool,
) {
    let mut buf = vec![0u8; 8192];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done(got) {
        let n = tokio::time::timeout_at(deadline, tcp.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no such answer in time: {got}"))
            .expect("read");
        assert!(n > 0, "connection closed: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

/// Reads `tcp` until the controller closes it (each read within 10 s), as text.
async fn read_to_close(tcp: &mut tokio::net::TcpStream) -> String {
    let mut got = String::new();
    let mut buf = vec![0u8; 8192];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("the connection stays open: {got}"))
            .expect("read");
        if n == 0 {
            return got;
        }
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

/// While Redis does not answer, at most `sip.max_pending_invites` UDP INVITEs wait for it;
/// the rest are dropped and counted, and once those are answered INVITEs are taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_invites_waiting_on_redis_are_capped() {
    let Stalled {
        _redis,
        proxy,
        controller,
        udp,
    } = stalled("3s", &[("CONFROUTE_SIP__MAX_PENDING_INVITES", "2")]).await;
    for i in 0..5 {
        let msg = invite(
            &format!("sip:held{i}@router"),
            udp.port(),
            &format!("z9hG4bKheld{i}"),
            "",
        );
        udp.socket.send_to(msg.as_bytes(), udp.to).expect("send");
    }
    let dropped = |m: &str| metric(m, r#"confroute_sip_dropped_total{reason="overloaded"}"#);
    let url = controller.http_url();
    confroute_tests::harness::wait_for_async(
        "three INVITEs dropped",
        Duration::from_secs(5),
        || async { (dropped(&scrape(&url).await) == 3.0).then_some(()) },
    )
    .await
    .expect("dropped past the limit");
    // Retransmissions of all five meanwhile: the two waiting on Redis get 100 Trying (again)
    // from the transaction table; the three not taken are dropped again.
    for i in 0..5 {
        let msg = invite(
            &format!("sip:held{i}@router"),
            udp.port(),
            &format!("z9hG4bKheld{i}"),
            "",
        );
        udp.socket.send_to(msg.as_bytes(), udp.to).expect("send");
    }
    // The two taken are answered at their deadline; nothing else was.
    udp.socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let (mut trying, mut answered) = (Vec::new(), Vec::new());
    let mut buf = [0u8; 8192];
    while answered.len() < 2 {
        let n = udp.socket.recv(&mut buf).expect("an answer");
        let a = String::from_utf8_lossy(&buf[..n]).into_owned();
        let call = header(&a, "Call-ID").unwrap_or("").to_string();
        match status(&a) {
            100 => trying.push(call),
            503 => {
                // As a caller does: otherwise the 503 is resent (it followed a 100).
                let branch = call.trim_end_matches("@test");
                let sent = invite(
                    &format!("sip:{}@router", branch.trim_start_matches("z9hG4bK")),
                    udp.port(),
                    branch,
                    "",
                );
                udp.socket
                    .send_to(ack_for(&sent, &a).as_bytes(), udp.to)
                    .expect("send");
                answered.push(call)
            }
            other => panic!("unexpected {other}: {a}"),
        }
    }
    answered.sort();
    answered.dedup();
    // Each waiting one got 100 Trying after 200 ms and again for its retransmission.
    assert_eq!(trying.len(), 4, "{trying:?}");
    trying.sort();
    trying.dedup();
    assert_eq!(
        answered.len(),
        2,
        "two different INVITEs answered: {answered:?}"
    );
    assert_eq!(trying, answered, "only the waiting ones got 100 Trying");
    assert_eq!(dropped(&scrape(&url).await), 6.0);
    udp.silence(b"\r\n\r\n", Duration::from_millis(300));
    proxy.heal();
    let retry = (0..5)
        .find(|i| !answered.contains(&format!("z9hG4bKheld{i}@test")))
        .expect("a dropped INVITE");
    let again = udp.exchange(&invite(
        &format!("sip:held{retry}@router"),
        udp.port(),
        &format!("z9hG4bKheld{retry}"),
        "",
    ));
    assert_eq!(
        status(&again),
        302,
        "the dropped INVITE's retransmission: {again}"
    );
    assert_eq!(dropped(&scrape(&url).await), 6.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_transaction_table_still_gives_retransmissions_the_same_to_tag() {
    let s = setup(&[("CONFROUTE_SIP__MAX_TRANSACTIONS", "32")]).await;
    let udp = Udp::new(s.controller.sip_addr());
    // Long branches are kept as a digest; they fill the table all the same.
    let long = "x".repeat(2000);
    for i in 0..300 {
        let a = udp.exchange(&invite(
            "sip:fill@router",
            udp.port(),
            &format!("z9hG4bKfill{i}{long}"),
            "",
        ));
        assert_eq!(status(&a), 302, "{a}");
    }
    let msg = invite("sip:fill@router", udp.port(), "z9hG4bKunkept", "");
    let first = udp.exchange(&msg);
    let before = scrape(&s.controller.http_url()).await;
    let second = udp.exchange(&msg);
    let after = scrape(&s.controller.http_url()).await;
    let lookups = r#"confroute_redis_request_duration_seconds_count{op="lookup"}"#;
    assert_eq!(
        metric(&after, lookups) - metric(&before, lookups),
        1.0,
        "not remembered: routed again"
    );
    assert_eq!(first, second, "the same answer, To-tag included");
}

/// Over UDP, a 100 Trying stops the sender's retransmissions: an INVITE slow to route that
/// the full transaction table could not hold is sent none, since its final answer, sent
/// once, is never resent. It gets that final answer, and nothing before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invite_the_full_table_cannot_hold_is_not_sent_100_trying_over_udp() {
    let Stalled {
        _redis,
        proxy: _proxy,
        controller,
        udp: _warm,
    } = stalled("2s", &[("CONFROUTE_SIP__MAX_TRANSACTIONS", "32")]).await;
    // One entry per shard: 600 transactions fill all 32 (each stays until Timer H, 32 s).
    let fill = Udp::new(controller.sip_addr());
    for i in 0..600 {
        let msg = invite(
            "sip:fill@router",
            fill.port(),
            &format!("z9hG4bKfull{i}"),
            "",
        );
        fill.socket.send_to(msg.as_bytes(), fill.to).expect("send");
    }
    let udp = Udp::new(controller.sip_addr());
    let msg = invite("sip:unkept@router", udp.port(), "z9hG4bKunkept", "");
    udp.socket.send_to(msg.as_bytes(), udp.to).expect("send");
    // Routing gives up at its 2 s deadline; a 100 would come at 200 ms.
    let first = udp.recv();
    assert_eq!(
        status(&first),
        503,
        "the first answer is the final one: {first}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_copies_vias_from_to_callid_cseq_with_compact_and_folded_headers() {
    let s = setup(&[]).await;
    let udp = Udp::new(s.controller.sip_addr());
    let port = udp.port();
    let msg = format!(
        "INVITE sip:compact@router SIP/2.0\r\n\
         v: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKtop;rport\r\n\
         Via: SIP/2.0/TCP proxy1.example:5060;branch=z9hG4bKp1,\r\n SIP/2.0/UDP proxy2.example;branch=z9hG4bKp2\r\n\
         Max-Forwards: 70\r\n\
         f: \"Bob\" <sip:bob@example.com>;tag=b1\r\n\
         t: <sip:compact@router>\r\n\
         i: folded-call@test\r\n\
         CSeq: 7\r\n INVITE\r\n\
         l: 0\r\n\r\n"
    );
    let answer = udp.exchange(&msg);
    assert_eq!(status(&answer), 302, "{answer}");
    let vias: Vec<&str> = answer
        .split("\r\n")
        .filter(|l| l.starts_with("Via: "))
        .collect();
    assert_eq!(
        vias,
        vec![
            format!("Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKtop;rport={port};received=127.0.0.1").as_str(),
            "Via: SIP/2.0/TCP proxy1.example:5060;branch=z9hG4bKp1, SIP/2.0/UDP proxy2.example;branch=z9hG4bKp2",
        ]
    );
    assert_eq!(
        header(&answer, "From"),
        Some("\"Bob\" <sip:bob@example.com>;tag=b1")
    );
    let to = header(&answer, "To").expect("To");
    assert!(to.starts_with("<sip:compact@router>;tag="), "{to}");
    assert_eq!(header(&answer, "Call-ID"), Some("folded-call@test"));
    assert_eq!(header(&answer, "CSeq"), Some("7 INVITE"));
    assert_eq!(
        header(&answer, "Contact"),
        Some("<sip:compact@10.0.0.11:5060;transport=udp>")
    );
    assert_eq!(header(&answer, "X-Conference"), Some("compact"));
    assert_eq!(header(&answer, "X-Conference-Node"), Some("node-a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_pipelined_requests_each_get_an_answer() {
    let s = setup(&[]).await;
    let mut tcp = tokio::net::TcpStream::connect(s.controller.sip_addr())
        .await
        .expect("connect");
    let mut batch = String::new();
    for i in 0..3 {
        batch.push_str(
            &invite(
                &format!("sip:pipe-{i}@router"),
                5060,
                &format!("z9hG4bKpipe{i}"),
                "",
            )
            .replace("SIP/2.0/UDP", "SIP/2.0/TCP"),
        );
    }
    batch.push_str("\r\n\r\n");
    batch.push_str(
        "OPTIONS sip:router SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1;branch=z9hG4bKopt\r\n\
         From: <sip:p@x>;tag=1\r\nTo: <sip:router>\r\nCall-ID: opt@test\r\nCSeq: 1 OPTIONS\r\n\
         Content-Length: 4\r\n\r\nbody",
    );
    tcp.write_all(batch.as_bytes()).await.expect("write");
    let mut got = String::new();
    let mut buf = vec![0u8; 16384];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while got.matches("SIP/2.0 ").count() < 4 {
        let n = tokio::time::timeout_at(deadline, tcp.read(&mut buf))
            .await
            .expect("answers in time")
            .expect("read");
        assert!(n > 0, "connection closed early: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert_eq!(
        got.matches("SIP/2.0 302 Moved Temporarily").count(),
        3,
        "{got}"
    );
    assert_eq!(got.matches("SIP/2.0 200 OK").count(), 1, "{got}");
    assert!(
        got.starts_with("\r\nSIP/2.0") || got.contains("\r\n\r\n\r\n"),
        "the double-CRLF keepalive is answered with one CRLF: {got:?}"
    );
}

/// Over TCP the Content-Length frames the body (RFC 3261 §18.3): a request without one is
/// answered 400 naming it and the connection closed, rather than its body read as the start
/// of the next message and that message lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_request_without_content_length_is_refused_and_the_connection_closed() {
    let s = setup(&[]).await;
    let mut tcp = tokio::net::TcpStream::connect(s.controller.sip_addr())
        .await
        .expect("connect");
    let sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n";
    let no_length = invite("sip:nolength@router", 5060, "z9hG4bKnolen", "")
        .replace("SIP/2.0/UDP", "SIP/2.0/TCP")
        .replace("Content-Length: 0\r\n", "Content-Type: application/sdp\r\n");
    assert!(!no_length.contains("Content-Length"), "{no_length}");
    let batch = format!(
        "{no_length}{sdp}OPTIONS sip:router SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1;branch=z9hG4bKafter\r\n\
         From: <sip:p@x>;tag=1\r\nTo: <sip:router>\r\nCall-ID: after@test\r\nCSeq: 1 OPTIONS\r\n\
         Content-Length: 0\r\n\r\n"
    );
    tcp.write_all(batch.as_bytes()).await.expect("write");
    let mut got = String::new();
    let mut buf = vec![0u8; 16384];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n = tokio::time::timeout_at(deadline, tcp.read(&mut buf))
            .await
            .expect("answered and closed in time")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(got.starts_with("SIP/2.0 400 "), "{got}");
    assert!(got.contains("Content-Length is required"), "{got}");
    assert_eq!(
        got.matches("SIP/2.0 ").count(),
        1,
        "nothing else answered: {got}"
    );
    assert_eq!(
        s.store
            .lookup(&"nolength".parse().expect("name"))
            .await
            .expect("lookup"),
        None,
        "the refused INVITE placed nothing"
    );
}

/// A body arriving in pieces after its header block, the last piece carrying the next
/// request whole, frames both: the message is cut at its Content-Length however its bytes
/// come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_body_arriving_in_pieces_is_framed_with_the_request_after_it() {
    let s = setup(&[]).await;
    let mut tcp = tokio::net::TcpStream::connect(s.controller.sip_addr())
        .await
        .expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let options = |branch: &str, body: &str| {
        format!(
            "OPTIONS sip:router SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1;branch={branch}\r\n\
             From: <sip:p@x>;tag=1\r\nTo: <sip:router>\r\nCall-ID: {branch}@test\r\n\
             CSeq: 1 OPTIONS\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let first = options("z9hG4bKpieces1", "abcdefgh");
    let (head, body) = first.split_at(first.len() - 8);
    let pieces = [
        head.to_string(),
        body[..3].to_string(),
        body[3..5].to_string(),
        format!("{}{}", &body[5..], options("z9hG4bKpieces2", "")),
    ];
    for piece in &pieces {
        tcp.write_all(piece.as_bytes()).await.expect("write");
        tcp.flush().await.expect("flush");
        tokio::task::yield_now().await;
    }
    let mut got = String::new();
    let mut buf = vec![0u8; 16384];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while got.matches("SIP/2.0 200 OK").count() < 2 {
        let n = tokio::time::timeout_at(deadline, tcp.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("two answers in time: {got}"))
            .expect("read");
        assert!(n > 0, "connection closed early: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    for branch in ["z9hG4bKpieces1", "z9hG4bKpieces2"] {
        assert!(got.contains(branch), "{branch} answered: {got}");
    }
}

/// Line ends as lenient SIP stacks send them: LF alone (in a block without any CR) and line
/// ends before the start line (RFC 3261 §7.5), over UDP and in a TCP stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lf_only_messages_and_leading_line_ends_are_answered_over_udp_and_tcp() {
    let s = setup(&[]).await;
    let udp = Udp::new(s.controller.sip_addr());
    let lf_only = |uri: &str, port: u16, branch: &str, transport: &str| {
        invite(uri, port, branch, "Subject: lf\r\n")
            .replace("SIP/2.0/UDP", transport)
            .replace("\r\n", "\n")
    };
    let answer = udp.exchange(&lf_only(
        "sip:lf-udp@router",
        udp.port(),
        "z9hG4bKlf1",
        "SIP/2.0/UDP",
    ));
    assert_eq!(status(&answer), 302, "{answer}");
    assert_eq!(header(&answer, "X-Conference"), Some("lf-udp"), "{answer}");
    assert_eq!(
        header(&answer, "Call-ID"),
        Some("z9hG4bKlf1@test"),
        "{answer}"
    );
    assert!(
        !answer.replace("\r\n", "").contains('\n'),
        "the answer's lines end in CRLF: {answer:?}"
    );
    let prefixed = format!(
        "\r\n\r\n{}",
        invite("sip:crlf-udp@router", udp.port(), "z9hG4bKlf2", "")
    );
    let answer = udp.exchange(&prefixed);
    assert_eq!(status(&answer), 302, "{answer}");
    assert_eq!(
        header(&answer, "X-Conference"),
        Some("crlf-udp"),
        "{answer}"
    );

    // TCP: an LF-only message with a body, then a CRLF one, in one write; each is framed
    // by its own Content-Length.
    let mut tcp = tokio::net::TcpStream::connect(s.controller.sip_addr())
        .await
        .expect("connect");
    let with_body = lf_only("sip:lf-tcp@router", 5060, "z9hG4bKlf3", "SIP/2.0/TCP")
        .replace("Content-Length: 0\n\n", "Content-Length: 4\n\nv=0\n");
    let mut batch = with_body;
    batch.push_str(
        &invite("sip:after-lf@router", 5060, "z9hG4bKlf4", "")
            .replace("SIP/2.0/UDP", "SIP/2.0/TCP"),
    );
    tcp.write_all(batch.as_bytes()).await.expect("write");
    let mut got = String::new();
    read_until(&mut tcp, &mut got, |g| g.matches("SIP/2.0 ").count() >= 2).await;
    assert_eq!(
        got.matches("SIP/2.0 302 Moved Temporarily").count(),
        2,
        "{got}"
    );
    assert!(got.contains("X-Conference: lf-tcp\r\n"), "{got}");
    assert!(got.contains("X-Conference: after-lf\r\n"), "{got}");
}

/// A TCP message whose Content-Length cannot frame it (not a number, given twice: 400; past
/// the message limit: 513, RFC 3261 §21.5.14) gets its answer naming the fault, then the
/// connection closes: what follows in the stream cannot be told apart from its body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_message_with_an_unusable_content_length_is_answered_then_closed() {
    let s = setup(&[]).await;
    let cases = [
        ("Content-Length: abc", 400, "Content-Length is not a number"),
        ("Content-Length: +3", 400, "Content-Length is not a number"),
        (
            "Content-Length: 3\r\nl: 0",
            400,
            "more than one Content-Length header",
        ),
        ("Content-Length: 99999999", 513, "larger than the limit"),
    ];
    for (i, (length, code, why)) in cases.iter().enumerate() {
        let mut tcp = tokio::net::TcpStream::connect(s.controller.sip_addr())
            .await
            .expect("connect");
        let msg = invite(
            &format!("sip:framing-{i}@router"),
            5060,
            &format!("z9hG4bKframing{i}"),
            "",
        )
        .replace("SIP/2.0/UDP", "SIP/2.0/TCP")
        .replace("Content-Length: 0", length);
        tcp.write_all(msg.as_bytes()).await.expect("write");
        // The body a huge length announces follows, unread: the answer still arrives whole
        // before the close (no reset while input is pending).
        if length.contains("99999999") {
            let _ = tcp.write_all(&vec![b'x'; 256 * 1024]).await;
        }
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut got)).await;
        let got = String::from_utf8_lossy(&got).into_owned();
        assert!(
            matches!(read, Ok(Ok(_))),
            "closed cleanly after the answer: {read:?} {got}"
        );
        if length.contains("99999999") {
            // The controller still takes in the rest of that body for a while after its
            // answer: the peer's writes meet no reset.
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                tcp.write_all(&vec![b'x'; 64 * 1024])
                    .await
                    .expect("the rest of the body is taken in, not reset");
            }
        }
        assert_eq!(status(&got), *code, "{length}: {got}");
        assert!(
            header(&got, "Warning").is_some_and(|w| w.contains(why)),
            "{length}: {got}"
        );
        assert_eq!(got.matches("SIP/2.0 ").count(), 1, "{got}");
    }
    // Each answer counted under its own code, not `other`.
    let m = scrape(&s.controller.http_url()).await;
    for (code, n) in [("400", 3.0), ("513", 1.0)] {
        let series = format!(r#"confroute_sip_requests_total{{code="{code}",method="INVITE"}}"#);
        assert_eq!(metric(&m, &series), n, "{series}\n{m}");
    }
}

/// The value of header `name` in a raw message, as bytes.
fn raw_header<'a>(msg: &'a [u8], name: &str) -> Option<&'a [u8]> {
    msg.split(|b| *b == b'\n').find_map(|line| {
        let colon = line.iter().position(|b| *b == b':')?;
        let n = std::str::from_utf8(&line[..colon]).ok()?;
        n.eq_ignore_ascii_case(name)
            .then(|| line[colon + 1..].trim_ascii())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latin1_headers_are_answered_with_their_bytes_copied_over_udp_and_tcp() {
    let s = setup(&[]).await;
    // `M\xfcller`: a Latin-1 display name, as older PBXs send it.
    let latin1 = |msg: String| -> Vec<u8> {
        let msg = msg.replace("From: <sip:alice", "From: \"M\u{1}ller\" <sip:alice");
        msg.bytes().map(|b| if b == 1 { 0xfc } else { b }).collect()
    };
    let from = b"\"M\xfcller\" <sip:alice@example.com>;tag=a1".as_slice();

    let udp = Udp::new(s.controller.sip_addr());
    let msg = latin1(invite("sip:latin@router", udp.port(), "z9hG4bKlatin", ""));
    assert_eq!(raw_header(&msg, "From"), Some(from), "the request as meant");
    udp.socket.send_to(&msg, udp.to).expect("send");
    let mut buf = [0u8; 8192];
    let n = udp.socket.recv(&mut buf).expect("an answer over UDP");
    let answer = &buf[..n];
    assert!(
        answer.starts_with(b"SIP/2.0 302 "),
        "{}",
        String::from_utf8_lossy(answer)
    );
    assert_eq!(
        raw_header(answer, "From"),
        Some(from),
        "From copied byte for byte"
    );
    // A Latin-1 byte in the name: refused, naming the character the byte stands for.
    let bad: Vec<u8> = invite("sip:n\u{1}u@router", udp.port(), "z9hG4bKlatinname", "")
        .bytes()
        .map(|b| if b == 1 { 0xff } else { b })
        .collect();
    udp.socket.send_to(&bad, udp.to).expect("send");
    let n = udp.socket.recv(&mut buf).expect("an answer over UDP");
    let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert_eq!(status(&answer), 404, "{answer}");
    assert!(
        header(&answer, "Warning").is_some_and(|w| w.contains("U+00FF at byte 1")),
        "{answer}"
    );

    // Over TCP the connection stays up: the request after it is answered too.
    let mut tcp = tokio::net::TcpStream::connect(s.controller.sip_addr())
        .await
        .expect("connect");
    let mut batch = latin1(
        invite("sip:latin@router", 5060, "z9hG4bKlatintcp", "")
            .replace("SIP/2.0/UDP", "SIP/2.0/TCP"),
    );
    batch.extend_from_slice(
        b"OPTIONS sip:router SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1;branch=z9hG4bKafter\r\n\
          From: <sip:p@x>;tag=1\r\nTo: <sip:router>\r\nCall-ID: after@test\r\n\
          CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
    );
    tcp.write_all(&batch).await.expect("write");
    let mut got: Vec<u8> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while got.windows(8).filter(|w| w == b"SIP/2.0 ").count() < 2 {
        let n = tokio::time::timeout_at(deadline, tcp.read(&mut buf))
            .await
            .expect("answers in time")
            .expect("read");
        assert!(
            n > 0,
            "connection closed: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.contains("SIP/2.0 302 ") && text.contains("SIP/2.0 200 OK"),
        "{text}"
    );
    assert!(got.windows(from.len()).any(|w| w == from), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_folded_lines_are_joined_and_answered() {
    let s = setup(&[]).await;
    let udp = Udp::new(s.controller.sip_addr());
    let folds = " x\r\n".repeat(3000);
    let msg = format!(
        "OPTIONS sip:router SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{};branch=z9hG4bKfold\r\n\
         Subject: a\r\n{folds}From: <sip:p@x>;tag=1\r\nTo: <sip:router>\r\n\
         Call-ID: fold@test\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
        udp.port()
    );
    assert!(msg.len() < 16 * 1024, "within the default message limit");
    let answer = udp.exchange(&msg);
    assert_eq!(status(&answer), 200, "{answer}");
}

/// A header line that is skipped (no colon) keeps its folded continuation to itself: the
/// Via before it is answered as sent, so the sender matches the 400 to its request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fold_of_a_skipped_line_is_not_joined_to_the_header_before_it() {
    let s = setup(&[]).await;
    let udp = Udp::new(s.controller.sip_addr());
    let msg = format!(
        "OPTIONS sip:router SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{};branch=z9hG4bKskipfold\r\n\
         NoColon\r\n x\r\nFrom: <sip:p@x>;tag=1\r\nTo: <sip:router>\r\n\
         Call-ID: skipfold@test\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
        udp.port()
    );
    let answer = udp.exchange(&msg);
    assert_eq!(status(&answer), 400, "{answer}");
    let via = header(&answer, "Via").expect("Via");
    assert!(
        via.starts_with(&format!(
            "SIP/2.0/UDP 127.0.0.1:{};branch=z9hG4bKskipfold;",
            udp.port()
        )) || via
            == format!(
                "SIP/2.0/UDP 127.0.0.1:{};branch=z9hG4bKskipfold",
                udp.port()
            ),
        "{answer}"
    );
}

/// A CSeq number of 2³¹ or more breaks RFC 3261 §8.1.1.5, and the 400 says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cseq_of_two_to_the_31_or_more_is_named_in_the_400() {
    let s = setup(&[]).await;
    let udp = Udp::new(s.controller.sip_addr());
    let msg = format!(
        "OPTIONS sip:router SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{};branch=z9hG4bKbigcseq\r\n\
         From: <sip:p@x>;tag=1\r\nTo: <sip:router>\r\n\
         Call-ID: bigcseq@test\r\nCSeq: 3000000000 OPTIONS\r\nContent-Length: 0\r\n\r\n",
        udp.port()
    );
    let answer = udp.exchange(&msg);
    assert_eq!(status(&answer), 400, "{answer}");
    assert!(
        header(&answer, "Warning").is_some_and(|w| w.contains("2^31")),
        "{answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_precise_answers_and_garbage_is_counted() {
    let s = setup(&[]).await;
    let udp = Udp::new(s.controller.sip_addr());
    let port = udp.port();
    // `tag=` inside a quoted parameter value of To.
    let quoted_to = invite("sip:quoted@router", port, "z9hG4bKquoted", "").replace(
        "To: <sip:quoted@router>",
        "To: <sip:quoted@router>;foo=\"a;tag=1\"",
    );
    let cases: Vec<(String, u16, &str)> = vec![
        (
            invite("tel:+15555550101", port, "z9hG4bKtel", ""),
            416,
            "tel",
        ),
        (
            invite("sip:%00bad@router", port, "z9hG4bKnul", ""),
            404,
            "NUL",
        ),
        (
            invite("sip:caf%C3%A9@router", port, "z9hG4bKutf", ""),
            404,
            "non-ASCII",
        ),
        (
            invite(
                &format!("sip:{}@router", "x".repeat(129)),
                port,
                "z9hG4bKlong",
                "",
            ),
            404,
            "129 bytes",
        ),
        // Only a telephone number's user part has parameters to drop; elsewhere `;` is part
        // of the name, and no name may hold it.
        (
            invite("sip:sales;x=1@router", port, "z9hG4bKsemi", ""),
            404,
            "';'",
        ),
        // A user may hold `?` (RFC 4475 §3.1.1.5): a user part, just not a conference name.
        (
            invite("sip:sales?x@router", port, "z9hG4bKquery", ""),
            404,
            "'?'",
        ),
        // userinfo `a:b` is user `a` with a password: the conference is `a`.
        (invite("sip:a:b@router", port, "z9hG4bKcolon", ""), 302, ""),
        (
            invite("sip:hops@router", port, "z9hG4bKmf", "")
                .replace("Max-Forwards: 70", "Max-Forwards: 0"),
            483,
            "Max-Forwards",
        ),
        (
            invite("sip:hops2@router", port, "z9hG4bKmf2", "")
                .replace("Max-Forwards: 70", "Max-Forwards: 00"),
            483,
            "Max-Forwards",
        ),
        // The version is case-insensitive (RFC 3261 §7.1).
        (
            invite("sip:lower@router", port, "z9hG4bKver", "").replacen(
                "SIP/2.0\r\n",
                "sip/2.0\r\n",
                1,
            ),
            302,
            "",
        ),
        (
            invite("sip:req@router", port, "z9hG4bKreq", "Require: foo\r\n"),
            420,
            "extension",
        ),
        // Met by a redirect server as it is: no reliable provisional answer, no 2xx.
        (
            invite(
                "sip:req2@router",
                port,
                "z9hG4bKreq2",
                "Require: 100rel, timer\r\nRequire: TIMER\r\n",
            ),
            302,
            "",
        ),
        (
            invite(
                "sip:req3@router",
                port,
                "z9hG4bKreq3",
                "Require: 100rel, foo\r\n",
            ),
            420,
            "extension",
        ),
        (
            invite("sip:x@router", port, "z9hG4bKnocall", "")
                .replace("Call-ID: z9hG4bKnocall@test\r\n", ""),
            400,
            "Call-ID",
        ),
        (
            invite("sip:x@router", port, "z9hG4bKcseq", "")
                .replace("CSeq: 1 INVITE", "CSeq: 1 BYE"),
            400,
            "CSeq",
        ),
        (
            invite("sip:x@router", port, "z9hG4bKcl", "")
                .replace("Content-Length: 0", "Content-Length: 50"),
            400,
            "Content-Length",
        ),
        (
            invite("sip:emptytag@router", port, "z9hG4bKemptytag", "").replace(
                "To: <sip:emptytag@router>",
                "To: <sip:emptytag@router>;tag=",
            ),
            400,
            "To tag",
        ),
        // A request line with blanks it must not hold (RFC 4475 §3.1.2.8-10) is answered,
        // not dropped to be retransmitted for 32 s.
        (
            invite("sip:lws@router", port, "z9hG4bKlws", "").replacen(
                "INVITE sip:lws@router SIP/2.0",
                "INVITE  sip:lws@router  SIP/2.0",
                1,
            ),
            400,
            "single spaces",
        ),
        (
            invite("sip:trws@router", port, "z9hG4bKtrws", "").replacen(
                "INVITE sip:trws@router SIP/2.0",
                "INVITE sip:trws@router SIP/2.0 ",
                1,
            ),
            400,
            "single spaces",
        ),
        (
            invite("sip:lwsuri@router", port, "z9hG4bKlwsuri", "").replacen(
                "INVITE sip:lwsuri@router SIP/2.0",
                "INVITE sip:lwsuri@router;lr=foo bar SIP/2.0",
                1,
            ),
            400,
            "whitespace",
        ),
        // RFC 3261 numbers are `1*DIGIT`: a sign is not a number, and a CSeq is below 2³¹
        // (§8.1.1.5).
        (
            invite("sip:x@router", port, "z9hG4bKclplus", "")
                .replace("Content-Length: 0", "Content-Length: +0"),
            400,
            "Content-Length is not a number",
        ),
        (
            invite("sip:x@router", port, "z9hG4bKcseqbig", "")
                .replace("CSeq: 1 INVITE", "CSeq: 2147483648 INVITE"),
            400,
            "CSeq",
        ),
        (
            invite("sip:x@router", port, "z9hG4bKcseqplus", "")
                .replace("CSeq: 1 INVITE", "CSeq: +1 INVITE"),
            400,
            "CSeq",
        ),
        (
            invite("sip:x@router", port, "z9hG4bKmfplus", "")
                .replace("Max-Forwards: 70", "Max-Forwards: +70"),
            400,
            "Max-Forwards is not a number",
        ),
        (
            invite("sip:cseqmax@router", port, "z9hG4bKcseqmax", "")
                .replace("CSeq: 1 INVITE", "CSeq: 2147483647 INVITE"),
            302,
            "",
        ),
        (
            invite(
                "sip:x@router",
                port,
                "z9hG4bKtwo",
                "From: <sip:b@c>;tag=2\r\n",
            ),
            400,
            "more than one From",
        ),
        (
            invite(
                "sip:x@router",
                port,
                "z9hG4bKnocolon",
                "Subject without colon\r\n",
            ),
            400,
            "no colon",
        ),
        (
            invite("sip:x@router", port, "z9hG4bKname", "Bad Name: x\r\n"),
            400,
            "not a token",
        ),
        // Single-valued headers given twice: which one counts would be a guess.
        (
            invite("sip:x@router", port, "z9hG4bKtwocl", "l: 0\r\n"),
            400,
            "more than one Content-Length",
        ),
        (
            invite("sip:x@router", port, "z9hG4bKtwomf", "Max-Forwards: 0\r\n"),
            400,
            "more than one Max-Forwards",
        ),
        // Another SIP version: RFC 3261 §21.5.7.
        (
            invite("sip:v3@router", port, "z9hG4bKv3", "").replacen(
                "SIP/2.0\r\n",
                "SIP/3.0\r\n",
                1,
            ),
            505,
            "SIP/3.0 is not supported",
        ),
        (
            invite("sip:router", port, "z9hG4bKv3opt", "")
                .replacen("INVITE sip:router SIP/2.0", "OPTIONS sip:router SIP/2.1", 1)
                .replace("CSeq: 1 INVITE", "CSeq: 1 OPTIONS"),
            505,
            "SIP/2.1",
        ),
        (
            invite("noscheme", port, "z9hG4bKnoscheme", ""),
            400,
            "no scheme",
        ),
        // `tag=` inside a quoted parameter value is no To-tag: a first INVITE, redirected.
        (quoted_to.clone(), 302, ""),
        // A re-INVITE routed here: redirecting it would move a live call (RFC 3261 §12.2.2).
        (
            invite("sip:redial@router", port, "z9hG4bKretag", "")
                .replace("To: <sip:redial@router>", "To: <sip:redial@router>;tag=b7"),
            481,
            "no dialogs",
        ),
    ];
    for (msg, want, why) in &cases {
        let answer = udp.exchange(msg);
        assert_eq!(status(&answer), *want, "{msg}\n---\n{answer}");
        if !why.is_empty() {
            let warning = header(&answer, "Warning").unwrap_or("");
            assert!(
                warning.contains(why),
                "Warning should mention {why}: {answer}"
            );
        }
    }
    // Another version's answers are counted under their own code, not `other`.
    let m = scrape(&s.controller.http_url()).await;
    for method in ["INVITE", "OPTIONS"] {
        let series = format!(r#"confroute_sip_requests_total{{code="505",method="{method}"}}"#);
        assert_eq!(metric(&m, &series), 1.0, "{series}");
    }
    // That INVITE's answer adds its own To-tag after the quoted value.
    let quoted = udp.exchange(&quoted_to);
    let to = header(&quoted, "To").unwrap_or("");
    assert!(
        to.starts_with("<sip:quoted@router>;foo=\"a;tag=1\";tag="),
        "{quoted}"
    );
    // Refusals change nothing: the conferences they named were not placed.
    for name in ["v3", "redial"] {
        let url = format!("{}/v1/conferences/{name}", s.controller.http_url());
        let got = fixtures::http().get(&url).send().await.expect("GET");
        assert_eq!(got.status().as_u16(), 404, "{name} was placed");
    }
    let before = scrape(&s.controller.http_url()).await;
    udp.silence(b"this is not SIP\r\n\r\n", Duration::from_millis(300));
    udp.silence(
        b"GET / HTTP/1.1\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKh\r\n\r\n",
        Duration::from_millis(300),
    );
    udp.silence(
        b"\x16\x03\x01\x02\x00\x01\x00\x01",
        Duration::from_millis(300),
    );
    udp.silence(
        b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKr\r\n\r\n",
        Duration::from_millis(300),
    );
    udp.silence(
        b"INVITE sip:novia@router SIP/2.0\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:b@c>\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\n\r\n",
        Duration::from_millis(300),
    );
    // A bare LF or CR in a value would end a line for a laxer reader of the copied header:
    // here it would add a Contact of the caller's choosing to the 302.
    for bare in ["\n", "\r"] {
        let smuggled = invite("sip:smuggle@router", port, "z9hG4bKsmuggle", "").replace(
            "Call-ID: z9hG4bKsmuggle@test",
            &format!("Call-ID: z9hG4bKsmuggle@test{bare}Contact: <sip:evil@203.0.113.9>"),
        );
        udp.silence(smuggled.as_bytes(), Duration::from_millis(300));
    }
    // A NUL would be copied into the answer, to readers that end strings there.
    udp.silence(
        invite("sip:nul@router", port, "z9hG4bKnul0", "")
            .replace("Call-ID: z9hG4bKnul0@test", "Call-ID: \0z9hG4bKnul0@test")
            .as_bytes(),
        Duration::from_millis(300),
    );
    // Over UDP without rport, a Via port of 0 leaves nowhere to answer.
    udp.silence(
        invite("sip:port0@router", 0, "z9hG4bKport0", "").as_bytes(),
        Duration::from_millis(300),
    );
    let after = scrape(&s.controller.http_url()).await;
    let dropped =
        |m: &str, r: &str| metric(m, &format!("confroute_sip_dropped_total{{reason=\"{r}\"}}"));
    assert_eq!(
        dropped(&after, "garbage") - dropped(&before, "garbage"),
        6.0
    );
    assert_eq!(
        dropped(&after, "response") - dropped(&before, "response"),
        1.0
    );
    assert_eq!(dropped(&after, "no_via") - dropped(&before, "no_via"), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conference_header_takes_precedence_and_percent_escapes_decode() {
    let s = setup(&[]).await;
    let udp = Udp::new(s.controller.sip_addr());
    let a = udp.exchange(&invite(
        "sip:ignored@router",
        udp.port(),
        "z9hG4bKhdr",
        "X-Conference: from-header\r\n",
    ));
    assert_eq!(status(&a), 302, "{a}");
    assert_eq!(header(&a, "X-Conference"), Some("from-header"));
    assert_eq!(
        header(&a, "Contact"),
        Some("<sip:from-header@10.0.0.11:5060;transport=udp>")
    );
    let b = udp.exchange(&invite(
        "sip:x@router",
        udp.port(),
        "z9hG4bKhdrbad",
        "X-Conference: bad name\r\n",
    ));
    assert_eq!(status(&b), 404, "{b}");
    let c = udp.exchange(&invite(
        "sip:%2B15555550101@router",
        udp.port(),
        "z9hG4bKpct",
        "",
    ));
    assert_eq!(status(&c), 302, "{c}");
    assert_eq!(header(&c, "X-Conference"), Some("+15555550101"));
    // A carrier's number-portability parameters in the user part (RFC 3966) are not part of
    // the number that names the conference.
    let d = udp.exchange(&invite(
        "sip:+15555550101;npdi;rn=+15555550000@router;user=phone",
        udp.port(),
        "z9hG4bKlnp",
        "",
    ));
    assert_eq!(status(&d), 302, "{d}");
    assert_eq!(header(&d, "X-Conference"), Some("+15555550101"));
    assert_eq!(
        header(&d, "Contact"),
        Some("<sip:+15555550101@10.0.0.11:5060;transport=udp>")
    );
    // The same with the number's `+` escaped: the number is told as decoded.
    let d2 = udp.exchange(&invite(
        "sip:%2B15555550101;npdi;rn=%2B15555550000@router;user=phone",
        udp.port(),
        "z9hG4bKlnpesc",
        "",
    ));
    assert_eq!(status(&d2), 302, "{d2}");
    assert_eq!(header(&d2, "X-Conference"), Some("+15555550101"));
    let e = udp.exchange(&invite("sip:;npdi@router", udp.port(), "z9hG4bKnonum", ""));
    assert_eq!(status(&e), 484, "{e}");
    // Two headers naming different conferences are refused; repeating the same one is not.
    let f = udp.exchange(&invite(
        "sip:x@router",
        udp.port(),
        "z9hG4bKtwohdr",
        "X-Conference: room-a\r\nX-Conference: room-b\r\n",
    ));
    assert_eq!(status(&f), 400, "{f}");
    assert!(
        header(&f, "Warning").is_some_and(|w| w.contains("name different conferences")),
        "{f}"
    );
    assert!(header(&f, "Contact").is_none(), "{f}");
    for room in ["room-a", "room-b"] {
        let name = confroute_shared::name::ConferenceName::parse(room).expect("name");
        let rec = s.store.lookup(&name).await.expect("read");
        assert!(rec.is_none(), "the refused INVITE claimed {room}");
    }
    let g = udp.exchange(&invite(
        "sip:x@router",
        udp.port(),
        "z9hG4bKsamehdr",
        "X-Conference: room-a\r\nX-Conference:  room-a\r\n",
    ));
    assert_eq!(status(&g), 302, "{g}");
    assert_eq!(header(&g, "X-Conference"), Some("room-a"));
}

/// RFC 3261 §25.1 lets a Via put whitespace around its slashes and sent-by's colon; the
/// answer still goes where the Via says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_via_with_whitespace_the_grammar_allows_is_answered() {
    let s = setup(&[]).await;
    let udp = Udp::new(s.controller.sip_addr());
    let msg = invite("sip:spaced@router", udp.port(), "z9hG4bKspaced", "").replace(
        &format!("Via: SIP/2.0/UDP 127.0.0.1:{};", udp.port()),
        &format!("Via: SIP / 2.0 / UDP 127.0.0.1 : {} ;", udp.port()),
    );
    assert!(msg.contains("SIP / 2.0 / UDP"), "{msg}");
    let a = udp.exchange(&msg);
    assert_eq!(status(&a), 302, "{a}");
    assert!(
        header(&a, "Via").is_some_and(|v| v.contains("received=127.0.0.1")),
        "{a}"
    );
}

/// A pre-RFC 3261 branch keys its transaction on the top Via: the CANCEL and the ACK carry
/// that one alone, while the INVITE may have the whole path in one Via header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_style_transaction_is_matched_by_its_top_via_alone() {
    let s = setup(&[]).await;
    let udp = Udp::new(s.controller.sip_addr());
    let port = udp.port();
    let msg = invite("sip:oldstyle@router", port, "1", "").replace(
        &format!("Via: SIP/2.0/UDP 127.0.0.1:{port};branch=1\r\n"),
        &format!(
            "Via: SIP/2.0/UDP 127.0.0.1:{port};branch=1, SIP/2.0/UDP 192.0.2.7:5060;branch=2\r\n"
        ),
    );
    assert!(msg.contains("branch=2"), "{msg}");
    let a = udp.exchange(&msg);
    assert_eq!(status(&a), 302, "{a}");
    let cancel = invite("sip:oldstyle@router", port, "1", "")
        .replace("INVITE sip:oldstyle@router", "CANCEL sip:oldstyle@router")
        .replace("CSeq: 1 INVITE", "CSeq: 1 CANCEL");
    let c = udp.exchange(&cancel);
    assert_eq!(status(&c), 200, "the CANCEL matches its INVITE: {c}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_sources_get_403_when_an_acl_is_set() {
    let s = setup(&[("CONFROUTE_SIP__TRUSTED_CIDRS", "[\"10.0.0.0/8\"]")]).await;
    let udp = Udp::new(s.controller.sip_addr());
    let a = udp.exchange(&invite("sip:acl@router", udp.port(), "z9hG4bKacl", ""));
    assert_eq!(status(&a), 403, "{a}");
    let m = scrape(&s.controller.http_url()).await;
    assert_eq!(
        metric(&m, r#"confroute_route_total{outcome="claimed"}"#),
        0.0,
        "no routing for untrusted sources"
    );

    let trusted = setup(&[("CONFROUTE_SIP__TRUSTED_CIDRS", "[\"127.0.0.0/8\"]")]).await;
    let udp = Udp::new(trusted.controller.sip_addr());
    let b = udp.exchange(&invite("sip:acl@router", udp.port(), "z9hG4bKacl2", ""));
    assert_eq!(status(&b), 302, "{b}");
}

fn options_tcp(branch: &str, call_id: &str) -> String {
    format!(
        "OPTIONS sip:router SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1;branch={branch}\r\n\
         From: <sip:p@x>;tag=1\r\nTo: <sip:router>\r\nCall-ID: {call_id}\r\n\
         CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    )
}

/// Whether the controller ends `tcp` (EOF or reset) within a few seconds.
async fn closed_by_peer(tcp: &mut tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 512];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// Sends an OPTIONS on `tcp` and reads its 200.
async fn options_answered(tcp: &mut tokio::net::TcpStream, branch: &str) -> bool {
    if tcp
        .write_all(options_tcp(branch, branch).as_bytes())
        .await
        .is_err()
    {
        return false;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !got
        .iter()
        .position(|b| *b != b'\r' && *b != b'\n')
        .is_some_and(|start| got[start..].windows(4).any(|w| w == b"\r\n\r\n"))
    {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => return false,
        }
    }
    // Pongs to keepalive pings may come first.
    let start = got
        .iter()
        .take_while(|b| **b == b'\r' || **b == b'\n')
        .count();
    got[start..].starts_with(b"SIP/2.0 200 OK")
}

/// Sends OPTIONS whose answers are large, reading nothing, until the controller stops taking
/// them (or closes); returns how many were sent whole.
async fn flood_without_reading(tcp: &mut tokio::net::TcpStream) -> usize {
    // The answer copies the 8 KB Call-ID, so the socket buffers fill after a few thousand.
    let pad = "c".repeat(8000);
    const LIMIT: usize = 20_000;
    let mut sent = 0;
    while sent < LIMIT {
        let msg = options_tcp(&format!("z9hG4bKflood{sent}"), &format!("{pad}{sent}"));
        match tokio::time::timeout(Duration::from_secs(3), tcp.write_all(msg.as_bytes())).await {
            Ok(Ok(())) => sent += 1,
            Ok(Err(_)) | Err(_) => return sent,
        }
    }
    panic!("the controller read all {LIMIT} requests of a peer that reads nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_peer_that_never_reads_is_closed_after_the_idle_timeout() {
    let s = setup(&[
        ("CONFROUTE_SIP__TCP_MAX_CONNECTIONS", "1"),
        ("CONFROUTE_SIP__TCP_IDLE_TIMEOUT", "2s"),
    ])
    .await;
    let connect = || tokio::net::TcpStream::connect(s.controller.sip_addr());
    let mut stuck = connect().await.expect("connect");
    flood_without_reading(&mut stuck).await;
    // Its one slot comes free once its answers have waited the idle timeout.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut next = connect().await.expect("connect");
        if options_answered(&mut next, "z9hG4bKafter").await {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the connection that reads nothing still holds the only slot"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(stuck);
}

/// A connection that never sends a request (line-end keepalives are not one) is closed
/// after 10 s, long before the idle timeout: silent connections cannot hold the slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_connection_that_sends_no_request_frees_its_slot() {
    let s = setup(&[
        ("CONFROUTE_SIP__TCP_MAX_CONNECTIONS", "1"),
        ("CONFROUTE_SIP__TCP_IDLE_TIMEOUT", "5m"),
    ])
    .await;
    let connect = || tokio::net::TcpStream::connect(s.controller.sip_addr());
    let mut silent = connect().await.expect("connect");
    silent.write_all(b"\r\n\r\n").await.expect("keepalive");
    let started = tokio::time::Instant::now();
    let mut used = loop {
        let mut next = connect().await.expect("connect");
        if options_answered(&mut next, "z9hG4bKsilent").await {
            break next;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "a connection that sent no request still holds the only slot"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // A connection that has sent a request is held to the idle timeout only: still served
    // past the 10 s a silent one gets.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert!(
        options_answered(&mut used, "z9hG4bKused2").await,
        "a used connection is kept past 10 s"
    );
}

/// A peer that keeps a message coming a byte at a time (every byte inside the idle timeout)
/// loses its connection once the message has taken the idle timeout, so a few such peers
/// cannot hold every slot; line-end keepalives alone do not count as a message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_message_trickling_in_is_cut_off_and_frees_its_slot() {
    let s = setup(&[
        ("CONFROUTE_SIP__TCP_MAX_CONNECTIONS", "2"),
        ("CONFROUTE_SIP__TCP_IDLE_TIMEOUT", "2s"),
    ])
    .await;
    let connect = || tokio::net::TcpStream::connect(s.controller.sip_addr());
    let mut keepalive = connect().await.expect("connect");
    assert!(options_answered(&mut keepalive, "z9hG4bKkeep").await);
    let mut slow = connect().await.expect("connect");
    let message = options_tcp("z9hG4bKslow", "slow");
    let started = tokio::time::Instant::now();
    let mut closed = false;
    for (i, byte) in message.as_bytes().iter().enumerate() {
        if slow.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
        // The other peer sends single-CRLF keepalives at the same pace.
        if i % 2 == 0 {
            let _ = keepalive.write_all(b"\r\n").await;
        }
        if started.elapsed() > Duration::from_secs(12) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        if i > 2 && closed_soon(&mut slow).await {
            closed = true;
            break;
        }
    }
    assert!(
        closed,
        "a message trickling in for {:?} still holds its connection",
        started.elapsed()
    );
    let mut next = connect().await.expect("connect");
    assert!(
        options_answered(&mut next, "z9hG4bKnext").await,
        "the trickling peer's slot is free"
    );
    assert!(
        options_answered(&mut keepalive, "z9hG4bKkeep2").await,
        "keepalives alone keep a connection"
    );
    let m = scrape(&s.controller.http_url()).await;
    assert_eq!(
        metric(&m, r#"confroute_sip_dropped_total{reason="incomplete"}"#),
        1.0
    );
}

/// One address may hold `sip.tcp_max_connections_per_source` connections: past it its new
/// ones are closed at accept, while another address still gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_tcp_slot() {
    let s = setup(&[
        ("CONFROUTE_SIP__TCP_MAX_CONNECTIONS", "4"),
        ("CONFROUTE_SIP__TCP_MAX_CONNECTIONS_PER_SOURCE", "2"),
    ])
    .await;
    let from = |ip: &'static str| {
        let addr = s.controller.sip_addr();
        async move {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket
                .bind(format!("{ip}:0").parse().expect("address"))
                .expect("bind");
            socket.connect(addr).await.expect("connect")
        }
    };
    let mut a = from("127.0.0.1").await;
    let mut b = from("127.0.0.1").await;
    assert!(options_answered(&mut a, "z9hG4bKsrca").await);
    assert!(options_answered(&mut b, "z9hG4bKsrcb").await);
    let mut c = from("127.0.0.1").await;
    assert!(
        closed_by_peer(&mut c).await,
        "a third from one address is closed"
    );
    let mut other = from("127.0.0.2").await;
    assert!(
        options_answered(&mut other, "z9hG4bKsrco").await,
        "another address gets in"
    );
    // The address's place frees once one of its connections ends.
    drop(a);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut d = from("127.0.0.1").await;
        if options_answered(&mut d, "z9hG4bKsrcd").await {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a place frees when a connection ends"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = scrape(&s.controller.http_url()).await;
    assert!(
        metric(
            &m,
            r#"confroute_sip_dropped_total{reason="too_many_connections_from_source"}"#
        ) >= 1.0
    );
    assert_eq!(
        metric(
            &m,
            r#"confroute_sip_dropped_total{reason="too_many_connections"}"#
        ),
        0.0
    );
}

/// Whether the controller has closed `tcp` (checked without waiting long).
async fn closed_soon(tcp: &mut tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 512];
    matches!(
        tokio::time::timeout(Duration::from_millis(10), tcp.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_peer_that_sends_without_reading_is_held_back() {
    let s = setup(&[]).await;
    let mut tcp = tokio::net::TcpStream::connect(s.controller.sip_addr())
        .await
        .expect("connect");
    let sent = flood_without_reading(&mut tcp).await;
    // Held back, not dropped: every whole request sent is answered once the peer reads.
    let mut answered = 0;
    let mut tail: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 65536];
    while answered < sent {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .expect("answers keep coming")
            .expect("read");
        assert!(n > 0, "closed after {answered} of {sent} answers");
        tail.extend_from_slice(&buf[..n]);
        while let Some(end) = tail.windows(4).position(|w| w == b"\r\n\r\n") {
            assert!(tail.starts_with(b"SIP/2.0 200 OK"), "an OPTIONS answer");
            tail.drain(..end + 4);
            answered += 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_are_capped_and_untrusted_ones_closed_at_accept() {
    let s = setup(&[("CONFROUTE_SIP__TCP_MAX_CONNECTIONS", "2")]).await;
    let connect = || tokio::net::TcpStream::connect(s.controller.sip_addr());
    let mut a = connect().await.expect("connect");
    let mut b = connect().await.expect("connect");
    assert!(options_answered(&mut a, "z9hG4bKcapa").await);
    assert!(options_answered(&mut b, "z9hG4bKcapb").await);
    let mut c = connect().await.expect("the kernel accepts");
    assert!(closed_by_peer(&mut c).await, "a third connection is closed");
    drop(a);
    // The slot frees once the controller sees the close.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut d = connect().await.expect("connect");
        if options_answered(&mut d, "z9hG4bKcapd").await {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a slot frees when a connection ends"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        options_answered(&mut b, "z9hG4bKcapb2").await,
        "b untouched"
    );
    let m = scrape(&s.controller.http_url()).await;
    assert!(
        metric(
            &m,
            r#"confroute_sip_dropped_total{reason="too_many_connections"}"#
        ) >= 1.0
    );

    let acl = setup(&[("CONFROUTE_SIP__TRUSTED_CIDRS", "[\"10.0.0.0/8\"]")]).await;
    let mut tcp = tokio::net::TcpStream::connect(acl.controller.sip_addr())
        .await
        .expect("the kernel accepts");
    assert!(closed_by_peer(&mut tcp).await, "untrusted: closed at once");
    let m = scrape(&acl.controller.http_url()).await;
    assert_eq!(
        metric(
            &m,
            r#"confroute_sip_dropped_total{reason="untrusted_connection"}"#
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dual_stack_listener_matches_ipv4_peers_against_ipv4_cidrs() {
    let port = confroute_tests::harness::free_udp_tcp_port();
    let listen = format!("[::]:{port}");
    let s = setup(&[
        ("CONFROUTE_SIP__LISTEN", listen.as_str()),
        ("CONFROUTE_SIP__TRUSTED_CIDRS", "[\"127.0.0.0/8\"]"),
    ])
    .await;
    let udp = Udp::new(SocketAddr::from(([127, 0, 0, 1], port)));
    let msg = invite("sip:dual@router", udp.port(), "z9hG4bKdual", "").replace(
        &format!("SIP/2.0/UDP 127.0.0.1:{};", udp.port()),
        "SIP/2.0/UDP 192.0.2.1:5060;rport;",
    );
    let answer = udp.exchange(&msg);
    assert_eq!(status(&answer), 302, "{answer}");
    let via = header(&answer, "Via").unwrap_or("");
    assert!(
        via.contains("received=127.0.0.1;") || via.ends_with("received=127.0.0.1"),
        "plain IPv4 in received: {via}"
    );
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retransmissions_keep_their_to_tag_cancel_needs_its_invite_and_options_honour_require() {
    let s = setup(&[]).await;
    let udp = Udp::new(s.controller.sip_addr());
    let port = udp.port();
    let options = |branch: &str, extra: &str| {
        format!(
            "OPTIONS sip:router SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch={branch}\r\n\
             From: <sip:p@x>;tag=1\r\nTo: <sip:router>\r\nCall-ID: {branch}@test\r\n\
             CSeq: 1 OPTIONS\r\n{extra}Content-Length: 0\r\n\r\n"
        )
    };
    // Answers that are not remembered: a retransmission still gets the same To-tag.
    let bad_invite =
        invite("sip:x@router", port, "z9hG4bKre400", "").replace("CSeq: 1 INVITE", "CSeq: 1 BYE");
    for msg in [options("z9hG4bKreopt", ""), bad_invite] {
        let first = udp.exchange(&msg);
        let again = udp.exchange(&msg);
        assert_eq!(
            header(&first, "To"),
            header(&again, "To"),
            "{first}\n{again}"
        );
        assert!(header(&first, "To").is_some_and(|t| t.contains(";tag=")));
    }
    let other = udp.exchange(&options("z9hG4bKreopt2", ""));
    let first = udp.exchange(&options("z9hG4bKreopt", ""));
    assert_ne!(
        header(&other, "To"),
        header(&first, "To"),
        "another transaction, another tag"
    );

    // OPTIONS with an extension the router does not support: 420 naming it (RFC 3261 §8.2.2.3).
    let a = udp.exchange(&options("z9hG4bKreq", "Require: foo, bar\r\n"));
    assert_eq!(status(&a), 420, "{a}");
    assert_eq!(header(&a, "Unsupported"), Some("foo, bar"));
    // Only what it does not meet is named: `100rel` it does.
    let a = udp.exchange(&options("z9hG4bKreq2", "Require: 100rel, foo\r\n"));
    assert_eq!(status(&a), 420, "{a}");
    assert_eq!(header(&a, "Unsupported"), Some("foo"));

    // A CANCEL for an INVITE never seen: 481 (RFC 3261 §9.2).
    let cancel = invite("sip:ghost@router", port, "z9hG4bKghost", "")
        .replacen("INVITE sip:", "CANCEL sip:", 1)
        .replace("CSeq: 1 INVITE", "CSeq: 1 CANCEL");
    let a = udp.exchange(&cancel);
    assert_eq!(status(&a), 481, "{a}");
    let m = scrape(&s.controller.http_url()).await;
    assert_eq!(
        metric(
            &m,
            r#"confroute_sip_requests_total{code="481",method="CANCEL"}"#
        ),
        1.0
    );
}

/// On a wildcard listener (IPv4 and dual-stack) an answer leaves from the address its request
/// was sent to (RFC 3261 §18.2.2), not the one the kernel's route picks: 127.0.0.2 here,
/// where the route back to 127.0.0.1 would pick 127.0.0.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_answers_leave_from_the_address_the_request_was_sent_to() {
    for wildcard in ["0.0.0.0", "[::]"] {
        let port = confroute_tests::harness::free_udp_tcp_port();
        let listen = format!("{wildcard}:{port}");
        let s = setup(&[("CONFROUTE_SIP__LISTEN", listen.as_str())]).await;
        let target = SocketAddr::from(([127, 0, 0, 2], port));
        let udp = Udp::new(target);
        let options = format!(
            "OPTIONS sip:router SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{};branch=z9hG4bKsrc\r\n\
             From: <sip:p@x>;tag=1\r\nTo: <sip:router>\r\nCall-ID: src@test\r\n\
             CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
            udp.port()
        );
        let (answer, from) = udp.exchange_from(&options);
        assert_eq!(status(&answer), 200, "{answer}");
        assert_eq!(from, target, "answer's source on {listen}");
        drop(s);
    }
}

/// A branch is meant to be unique, but a client that reuses one (a bare magic cookie, a weak
/// generator, phones behind one NAT address) for another call must not get that call's
/// answer: it would be sent into the other conference. Its own retransmission still gets its
/// own answer, and its ACK is absorbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_branch_does_not_give_another_call_its_answer() {
    let s = setup(&[]).await;
    let udp = Udp::new(s.controller.sip_addr());
    let port = udp.port();
    for branch in ["z9hG4bK", "z9hG4bKreused"] {
        let first = invite("sip:reused-a@router", port, branch, "")
            .replace(&format!("Call-ID: {branch}@test"), "Call-ID: call-a@test");
        let second = invite("sip:reused-b@router", port, branch, "")
            .replace(&format!("Call-ID: {branch}@test"), "Call-ID: call-b@test")
            .replace("tag=a1", "tag=b1");
        let a = udp.exchange(&first);
        assert_eq!(header(&a, "X-Conference"), Some("reused-a"), "{a}");
        let b = udp.exchange(&second);
        assert_eq!(status(&b), 302, "{b}");
        assert_eq!(
            header(&b, "X-Conference"),
            Some("reused-b"),
            "{branch}: {b}"
        );
        assert_ne!(
            header(&a, "To"),
            header(&b, "To"),
            "each call its own To-tag"
        );
        // Each one's retransmission gets its own answer again, byte for byte.
        assert_eq!(udp.exchange(&second), b, "{branch}");
        assert_eq!(udp.exchange(&first), a, "{branch}");
    }
}

/// A To with an empty tag parameter gets its 400 with the To as sent: a second tag beside
/// the empty one would match no dialog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_to_tag_gets_a_400_with_the_to_as_sent() {
    let s = setup(&[]).await;
    let udp = Udp::new(s.controller.sip_addr());
    let empty = udp.exchange(
        &invite("sip:emptytag2@router", udp.port(), "z9hG4bKempty2", "").replace(
            "To: <sip:emptytag2@router>",
            "To: <sip:emptytag2@router>;tag=",
        ),
    );
    assert_eq!(status(&empty), 400, "{empty}");
    assert_eq!(
        header(&empty, "To"),
        Some("<sip:emptytag2@router>;tag="),
        "{empty}"
    );
}

/// An ACK is never answered, and one this server would refuse as a request changes nothing:
/// from outside `sip.trusted_cidrs`, or malformed, it does not end the transaction of the
/// answer it names (here seen by that answer still being resent, Timer G), and is counted.
/// The caller's own ACK then does end it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_or_malformed_ack_ends_no_transaction() {
    let Stalled {
        _redis,
        proxy,
        controller,
        udp,
    } = stalled(
        "1s",
        &[("CONFROUTE_SIP__TRUSTED_CIDRS", "[\"127.0.0.1/32\"]")],
    )
    .await;
    let msg = invite("sip:acked@router", udp.port(), "z9hG4bKacked", "");
    udp.socket.send_to(msg.as_bytes(), udp.to).expect("send");
    assert_eq!(status(&udp.recv()), 100);
    let answer = udp.recv();
    assert_eq!(status(&answer), 503, "{answer}");
    let ack = ack_for(&msg, &answer);
    // The same ACK from an address outside the ACL, and a malformed one from the caller.
    let outsider = UdpSocket::bind("127.0.0.2:0").expect("bind 127.0.0.2");
    outsider.send_to(ack.as_bytes(), udp.to).expect("send");
    let malformed = ack.replace("CSeq: 1 ACK", "CSeq: 1 INVITE");
    udp.socket
        .send_to(malformed.as_bytes(), udp.to)
        .expect("send");
    assert_eq!(udp.recv(), answer, "still resent: the transaction goes on");
    let url = controller.http_url();
    let m = scrape(&url).await;
    for reason in ["untrusted_ack", "malformed_ack"] {
        let series = format!(r#"confroute_sip_dropped_total{{reason="{reason}"}}"#);
        assert_eq!(metric(&m, &series), 1.0, "{series}");
    }
    udp.socket.send_to(ack.as_bytes(), udp.to).expect("send");
    udp.silence(b"\r\n", Duration::from_millis(2500));
    proxy.heal();
}

/// A configured conference header that is present but empty (an edge's unset variable) is
/// an incomplete address, answered 484 as an empty user part is, and not read past to the
/// Request-URI. A Via with an IPv6 address not in brackets has no port one can trust
/// (`2001:db8::10` is not host `2001:db8:` at port 10): nothing can be answered to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_conference_header_is_incomplete_and_a_bare_ipv6_via_is_not_answered() {
    let s = setup(&[("CONFROUTE_SIP__CONFERENCE_HEADER", "X-Conference")]).await;
    let udp = Udp::new(s.controller.sip_addr());
    let a = udp.exchange(&invite(
        "sip:sales-42@router",
        udp.port(),
        "z9hG4bKemptyhdr",
        "X-Conference: \r\n",
    ));
    assert_eq!(status(&a), 484, "{a}");
    assert!(
        header(&a, "Warning").is_some_and(|w| w.contains("X-Conference header is empty")),
        "{a}"
    );
    let bare = invite("sip:sales-42@router", udp.port(), "z9hG4bKbare6", "").replace(
        &format!("SIP/2.0/UDP 127.0.0.1:{}", udp.port()),
        "SIP/2.0/UDP 2001:db8::10",
    );
    udp.silence(bare.as_bytes(), Duration::from_millis(500));
    let m = scrape(&s.controller.http_url()).await;
    assert_eq!(
        metric(&m, r#"confroute_sip_dropped_total{reason="no_via"}"#),
        1.0
    );
    assert_eq!(
        metric(&m, r#"confroute_route_total{outcome="claimed"}"#),
        0.0,
        "nothing routed"
    );
}

/// One TCP connection of an edge, Redis out of reach (its requests go unanswered) and known
/// to be so (`/readyz` says it): as many INVITEs as a connection may have waiting on Redis
/// (64) wait out the routing timeout, and the ones after them are answered 503 with
/// Retry-After at once, so the stream behind them is read on (the OPTIONS at its end is
/// answered before any of the waiting INVITEs is). Before, the connection was not read
/// until a waiting INVITE gave up: 64 answers per timeout, the rest of the stream stuck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_connection_full_of_invites_waiting_on_a_redis_known_down_gets_503_at_once() {
    let Stalled {
        _redis,
        proxy,
        controller,
        udp: _udp,
    } = stalled("5s", &[]).await;
    let ready = format!("{}/readyz", controller.http_url());
    confroute_tests::harness::wait_for_async(
        "readyz to say Redis is down",
        Duration::from_secs(20),
        || async {
            let r = fixtures::http().get(&ready).send().await.ok()?;
            (r.status().as_u16() == 503).then_some(())
        },
    )
    .await
    .expect("Redis known down");

    let mut tcp = tokio::net::TcpStream::connect(controller.sip_addr())
        .await
        .expect("connect");
    let tcp_invite = |i: usize| {
        invite(
            &format!("sip:down-{i}@router"),
            5060,
            &format!("z9hG4bKdown{i}"),
            "",
        )
        .replace("SIP/2.0/UDP", "SIP/2.0/TCP")
    };
    let mut batch = String::new();
    for i in 0..100 {
        batch.push_str(&tcp_invite(i));
    }
    batch.push_str(&options_tcp("z9hG4bKdownopt", "down-opt@test"));
    tcp.write_all(batch.as_bytes()).await.expect("write");
    let mut got = String::new();
    read_until(&mut tcp, &mut got, |g| g.contains("CSeq: 1 OPTIONS")).await;
    let answers: Vec<&str> = got.split("SIP/2.0 ").filter(|a| !a.is_empty()).collect();
    let finals: Vec<&&str> = answers
        .iter()
        .filter(|a| a.starts_with("503") && a.contains("INVITE"))
        .collect();
    assert_eq!(finals.len(), 36, "the INVITEs past the 64 waiting: {got}");
    assert!(finals.iter().all(|a| a.contains("Retry-After:")), "{got}");
    // Only the 36 past the limit, and before any of the waiting ones is answered.
    for i in 0..64 {
        let call = format!("Call-ID: z9hG4bKdown{i}@test\r\n");
        assert!(
            !finals.iter().any(|a| a.contains(&call)),
            "INVITE {i} waits on Redis: {got}"
        );
    }
    let m = scrape(&controller.http_url()).await;
    assert!(metric(&m, r#"confroute_route_total{outcome="redis_error"}"#) >= 36.0);
    proxy.heal();
}

/// An INVITE whose From or To holds no URI, whose Call-ID is empty, or whose Request-URI
/// names no host gets a 400 naming the defect, and no conference is claimed for it (an
/// answer echoing such headers matches no client's request). A display name holding `<` in
/// its quotes is no defect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invite_without_usable_from_to_call_id_or_host_gets_a_400_and_claims_nothing() {
    let s = setup(&[]).await;
    let udp = Udp::new(s.controller.sip_addr());
    let base =
        |room: &str, branch: &str| invite(&format!("sip:{room}@router"), udp.port(), branch, "");
    let cases = [
        (
            "empty-to",
            "To: <sip:empty-to@router>",
            "To: ",
            "the To header holds no URI",
        ),
        (
            "word-to",
            "To: <sip:word-to@router>",
            "To: word-to",
            "the To header holds no URI",
        ),
        (
            "word-from",
            "From: <sip:alice@example.com>;tag=a1",
            "From: alice;tag=a1",
            "the From header holds no URI",
        ),
        (
            "open-from",
            "From: <sip:alice@example.com>;tag=a1",
            "From: \"A\" <sip:alice@example.com;tag=a1",
            "the From header holds no URI",
        ),
        (
            "empty-callid",
            "Call-ID: z9hG4bKempty-callid@test",
            "Call-ID: ",
            "the Call-ID header is empty",
        ),
        (
            "no-host",
            "INVITE sip:no-host@router SIP/2.0",
            "INVITE sip:no-host@:5060 SIP/2.0",
            "no host",
        ),
    ];
    for (room, from, to, why) in cases {
        let msg = base(room, &format!("z9hG4bK{room}"));
        assert!(msg.contains(from), "{room}: {msg}");
        let answer = udp.exchange(&msg.replace(from, to));
        assert_eq!(status(&answer), 400, "{room}: {answer}");
        assert!(
            header(&answer, "Warning").is_some_and(|w| w.contains(why)),
            "{room}: {answer}"
        );
        let name = confroute_shared::name::ConferenceName::parse(room).expect("name");
        assert_eq!(
            s.store.lookup(&name).await.expect("lookup"),
            None,
            "{room}: nothing claimed"
        );
    }
    let quoted = base("quoted-name", "z9hG4bKquoted").replace(
        "From: <sip:alice@example.com>;tag=a1",
        "From: \"Alice <ops>; \\\"x\\\"\" <sip:alice@example.com>;tag=a1",
    );
    let answer = udp.exchange(&quoted);
    assert_eq!(status(&answer), 302, "{answer}");
    let bare = base("bare-to", "z9hG4bKbare")
        .replace("To: <sip:bare-to@router>", "To: sip:bare-to@router");
    let answer = udp.exchange(&bare);
    assert_eq!(status(&answer), 302, "{answer}");
}

/// Without an RFC 3261 branch, copies of one INVITE that a stateless proxy forked to two
/// conferences (same Call-ID, CSeq and top Via) are two transactions: each gets its own
/// conference's answer, and each one's retransmission its own again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_style_branches_forked_to_two_conferences_get_their_own_answers() {
    let s = setup(&[]).await;
    let udp = Udp::new(s.controller.sip_addr());
    let copy = |room: &str| invite(&format!("sip:{room}@router"), udp.port(), "oldstyle1", "");
    let a = udp.exchange(&copy("forked-a"));
    let b = udp.exchange(&copy("forked-b"));
    assert_eq!(header(&a, "X-Conference"), Some("forked-a"), "{a}");
    assert_eq!(header(&b, "X-Conference"), Some("forked-b"), "{b}");
    assert_eq!(udp.exchange(&copy("forked-a")), a);
    assert_eq!(udp.exchange(&copy("forked-b")), b);
}

/// The controller's resident memory, from /proc (kB).
fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("no VmRSS for process {pid}"))
}

/// Peers that pipeline large requests and read none of the answers cost the controller a
/// bounded amount of memory each: answers copy every Via of their request, so a connection
/// stops being read once its waiting answers pass a byte budget, not only a number of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_that_read_no_answers_hold_little_memory() {
    const CONNECTIONS: usize = 8;
    const REQUESTS: usize = 400;
    let s = setup(&[]).await;
    let pid = s.controller.pid().expect("controller pid");
    // Close to the default 16 KiB message limit, nearly all of it Via lines.
    let vias: String = (0..140)
        .map(|i| {
            format!(
                "Via: SIP/2.0/TCP 10.1.{}.{}:5060;branch=z9hG4bKvia{i:060}\r\n",
                i / 250,
                i % 250
            )
        })
        .collect();
    let request = |c: usize, i: usize| {
        format!(
            "OPTIONS sip:router SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1;branch=z9hG4bKnr{c}x{i}\r\n{vias}\
             From: <sip:p@x>;tag=1\r\nTo: <sip:router>\r\nCall-ID: nr{c}x{i}@test\r\nCSeq: 1 OPTIONS\r\n\
             Content-Length: 0\r\n\r\n"
        )
    };
    assert!(request(0, 0).len() > 12_000 && request(0, 0).len() < 16_000);
    // The process as it serves one connection's OPTIONS.
    let mut warm = tokio::net::TcpStream::connect(s.controller.sip_addr())
        .await
        .expect("connect");
    warm.write_all(request(99, 0).as_bytes())
        .await
        .expect("write");
    let mut buf = vec![0u8; 65536];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), warm.read(&mut buf))
            .await
            .expect("answer in time")
            .expect("read");
        assert!(n > 0, "closed");
        got.extend_from_slice(&buf[..n]);
    }
    let before = rss_kb(pid);
    let mut peers = Vec::new();
    for c in 0..CONNECTIONS {
        let addr = s.controller.sip_addr();
        let text: Vec<u8> = (0..REQUESTS)
            .flat_map(|i| request(c, i).into_bytes())
            .collect();
        peers.push(tokio::spawn(async move {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket
                .set_recv_buffer_size(4096)
                .expect("small receive buffer");
            let mut tcp = socket.connect(addr).await.expect("connect");
            // Written until the controller stops reading (then this write waits), or whole.
            let _ = tokio::time::timeout(Duration::from_secs(5), tcp.write_all(&text)).await;
            tcp
        }));
    }
    let mut held = Vec::new();
    for p in peers {
        held.push(p.await.expect("peer"));
    }
    // The most the process holds while those answers wait.
    let mut most = 0;
    for _ in 0..20 {
        most = most.max(rss_kb(pid));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let grown_kb = most.saturating_sub(before);
    // 128 KiB of waiting answers per connection, an answer being written, a request being
    // read: well under 1 MiB each. A count of 256 answers alone would be some 3.5 MiB each.
    assert!(
        grown_kb < (CONNECTIONS as u64) * 1024,
        "the controller grew by {grown_kb} kB for {CONNECTIONS} peers that read nothing"
    );
    drop(held);
}

/// A stopping controller reads no more requests but answers the INVITEs it has read: one
/// sent `100 Trying` is no longer retransmitted by its edge, which would otherwise wait out
/// its own INVITE timer (minutes) rather than try another controller. Its TCP connections
/// then close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_controller_answers_the_invites_it_read() {
    let Stalled {
        _redis,
        proxy: _proxy,
        mut controller,
        udp,
    } = stalled("3s", &[]).await;
    let msg = invite("sip:stop-udp@router", udp.port(), "z9hG4bKstopudp", "");
    udp.socket.send_to(msg.as_bytes(), udp.to).expect("send");
    let trying = udp.recv();
    assert_eq!(status(&trying), 100, "{trying}");
    let mut tcp = tokio::net::TcpStream::connect(controller.sip_addr())
        .await
        .expect("connect");
    let msg = invite("sip:stop-tcp@router", 5060, "z9hG4bKstoptcp", "")
        .replace("SIP/2.0/UDP", "SIP/2.0/TCP");
    tcp.write_all(msg.as_bytes()).await.expect("write");
    let mut got = String::new();
    read_until(&mut tcp, &mut got, |g| g.contains("SIP/2.0 100 Trying")).await;

    controller.process().signal(libc::SIGTERM).expect("SIGTERM");
    // Redis never answers: the routing deadline's 503, rather than nothing.
    udp.socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let last = udp.recv();
    assert_eq!(status(&last), 503, "{last}");
    assert!(header(&last, "Retry-After").is_some(), "{last}");
    let mut buf = vec![0u8; 8192];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("the connection stays open after the stop: {got}"))
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(
        got.contains("SIP/2.0 503 Service Unavailable"),
        "the TCP INVITE's final answer before the close: {got}"
    );
}

/// An edge whose TCP connection closes while its INVITE is being routed still gets the
/// final answer: on a new connection to the address it came from and its Via's port (RFC
/// 3261 §18.2.2), where the edge listens, rather than never (its INVITE timer, 120 s on
/// Kamailio, to run out). The new connection leaves from the address the edge reached (the
/// controller listens on every address here, as on a multi-homed host). One whose Via names
/// a port nobody listens on is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_answer_whose_connection_closed_goes_on_a_new_one() {
    let Stalled {
        _redis,
        proxy,
        controller,
        udp: _udp,
    } = stalled_on(std::net::Ipv4Addr::UNSPECIFIED.into(), "5s", &[]).await;
    // Another of the host's addresses than the one it would pick for the edge by itself.
    let reached = std::net::SocketAddr::from(([127, 0, 0, 5], controller.sip_port));
    let edge = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("edge listener");
    let edge_port = edge.local_addr().expect("edge address").port();
    // Nothing listens there: free_port checked it was free, and nothing binds it.
    let nowhere = confroute_tests::harness::free_port();
    let before = scrape(&controller.http_url()).await;
    let undelivered = |m: &str| {
        metric(
            m,
            r#"confroute_sip_dropped_total{reason="answer_undelivered"}"#,
        )
    };

    for (name, port) in [("gone-edge", edge_port), ("gone-nowhere", nowhere)] {
        let mut tcp = tokio::net::TcpStream::connect(reached)
            .await
            .expect("connect");
        let msg = invite(
            &format!("sip:{name}@router"),
            port,
            &format!("z9hG4bK{name}"),
            "",
        )
        .replace("SIP/2.0/UDP", "SIP/2.0/TCP");
        tcp.write_all(msg.as_bytes()).await.expect("write");
        // The INVITE is being routed (Redis answers nothing meanwhile) when the edge's
        // connection closes.
        let mut got = String::new();
        read_until(&mut tcp, &mut got, |g| g.contains("SIP/2.0 100 Trying")).await;
        drop(tcp);
    }
    proxy.heal();

    let (mut back, from) = tokio::time::timeout(Duration::from_secs(10), edge.accept())
        .await
        .expect("no new connection to the edge for the answer")
        .expect("accept");
    assert_eq!(from.ip(), reached.ip(), "from the address the edge reached");
    // The controller closes the new connection once the answer is written.
    let got = read_to_close(&mut back).await;
    assert_eq!(status(&got), 302, "{got}");
    assert_eq!(
        header(&got, "Call-ID"),
        Some("z9hG4bKgone-edge@test"),
        "{got}"
    );
    assert!(
        header(&got, "Via").is_some_and(|v| v.contains("branch=z9hG4bKgone-edge")),
        "{got}"
    );
    assert_eq!(header(&got, "X-Conference-Node"), Some("node-a"), "{got}");
    assert_eq!(
        got.matches("SIP/2.0 302").count(),
        1,
        "one answer only: {got}"
    );

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = scrape(&controller.http_url()).await;
        if undelivered(&now) - undelivered(&before) == 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the answer for a Via port nobody listens on is not counted: {}",
            undelivered(&now) - undelivered(&before)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A peer that only shuts down its sending side after its requests still reads: every
/// answer comes on its connection (RFC 3261 §18.2.2: the existing connection while it is
/// open), an OPTIONS answer included, then the controller closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_sending_gets_its_answers_on_its_connection() {
    let s = setup(&[]).await;
    let mut tcp = tokio::net::TcpStream::connect(s.controller.sip_addr())
        .await
        .expect("connect");
    let tcp_request = |msg: String| msg.replace("SIP/2.0/UDP", "SIP/2.0/TCP");
    let options = tcp_request(
        invite("sip:probe@router", 5060, "z9hG4bKhalfopt", "")
            .replace("INVITE sip:probe@router", "OPTIONS sip:probe@router")
            .replace("CSeq: 1 INVITE", "CSeq: 1 OPTIONS"),
    );
    let call = tcp_request(invite("sip:half@router", 5060, "z9hG4bKhalfinv", ""));
    tcp.write_all(format!("{options}{call}").as_bytes())
        .await
        .expect("write");
    tcp.shutdown().await.expect("shut down the sending side");
    let got = read_to_close(&mut tcp).await;
    assert!(got.contains("SIP/2.0 200 OK"), "the OPTIONS answer: {got}");
    assert!(
        got.contains("SIP/2.0 302 Moved Temporarily"),
        "the INVITE's answer: {got}"
    );
    assert!(got.contains("X-Conference-Node: node-a"), "{got}");
}
