//! Where log lines go and in what shape. Lines go to stdout (systemd's journal and
//! container runtimes collect it), as text for people or as one JSON object per line for
//! log pipelines (`log_format`). Which lines is `CRIER_LOG`, an `EnvFilter` directive
//! (`info` unless set). The subscriber is installed once the settings are resolved, so the
//! settings file can choose the format too.

use std::fmt;

use crate::config::SettingValue;

/// The variable holding the level filter, e.g. `CRIER_LOG=crier=debug,info`.
pub const FILTER_VAR: &str = "CRIER_LOG";

/// Shown at the end of `crier --help` and `crier serve --help`.
pub const HELP: &str = "Logging: lines go to stdout, as text or JSON (--log-format). \
Which lines is the CRIER_LOG variable, a tracing filter: `info` unless set; e.g. \
CRIER_LOG=debug, or CRIER_LOG=crier=debug,info for crier's own debug lines only.";

/// The shape of each log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable, coloured on a terminal.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields.message` and
    /// the event's other fields.
    Json,
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

impl SettingValue for LogFormat {
    const INVALID: Option<&'static str> = Some("xml");
    fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?} is not a log format (text or json)")),
        }
    }
    fn from_toml(v: toml::Value) -> Result<Self, String> {
        match v {
            toml::Value::String(s) => Self::parse(&s),
            other => Err(format!(
                "a log format is the string \"text\" or \"json\", not {}",
                other.type_str()
            )),
        }
    }
    fn show(&self) -> String {
        self.to_string()
    }
    fn to_toml(&self) -> toml::Value {
        toml::Value::String(self.to_string())
    }
}

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
