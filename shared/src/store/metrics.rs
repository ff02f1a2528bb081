//! Redis call latency and error counters (`confroute_redis_*`).

use std::time::Duration;

use prometheus::{Gauge, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use crate::store::StoreError;

/// Store instrumentation; clones share the same series.
#[derive(Clone)]
pub struct StoreMetrics {
    latency: Option<HistogramVec>,
    errors: Option<IntCounterVec>,
    clock: Option<Gauge>,
}

impl StoreMetrics {
    /// Metrics registered in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "confroute_redis_request_duration_seconds",
                "Time of one Redis store operation, by operation.",
            )
            // Up to 5 s: an operation's time includes opening a connection
            // (`redis.connect_timeout`) on top of `redis.timeout`.
            .buckets(vec![
                0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                5.0,
            ]),
            &["op"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "confroute_redis_errors_total",
                "Redis store operations that failed, by operation and kind.",
            ),
            &["op", "kind"],
        )?;
        let clock = Gauge::new(
            "confroute_redis_clock_uncertainty_seconds",
            "Half the round trip of the comparison of this process's clock with Redis's that commands are timed by; +Inf before the first.",
        )?;
        clock.set(f64::INFINITY);
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(clock.clone()))?;
        Ok(StoreMetrics {
            latency: Some(latency),
            errors: Some(errors),
            clock: Some(clock),
        })
    }

    /// No metrics (tools and tests that do not export any).
    pub fn disabled() -> Self {
        StoreMetrics {
            latency: None,
            errors: None,
            clock: None,
        }
    }

    /// Counts an error found in a part of an answer that was otherwise used.
    pub(crate) fn error(&self, op: &'static str, e: &StoreError) {
        if let Some(c) = &self.errors {
            c.with_label_values(&[op, e.kind()]).inc();
        }
    }

    /// Notes the round trip of the clock comparison now in use.
    pub(crate) fn clock_compared(&self, rtt: Duration) {
        if let Some(g) = &self.clock {
            g.set(rtt.as_secs_f64() / 2.0);
        }
    }

    pub(crate) fn observe(&self, op: &'static str, took: Duration, error: Option<&StoreError>) {
        if let Some(h) = &self.latency {
            h.with_label_values(&[op]).observe(took.as_secs_f64());
        }
        if let (Some(c), Some(e)) = (&self.errors, error) {
            c.with_label_values(&[op, e.kind()]).inc();
        }
    }
}
