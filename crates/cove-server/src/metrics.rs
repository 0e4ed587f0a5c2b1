//! Prometheus metrics, all prefixed `cove_`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    pub sandboxes: Family<Labels, Gauge>,
    pub creates: Family<Labels, Counter>,
    pub execs: Counter,
    pub exec_seconds: Histogram,
    pub errors: Family<Labels, Counter>,
    pub requests: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("cove");
        let sandboxes = Family::<Labels, Gauge>::default();
        registry.register("sandboxes", "Sandboxes by state", sandboxes.clone());
        let creates = Family::<Labels, Counter>::default();
        registry.register(
            "sandbox_creates",
            "Sandbox creations by result",
            creates.clone(),
        );
        let execs = Counter::default();
        registry.register("execs", "Processes started through the API", execs.clone());
        let exec_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "exec_duration_seconds",
            "Wall time of synchronous execs",
            exec_seconds.clone(),
        );
        let errors = Family::<Labels, Counter>::default();
        registry.register("http_errors", "Error responses by code", errors.clone());
        let requests = Counter::default();
        registry.register("http_requests", "HTTP requests", requests.clone());
        Metrics {
            registry,
            sandboxes,
            creates,
            execs,
            exec_seconds,
            errors,
            requests,
        }
    }

    /// The text exposition, after setting the gauges to `counts`.
    pub fn render(&self, counts: &std::collections::BTreeMap<&'static str, u64>) -> String {
        for (state, n) in counts {
            self.sandboxes
                .get_or_create(&vec![("state".into(), (*state).into())])
                .set(*n as i64);
        }
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
