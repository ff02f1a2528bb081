//! Redis call latency and error counters (`confroute_redis_*`).

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use crate::store::StoreError;

/// Store instrumentation; clones share the same series.
#[derive(Clone)]
pub struct StoreMetrics {
    latency: Option<HistogramVec>,
    errors: Option<IntCounterVec>,
}

impl StoreMetrics {
    /// Metrics registered in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "confroute_redis_request_duration_seconds",
                "Time of one Redis store operation, by operation.",
            )
            .buckets(vec![
                0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
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
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        Ok(StoreMetrics {
            latency: Some(latency),
            errors: Some(errors),
        })
    }

    /// No metrics (tools and tests that do not export any).
    pub fn disabled() -> Self {
        StoreMetrics {
            latency: None,
            errors: None,
        }
    }

    /// Counts an error found in a part of an answer that was otherwise used.
    pub(crate) fn error(&self, op: &'static str, e: &StoreError) {
        if let Some(c) = &self.errors {
            c.with_label_values(&[op, e.kind()]).inc();
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
