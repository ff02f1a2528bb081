//! Status callbacks (TwiML `statusCallback`): HTTP POSTs with Twilio's form fields, sent in
//! order per conference by one delivery task, retried with backoff, from a bounded queue the
//! conference only ever `try_send`s into, so call handling never waits for a slow receiver.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

use crate::config::WebhookConfig;
use crate::metrics::Metrics;
use crate::options::CallbackEvent;

mod resolve;
mod sequence;

pub use resolve::CallbackResolver;

pub use sequence::Reservations;
pub(crate) use sequence::Sequence;

/// Status callbacks queued or being sent, across the node's conferences: the agent gives
/// them a bounded time to go out before it exits.
#[derive(Clone, Default)]
pub struct InFlight(Arc<(std::sync::atomic::AtomicUsize, tokio::sync::Notify)>);

impl InFlight {
    fn add(&self) {
        self.0 .0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn done(&self) {
        self.0 .0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        self.0 .1.notify_waiters();
    }

    /// Callbacks not yet delivered or given up.
    pub fn count(&self) -> usize {
        self.0 .0.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until every queued callback was delivered or given up, or `within`; returns how
    /// many are left.
    pub async fn settle(&self, within: Duration) -> usize {
        let until = tokio::time::Instant::now() + within;
        loop {
            let changed = self.0 .1.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.count() == 0 {
                return 0;
            }
            tokio::select! {
                _ = &mut changed => {}
                _ = tokio::time::sleep_until(until) => return self.count(),
            }
        }
    }
}

/// How the node sends status callbacks: its HTTP client and what is still to go out.
#[derive(Clone)]
pub struct Delivery {
    /// Client for every callback (no redirects, the configured timeout).
    pub http: reqwest::Client,
    /// Callbacks queued or being sent.
    pub in_flight: InFlight,
    /// Once the node stops: when the last callbacks are given up (`webhook.shutdown_wait`).
    pub stop_by: StopBy,
}

/// When a stopping node gives up its last callbacks, and the time each conference keeps of
/// it for its `conference-end`; unset while it serves.
/// A watch, so that retries waiting when the stop comes wake to it.
#[derive(Clone)]
pub struct StopBy(Arc<tokio::sync::watch::Sender<Option<(tokio::time::Instant, Duration)>>>);

impl Default for StopBy {
    fn default() -> Self {
        StopBy(Arc::new(tokio::sync::watch::Sender::new(None)))
    }
}

/// Shortest try worth making at a stop; with less left, a callback is given up.
const LEAST_TRY: Duration = Duration::from_millis(100);
/// How much sooner than the stop's wait a try ends.
const STOP_MARGIN: Duration = Duration::from_millis(50);

impl StopBy {
    /// The node stops: what is not sent by `at` is dropped, and each conference that will
    /// send its end keeps `reserve` before `at` for it.
    pub fn set(&self, at: tokio::time::Instant, reserve: Duration) {
        self.0.send_replace(Some((at, reserve)));
    }

    /// Waits `wait` before a retry; false as soon as a stop, begun meanwhile, leaves no
    /// room for that retry (see [`StopBy::try_within`]): a callback waiting out a receiver's
    /// `Retry-After` must not hold up the conference's end queued behind it past the stop.
    async fn wait_for_retry(&self, wait: Duration, timeout: Duration, keep: bool) -> bool {
        let end = tokio::time::Instant::now() + wait;
        let mut stop = self.0.subscribe();
        loop {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            if self.try_within(left, timeout, keep).is_none() {
                return false;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(end) => return true,
                changed = stop.changed() => {
                    if changed.is_err() {
                        tokio::time::sleep_until(end).await;
                        return true;
                    }
                }
            }
        }
    }

    /// Runs one try (`send`), cut short (`None`) when a stop begun meanwhile leaves it less
    /// time than its own deadline: a request already out when the node begins to stop must
    /// not hold the conference's end queued behind it for a whole `webhook.timeout`.
    async fn within_stop<F: std::future::Future>(
        &self,
        send: F,
        timeout: Duration,
        keep: bool,
    ) -> Option<F::Output> {
        let mut stop = self.0.subscribe();
        // A stop set between the try's deadline and this subscription counts too.
        stop.mark_changed();
        tokio::pin!(send);
        let mut cut_at: Option<tokio::time::Instant> = None;
        loop {
            let cut = async {
                match cut_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // An answer that came as the cut fell due is an answer.
                biased;
                out = &mut send => return Some(out),
                () = cut => return None,
                changed = stop.changed() => {
                    if changed.is_err() {
                        return match cut_at {
                            Some(at) => tokio::time::timeout_at(at, send).await.ok(),
                            None => Some(send.await),
                        };
                    }
                    // While the node serves, the try ends at its own deadline (the request's
                    // timeout) and is retried: a cut at that same instant would race it and
                    // give the callback up as if the node were stopping.
                    if self.0.borrow().is_none() {
                        continue;
                    }
                    let left = self.try_within(Duration::ZERO, timeout, keep)?;
                    let at = tokio::time::Instant::now() + left;
                    cut_at = Some(cut_at.map_or(at, |c| c.min(at)));
                }
            }
        }
    }

    /// The deadline of a try starting `after` from now: `timeout` while serving; at a stop,
    /// no more than is left then (less the end's reserve when `keep`), and `None` when that
    /// is under [`LEAST_TRY`].
    fn try_within(&self, after: Duration, timeout: Duration, keep: bool) -> Option<Duration> {
        let Some((at, reserve)) = *self.0.borrow() else {
            return Some(timeout);
        };
        // A try ends a moment before the wait does, so the stop counts it once, as what it
        // came to, not also as dropped.
        let at = at.checked_sub(STOP_MARGIN).unwrap_or(at);
        let left = at.saturating_duration_since(tokio::time::Instant::now() + after);
        let left = if keep {
            left.saturating_sub(reserve)
        } else {
            left
        };
        (left >= LEAST_TRY).then(|| left.min(timeout))
    }
}

/// What happened to the participant, for `participant-*` events.
#[derive(Clone, Debug)]
pub struct ParticipantFields {
    /// Channel id (Twilio's `CallSid`).
    pub call_sid: String,
    /// Muted now.
    pub muted: bool,
    /// On hold now.
    pub hold: bool,
    /// TwiML `startConferenceOnEnter`.
    pub start_on_enter: bool,
    /// TwiML `endConferenceOnExit`.
    pub end_on_exit: bool,
}

/// One conference's callback sender; dropping it lets the delivery task finish its queue.
pub struct Callbacks {
    tx: mpsc::Sender<Vec<(String, String)>>,
    events: Vec<CallbackEvent>,
    sid: String,
    /// `webhook.account_sid`, sent when set.
    account_sid: String,
    name: String,
    seq: Sequence,
    metrics: Metrics,
    in_flight: InFlight,
    /// Events this conference dropped for a full queue: logged at the first and every
    /// [`DROPS_PER_LOG`]th, not each (a flood of them would flood the log too).
    dropped: u64,
}

/// Dropped events of one conference per warning after the first.
const DROPS_PER_LOG: u64 = 100;

impl Callbacks {
    /// Starts delivery of the conference's events to `url`, numbered from blocks reserved
    /// in the conference's record.
    pub fn start(
        delivery: &Delivery,
        url: String,
        events: Vec<CallbackEvent>,
        cfg: &WebhookConfig,
        metrics: Metrics,
        sid: String,
        reservations: Reservations,
    ) -> Callbacks {
        // One slot past the bound is kept for `conference-end`, the last event: a conference
        // ending with more leaves than the queue holds (or behind a slow receiver) must not
        // lose the one telling it ended.
        let (tx, rx) = mpsc::channel(cfg.queue_size + 1);
        tokio::spawn(deliver(
            delivery.clone(),
            url,
            rx,
            events.contains(&CallbackEvent::End),
            cfg.clone(),
            metrics.clone(),
        ));
        Callbacks {
            tx,
            events,
            sid,
            account_sid: cfg.account_sid.clone(),
            name: reservations.name.to_string(),
            seq: Sequence::new(Arc::new(reservations)),
            metrics,
            in_flight: delivery.in_flight.clone(),
            dropped: 0,
        }
    }

    /// After the conference's record was made anew (its claim expired and was made again):
    /// the numbers used so far are recorded there again.
    pub async fn record_numbering(&mut self) {
        if !self.seq.record_again().await {
            tracing::warn!(conference = %self.name, "status callback numbers not recorded again; a restart may repeat some");
        }
    }

    /// For a conference adopted after a restart: reserves a block above every number an
    /// earlier lifetime may have used, and numbers from it. Without a reservation (Redis
    /// unreachable, the conference owned elsewhere) it numbers from the clock.
    pub async fn resume_numbering(&mut self) {
        if !self.seq.resume().await {
            tracing::warn!(conference = %self.name, "no SequenceNumber block could be reserved; status callbacks are numbered from the clock (milliseconds since 1970)");
        }
    }

    /// Queues `event` (`status` is Twilio's `StatusCallbackEvent` value) if it was asked for.
    pub fn send(
        &mut self,
        event: CallbackEvent,
        status: &str,
        participant: Option<&ParticipantFields>,
        extra: &[(&str, String)],
    ) {
        if !self.events.contains(&event) {
            return;
        }
        let seq = self.seq.next();
        let mut form = vec![
            ("ConferenceSid".to_string(), self.sid.clone()),
            ("FriendlyName".to_string(), self.name.clone()),
            ("StatusCallbackEvent".to_string(), status.to_string()),
            ("SequenceNumber".to_string(), seq.to_string()),
            ("Timestamp".to_string(), rfc2822(SystemTime::now())),
        ];
        if !self.account_sid.is_empty() {
            form.push(("AccountSid".to_string(), self.account_sid.clone()));
        }
        if let Some(p) = participant {
            form.push(("CallSid".to_string(), p.call_sid.clone()));
            form.push(("Muted".to_string(), p.muted.to_string()));
            form.push(("Hold".to_string(), p.hold.to_string()));
            form.push((
                "StartConferenceOnEnter".to_string(),
                p.start_on_enter.to_string(),
            ));
            form.push(("EndConferenceOnExit".to_string(), p.end_on_exit.to_string()));
        }
        for (k, v) in extra {
            form.push((k.to_string(), v.clone()));
        }
        // Counted before the delivery task can see it, so the count never runs below zero.
        self.in_flight.add();
        let room = event == CallbackEvent::End || self.tx.capacity() > 1;
        if !room || self.tx.try_send(form).is_err() {
            self.in_flight.done();
            self.metrics.webhooks.with_label_values(&["dropped"]).inc();
            self.dropped += 1;
            if self.dropped == 1 || self.dropped.is_multiple_of(DROPS_PER_LOG) {
                tracing::warn!(conference = %self.name, event = %event, dropped = self.dropped, "status callback queue full; event dropped (logged at the first and every {DROPS_PER_LOG}th of this conference)");
            }
        }
    }
}

async fn deliver(
    delivery: Delivery,
    url: String,
    mut rx: mpsc::Receiver<Vec<(String, String)>>,
    wants_end: bool,
    cfg: WebhookConfig,
    metrics: Metrics,
) {
    // Callback URLs often carry credentials (`user:pass@`, `?token=`): logs get neither.
    let shown = redacted(&url);
    let mut skipped = 0u64;
    while let Some(form) = rx.recv().await {
        // At a stop, a conference that will send its end keeps time for it: an earlier
        // event gets only what is left beyond that (a big conference's leaves behind a slow
        // receiver would otherwise hold its end past the exit).
        let keep = wants_end && !is_end(&form);
        if delivery
            .stop_by
            .try_within(Duration::ZERO, cfg.timeout, keep)
            .is_none()
        {
            skipped += 1;
            metrics.webhooks.with_label_values(&["dropped"]).inc();
        } else {
            if skipped > 0 {
                tracing::warn!(url = %shown, dropped = skipped, "status callbacks dropped at the stop to leave time for the conference's end");
                skipped = 0;
            }
            attempt_all(&delivery, &url, &shown, &form, keep, &cfg, &metrics).await;
        }
        delivery.in_flight.done();
    }
    if skipped > 0 {
        tracing::warn!(url = %shown, dropped = skipped, "status callbacks dropped at the stop");
    }
}

/// Whether `form` is a conference's `conference-end`, its last callback.
fn is_end(form: &[(String, String)]) -> bool {
    form.iter()
        .any(|(k, v)| k == "StatusCallbackEvent" && v == "conference-end")
}

/// Sends one event until it is delivered or given up; at a stop, each try within what is
/// left (less the conference's end's reserve when `keep`).
async fn attempt_all(
    delivery: &Delivery,
    url: &str,
    shown: &str,
    form: &[(String, String)],
    keep: bool,
    cfg: &WebhookConfig,
    metrics: &Metrics,
) {
    let http = &delivery.http;
    let signature = cfg
        .auth_token
        .as_ref()
        .map(|token| twilio_signature(token.expose(), &as_received(url), form));
    let mut delay = cfg.retry_initial;
    let mut attempt = 0;
    let mut within = delivery
        .stop_by
        .try_within(Duration::ZERO, cfg.timeout, keep)
        .unwrap_or(LEAST_TRY);
    loop {
        attempt += 1;
        let mut request = http.post(url).timeout(within).form(form);
        if let Some(s) = &signature {
            request = request.header("X-Twilio-Signature", s);
        }
        let Some(result) = delivery
            .stop_by
            .within_stop(request.send(), cfg.timeout, keep)
            .await
        else {
            metrics.webhooks.with_label_values(&["failed"]).inc();
            tracing::warn!(url = %shown, attempts = attempt, stopping = true, "status callback given up: the node is stopping and its receiver had not answered");
            break;
        };
        // A receiver that says when to come back (429, 503) is asked again then, within
        // `webhook.retry_max`, rather than sooner.
        let asked_wait = match &result {
            Ok(r) if matches!(r.status().as_u16(), 429 | 503) => retry_after(r.headers()),
            _ => None,
        };
        let (why, permanent) = match result {
            Ok(r) if r.status().is_success() => {
                metrics.webhooks.with_label_values(&["delivered"]).inc();
                break;
            }
            // The receiver refused this request as it is, or sent it elsewhere (redirects
            // are not followed): sending it again would get the same answer (timeouts and
            // rate limits aside).
            Ok(r) => (
                format!("status {}", r.status().as_u16()),
                r.status().is_redirection()
                    || (r.status().is_client_error()
                        && !matches!(r.status().as_u16(), 408 | 425 | 429)),
            ),
            // A host that resolves only to refused addresses is refused again at once.
            Err(e) => (without_url(&e), refused_host(&e)),
        };
        let most = cfg.retry_max.max(cfg.retry_initial);
        let wait = match asked_wait {
            // Not sooner than the first retry either: `Retry-After: 0` from a receiver still
            // refusing would have the attempts spent back to back.
            Some(wait) => wait.clamp(cfg.retry_initial, most),
            // Jittered, so the conferences of a node do not all come back at once; never
            // past `webhook.retry_max`, as documented.
            None => jittered(delay, most),
        };
        let next = delivery.stop_by.try_within(wait, cfg.timeout, keep);
        let room = next.is_some();
        if permanent || attempt >= cfg.max_attempts || !room {
            metrics.webhooks.with_label_values(&["failed"]).inc();
            tracing::warn!(url = %shown, attempts = attempt, error = %why, stopping = !room, "status callback given up");
            break;
        }
        metrics.webhook_retries.inc();
        tracing::debug!(url = %shown, attempt, error = %why, "status callback failed; retrying");
        if !delivery
            .stop_by
            .wait_for_retry(wait, cfg.timeout, keep)
            .await
        {
            metrics.webhooks.with_label_values(&["failed"]).inc();
            tracing::warn!(url = %shown, attempts = attempt, error = %why, stopping = true, "status callback given up");
            break;
        }
        // The node may have begun to stop during the wait: the try fits what is left now.
        match delivery
            .stop_by
            .try_within(Duration::ZERO, cfg.timeout, keep)
        {
            Some(w) => within = w,
            None => {
                metrics.webhooks.with_label_values(&["failed"]).inc();
                tracing::warn!(url = %shown, attempts = attempt, error = %why, stopping = true, "status callback given up");
                break;
            }
        }
        delay = delay.saturating_mul(2).min(most);
    }
}

/// `delay` times a random factor from 0.5 to 1.5, at most `most`.
fn jittered(delay: Duration, most: Duration) -> Duration {
    Duration::try_from_secs_f64(delay.as_secs_f64() * (0.5 + rand::random::<f64>()))
        .unwrap_or(most)
        .min(most)
}

/// The wait a `Retry-After` header asks for, in seconds (RFC 9110 §10.2.3); its HTTP-date
/// form is not read (the usual backoff applies).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(Duration::from_secs(v.parse::<u64>().unwrap_or(u64::MAX)))
}

/// Whether the request failed because its host resolves only to addresses no callback is
/// sent to (the resolver's refusal, somewhere in the error's causes).
fn refused_host(e: &reqwest::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.is::<resolve::Refused>() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Twilio's request signature: base64 of HMAC-SHA1, keyed with the auth token, over the URL
/// followed by each form field's name and value, sorted by name. An application ported from
/// Twilio validates it with its helper library's `RequestValidator` unchanged.
fn twilio_signature(token: &str, url: &str, form: &[(String, String)]) -> String {
    use base64::Engine as _;
    let mut fields: Vec<&(String, String)> = form.iter().collect();
    fields.sort_by(|a, b| a.0.cmp(&b.0));
    let mut data = url.to_string();
    for (k, v) in fields {
        data.push_str(k);
        data.push_str(v);
    }
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, token.as_bytes());
    let tag = ring::hmac::sign(&key, data.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
}

/// `url` as Twilio signs it and the receiver validates it: normalised as the HTTP client
/// sends it (host in lower case, a default port dropped, `/` for an empty path), without
/// credentials (they travel in the Authorization header) or a fragment (never sent), and for
/// HTTPS without its port, as Twilio leaves it out (its helper libraries accept either).
fn as_received(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_fragment(None);
            if u.scheme() == "https" {
                let _ = u.set_port(None);
            }
            u.to_string()
        }
        Err(_) => url.to_string(),
    }
}

