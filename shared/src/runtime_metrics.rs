//! The async runtime's own figures as Prometheus series, read when scraped.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntGauge, Registry};

/// `confroute_runtime_tasks`: tasks alive in the runtime that answers the scrape.
///
/// Every call, command and timer holds a task while it lasts, so a count that keeps rising
/// under steady load shows work that never ends (a leak) before memory does.
pub struct RuntimeTasks {
    gauge: IntGauge,
}

impl RuntimeTasks {
    /// Registers the series with `registry`.
    pub fn register(registry: &Registry) -> Result<(), prometheus::Error> {
        let gauge = IntGauge::new(
            "confroute_runtime_tasks",
            "Tasks alive in the process's async runtime (calls, commands, timers, connections).",
        )?;
        registry.register(Box::new(RuntimeTasks { gauge }))
    }
}

impl Collector for RuntimeTasks {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        // Outside a runtime (a test rendering metrics directly) the last value stands.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let alive = rt.metrics().num_alive_tasks();
            self.gauge.set(i64::try_from(alive).unwrap_or(i64::MAX));
        }
        self.gauge.collect()
    }
}
