//! Logging setup from the `logging` section: level, text or JSON, stdout or stderr.

use tracing_subscriber::EnvFilter;

use crate::config::LoggingSettings;

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

/// Installs the global subscriber. `RUST_LOG`, when set, wins over the config.
pub fn init(settings: &LoggingSettings) {
    let directive = parse_level(&settings.level).unwrap_or_else(|_| "info".into());
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{directive},sqlx=warn,hyper=warn")));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let to_stderr = settings.output == "stderr";
    let result = match (settings.format.as_str(), to_stderr) {
        ("json", true) => builder.json().with_writer(std::io::stderr).try_init(),
        ("json", false) => builder.json().try_init(),
        (_, true) => builder.with_writer(std::io::stderr).try_init(),
        (_, false) => builder.try_init(),
    };
    // A second init (tests) is harmless.
    let _ = result;
}
