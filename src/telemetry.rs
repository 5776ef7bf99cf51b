//! Logs and traces: `logging` (level, text or JSON, stdout or stderr) and, when
//! `otel.enabled`, OTLP/HTTP export of every span (HTTP requests, reconcile passes, actions).

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::{Layered, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::{LoggingSettings, OtelSettings};

/// Where spans go when `otel.traces_endpoint` is not set.
pub const DEFAULT_TRACES_ENDPOINT: &str = "http://127.0.0.1:4318/v1/traces";

/// Maps the old service's level names (`WARNING`, any case) to a tracing filter directive.
pub fn parse_level(level: &str) -> Result<String, String> {
    let l = level.trim().to_ascii_lowercase();
    let directive = match l.as_str() {
        "trace" | "debug" | "info" | "warn" | "error" | "off" => l,
        "warning" => "warn".into(),
        "critical" | "fatal" => "error".into(),
        _ if EnvFilter::try_new(level).is_ok() && level.contains('=') => level.to_string(),
        _ => return Err(format!("unknown level `{level}`")),
    };
    Ok(directive)
}

/// Keeps the trace exporter alive; flushes and stops it when dropped.
#[derive(Default)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            // The exporter's blocking HTTP client must not be dropped on an async thread.
            let _ = std::thread::spawn(move || provider.shutdown()).join();
        }
    }
}

type Filtered = Layered<EnvFilter, Registry>;
type BoxedLayer = Box<dyn Layer<Filtered> + Send + Sync>;

fn fmt_layer(settings: &LoggingSettings) -> BoxedLayer {
    let to_stderr = settings.output == "stderr";
    let layer = tracing_subscriber::fmt::layer();
    match (settings.format.as_str(), to_stderr) {
        ("json", true) => layer.json().with_writer(std::io::stderr).boxed(),
        ("json", false) => layer.json().boxed(),
        (_, true) => layer.with_writer(std::io::stderr).boxed(),
        (_, false) => layer.boxed(),
    }
}

/// Builds the OTLP/HTTP span exporter. Its blocking HTTP client is created on a plain thread:
/// it may not be built inside the async runtime.
fn tracer_provider(otel: &OtelSettings) -> anyhow::Result<SdkTracerProvider> {
    let endpoint = otel
        .traces_endpoint
        .clone()
        .unwrap_or_else(|| DEFAULT_TRACES_ENDPOINT.to_string());
    let service = otel
        .service_name
        .clone()
        .unwrap_or_else(|| "sandboxd".to_string());
    std::thread::spawn(move || {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint)
            .build()?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(service)
            .build();
        anyhow::Ok(
            SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource)
                .build(),
        )
    })
    .join()
    .map_err(|_| anyhow::anyhow!("OTLP exporter setup panicked"))?
}

/// Installs the global subscriber. `RUST_LOG`, when set, wins over the config. A second call
/// (tests) keeps the first subscriber.
pub fn init(logging: &LoggingSettings, otel: &OtelSettings) -> anyhow::Result<TelemetryGuard> {
    let directive = parse_level(&logging.level).unwrap_or_else(|_| "info".into());
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{directive},sqlx=warn,hyper=warn")));
    let mut layers: Vec<BoxedLayer> = vec![fmt_layer(logging)];
    let mut guard = TelemetryGuard::default();
    if otel.enabled {
        let provider = tracer_provider(otel)?;
        let tracer = provider.tracer("sandboxd");
        layers.push(tracing_opentelemetry::layer().with_tracer(tracer).boxed());
        guard.provider = Some(provider);
    }
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(layers)
        .try_init();
    Ok(guard)
}
