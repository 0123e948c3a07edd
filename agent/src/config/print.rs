//! `tapwire config --print`: every setting, its effective value and where it came from.

use super::Settings;

/// One line per setting: `key: value` then `# source`, aligned. Secrets (OTLP header values,
/// passwords in endpoint URLs) are masked.
pub fn render(settings: &Settings) -> String {
    let rows: Vec<(String, String)> =
        settings.origins.iter().map(|o| (format!("{}: {}", o.key, o.value), o.source.to_string())).collect();
    let width = rows.iter().map(|(l, _)| l.chars().count()).max().unwrap_or(0);
    let mut out = String::from("# effective configuration (precedence: flag > env > file > default)\n");
    for (left, source) in rows {
        out.push_str(&format!("{left:<width$}  # {source}\n"));
    }
    out
}
