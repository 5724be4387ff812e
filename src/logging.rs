//! Where log lines go and in what shape. Lines go to stdout (systemd's journal and
//! container runtimes collect it), as text for people or as one JSON object per line for
//! log pipelines (`log_format`). Which lines is `CRIER_LOG`, an `EnvFilter` directive
//! (`info` unless set). The subscriber is installed once the settings are resolved, so the
//! settings file can choose the format too.

pub use crate::config::LogFormat;

/// The variable holding the level filter, e.g. `CRIER_LOG=crier=debug,info`.
pub const FILTER_VAR: &str = "CRIER_LOG";

/// Shown at the end of `crier --help` and `crier serve --help`.
pub const HELP: &str = "Logging: lines go to stdout, as text or JSON (--log-format). \
Which lines is the CRIER_LOG variable, a tracing filter: `info` unless set; e.g. \
CRIER_LOG=debug, or CRIER_LOG=crier=debug,info for crier's own debug lines only.";

/// Installs the global subscriber. A second call (tests, `demo` after `serve` in one
/// process) keeps the first.
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env(FILTER_VAR)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(false)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SettingValue;

    #[test]
    fn formats_parse_and_show_back() {
        for f in [LogFormat::Text, LogFormat::Json] {
            assert_eq!(LogFormat::parse(&f.show()), Ok(f));
            assert_eq!(LogFormat::from_toml(f.to_toml()), Ok(f));
        }
        assert!(LogFormat::parse("xml").is_err());
        assert!(LogFormat::from_toml(toml::Value::Integer(1)).is_err());
    }
}