/// `url` as its scheme, host and port, for logs: webhook services carry their secret in the
/// user and password, the query or the path (`/services/T…/B…/<secret>`) alike.
pub(crate) fn redacted(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => {
            let mut s = format!("{}://{}", u.scheme(), u.host_str().unwrap_or(""));
            if let Some(port) = u.port() {
                s.push_str(&format!(":{port}"));
            }
            if u.path() != "/" {
                s.push_str("/…");
            }
            if u.query().is_some() {
                s.push_str("?…");
            }
            s
        }
        Err(_) => "(unparsable URL)".to_string(),
    }
}

/// A request error's text without the URL reqwest puts in it.
fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(u) = e.url() {
        s = s.replace(u.as_str(), &redacted(u.as_str()));
    }
    s
}

/// `Tue, 01 Jan 2024 12:00:00 +0000`, the form Twilio's `Timestamp` has.
pub fn rfc2822(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {:02} {} {:04} {:02}:{:02}:{:02} +0000",
        DAYS[days.rem_euclid(7) as usize],
        d,
        MONTHS[(m - 1) as usize],
        y,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jittered_wait_stays_within_half_either_side_and_under_the_most() {
        let delay = Duration::from_secs(20);
        for _ in 0..1000 {
            let wait = jittered(delay, Duration::from_secs(25));
            assert!(wait >= Duration::from_secs(10), "{wait:?}");
            assert!(wait <= Duration::from_secs(25), "{wait:?}");
        }
        assert_eq!(
            jittered(Duration::MAX, Duration::from_secs(3600)),
            Duration::from_secs(3600)
        );
    }

    /// A resolver refusing every name, as the callback resolver refuses one that resolves
    /// only to link-local addresses.
    struct RefuseAll;

    impl reqwest::dns::Resolve for RefuseAll {
        fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
            let host = name.as_str().to_string();
            Box::pin(async move {
                Err(Box::new(resolve::Refused(host)) as Box<dyn std::error::Error + Send + Sync>)
            })
        }
    }

    /// The resolver's refusal is told apart from a failure worth retrying (a connection
    /// refused, a timeout).
    #[tokio::test]
    async fn a_refused_host_is_not_retried() {
        // As the agent does at start (reqwest is built without a default TLS provider).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let refusing = reqwest::Client::builder()
            .dns_resolver(Arc::new(RefuseAll))
            .build()
            .expect("client");
        let e = refusing
            .post("http://metadata.test/")
            .send()
            .await
            .expect_err("refused");
        assert!(refused_host(&e), "{e:?}");
        // Nothing listens on a port just freed: a connection refused is retried.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let e = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{port}/"))
            .send()
            .await
            .expect_err("nothing listens");
        assert!(!refused_host(&e), "{e:?}");
    }

    /// A try that times out while the node serves comes back as the request's own timeout,
    /// to be retried, never as a stop's cut: both fall due on the same timer tick.
    #[tokio::test]
    async fn a_timeout_while_serving_is_not_taken_for_a_stop() {
        let stop = StopBy::default();
        let timeout = Duration::from_millis(20);
        for i in 0..40 {
            // Made before the call, as reqwest arms its timeout when the request is sent.
            let send = tokio::time::sleep(timeout);
            assert!(
                stop.within_stop(send, timeout, false).await.is_some(),
                "try {i} was cut as if the node were stopping"
            );
        }
        // A stop still cuts a try that would outlast it.
        stop.set(
            tokio::time::Instant::now() + Duration::from_millis(200),
            Duration::ZERO,
        );
        let send = tokio::time::sleep(Duration::from_secs(30));
        assert!(stop
            .within_stop(send, Duration::from_secs(30), false)
            .await
            .is_none());
    }

    /// Twilio's own worked example ("Validating signatures from Twilio"): the same URL, form
    /// and auth token give the signature Twilio's documentation shows.
    #[test]
    fn signs_as_twilio_does() {
        let form: Vec<(String, String)> = [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675310"),
            ("Digits", "1234"),
            ("From", "+14158675310"),
            ("To", "+18005551212"),
        ]
        .iter()
        .rev()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(
            twilio_signature(
                "12345",
                "https://mycompany.com/myapp.php?foo=1&bar=2",
                &form
            ),
            "GvWf1cFY/Q7PnoempGyD5oXAezc="
        );
    }

    /// The URL signed is the one the receiver reconstructs from the request it gets.
    #[test]
    fn the_url_signed_is_the_one_sent() {
        assert_eq!(
            as_received("https://user:pw@App.Example.com:443?x=1"),
            "https://app.example.com/?x=1"
        );
        assert_eq!(
            as_received("http://10.0.0.5:8080/events?tenant=7#part"),
            "http://10.0.0.5:8080/events?tenant=7"
        );
        assert_eq!(
            as_received("https://app.example.com:8443/e"),
            "https://app.example.com/e"
        );
    }

    #[test]
    fn timestamps_look_like_twilio() {
        let t = UNIX_EPOCH + Duration::from_secs(1_704_110_400);
        assert_eq!(rfc2822(t), "Mon, 01 Jan 2024 12:00:00 +0000");
        assert_eq!(rfc2822(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 +0000");
    }
}
