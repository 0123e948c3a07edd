//! Sampling settings from the command line and the standard environment variables.
//!
//! Precedence, per setting: command-line flag > environment variable > default. Empty values
//! count as unset, as the OpenTelemetry environment specification says. A bad value is an error
//! naming the flag or variable it came from, never a silent fallback.

use super::{
    keep::{LatencyRule, parse_latency_rule},
    rule::{HeadSampler, Root},
};

/// The standard sampler variable.
pub const TRACES_SAMPLER: &str = "OTEL_TRACES_SAMPLER";
/// The standard sampler argument variable (the ratio of the `*traceidratio` samplers).
pub const TRACES_SAMPLER_ARG: &str = "OTEL_TRACES_SAMPLER_ARG";
/// Latency keep rules, comma-separated.
pub const KEEP_SLOWER_THAN: &str = "TAPWIRE_KEEP_SLOWER_THAN";
/// Whether spans with Error status are kept when head sampling dropped them.
pub const KEEP_ERRORS: &str = "TAPWIRE_KEEP_ERRORS";

/// The sampler names tapwire implements.
pub const SAMPLER_NAMES: &str =
    "always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off, parentbased_traceidratio";

/// Sampling flags of `tapwire run`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SamplingArgs {
    /// Head sampler: always_on, always_off, traceidratio, parentbased_always_on (default),
    /// parentbased_always_off or parentbased_traceidratio. Overrides OTEL_TRACES_SAMPLER.
    #[arg(long, value_name = "NAME")]
    pub traces_sampler: Option<String>,
    /// Sampling ratio in [0, 1] of the *traceidratio samplers (default 1). Overrides
    /// OTEL_TRACES_SAMPLER_ARG.
    #[arg(long, value_name = "RATIO")]
    pub traces_sampler_arg: Option<String>,
    /// Export spans slower than DURATION even when head sampling dropped their trace:
    /// `500ms` (every service), `SERVICE=1s`, `SERVICE:/route=2s`, `*:/route=2s`; the most
    /// specific rule wins. Repeatable; TAPWIRE_KEEP_SLOWER_THAN takes a comma-separated list.
    #[arg(long = "keep-slower-than", value_name = "[SERVICE[:ROUTE]=]DURATION")]
    pub keep_slower_than: Vec<String>,
    /// Export spans with Error status even when head sampling dropped their trace: true
    /// (default) or false. Overrides TAPWIRE_KEEP_ERRORS.
    #[arg(long, value_name = "BOOL")]
    pub keep_errors: Option<String>,
}

/// A bad sampling setting; names where it came from and the value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SamplingError {
    #[error("{origin}={value:?}: unknown sampler, expected one of {SAMPLER_NAMES}")]
    UnknownSampler { origin: String, value: String },
    #[error("{origin}={value:?}: this sampler needs a remote sampling service, which tapwire does not support; expected one of {SAMPLER_NAMES}")]
    UnsupportedSampler { origin: String, value: String },
    #[error("{origin}={value:?}: {sampler} takes a sampling ratio between 0 and 1, e.g. 0.25")]
    BadRatio { origin: String, value: String, sampler: &'static str },
    #[error("{origin}={value:?}: {reason}")]
    BadKeepRule { origin: String, value: String, reason: String },
    #[error("{origin}={value:?}: expected true or false")]
    BadBool { origin: String, value: String },
}

/// Resolved sampling settings.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingConfig {
    /// The head sampler of every service without an override.
    pub head: HeadSampler,
    /// Per-service head samplers (by `service.name`), from the configuration file.
    pub per_service: Vec<(String, HeadSampler)>,
    /// Keep spans with Error status.
    pub keep_errors: bool,
    /// Keep spans slower than a threshold.
    pub keep_slower_than: Vec<LatencyRule>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig { head: HeadSampler::DEFAULT, per_service: Vec::new(), keep_errors: true, keep_slower_than: Vec::new() }
    }
}

/// A value and the flag or variable it came from.
struct Setting {
    origin: String,
    value: String,
}

/// The flag's value if given, else the variable's if set and not empty.
fn pick(flag: Option<&str>, flag_name: &str, var: &str, env: &dyn Fn(&str) -> Option<String>) -> Option<Setting> {
    if let Some(v) = flag {
        return Some(Setting { origin: flag_name.to_owned(), value: v.to_owned() });
    }
    env(var).filter(|v| !v.trim().is_empty()).map(|value| Setting { origin: var.to_owned(), value })
}

/// The `sampling:` section of the configuration file; each setting is overridden by its flag
/// and its variable.
///
/// ```yaml
/// sampling:
///   sampler: parentbased_traceidratio   # OTEL_TRACES_SAMPLER
///   ratio: 0.1                          # OTEL_TRACES_SAMPLER_ARG
///   keep_errors: true                   # TAPWIRE_KEEP_ERRORS
///   keep_slower_than: ["2s", "checkout:/pay/{id}=500ms"]   # TAPWIRE_KEEP_SLOWER_THAN
///   services:                           # per service.name, head sampling only
///     checkout: { sampler: always_on }
///     search: { sampler: traceidratio, ratio: 0.01 }
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SamplingFile {
    /// Head sampler name, as `OTEL_TRACES_SAMPLER`.
    pub sampler: Option<String>,
    /// Ratio of the `*traceidratio` samplers, as `OTEL_TRACES_SAMPLER_ARG`.
    pub ratio: Option<f64>,
    /// Keep spans with Error status.
    pub keep_errors: Option<bool>,
    /// Latency keep rules, as `--keep-slower-than`.
    pub keep_slower_than: Option<Vec<String>>,
    /// Head sampler overrides by `service.name`.
    pub services: Vec<(String, ServiceSamplingFile)>,
}

/// One service's head sampler in the configuration file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceSamplingFile {
    /// Head sampler name (default: the agent-wide one).
    pub sampler: Option<String>,
    /// Ratio of a `*traceidratio` sampler (default 1).
    pub ratio: Option<f64>,
}

impl SamplingConfig {
    /// Resolves the settings: `args` (the command line) over `env` (the environment), without
    /// a configuration file.
    pub fn resolve(args: &SamplingArgs, env: &dyn Fn(&str) -> Option<String>) -> Result<SamplingConfig, SamplingError> {
        Self::resolve_with_file(args, env, &SamplingFile::default())
    }

    /// Resolves the settings: `args` over `env` over `file`, setting by setting.
    pub fn resolve_with_file(
        args: &SamplingArgs,
        env: &dyn Fn(&str) -> Option<String>,
        file: &SamplingFile,
    ) -> Result<SamplingConfig, SamplingError> {
        let from_file = |key: &str, value: Option<String>| value.map(|value| Setting { origin: format!("sampling.{key}"), value });
        let sampler = pick(args.traces_sampler.as_deref(), "--traces-sampler", TRACES_SAMPLER, env)
            .or_else(|| from_file("sampler", file.sampler.clone()));
        let arg = pick(args.traces_sampler_arg.as_deref(), "--traces-sampler-arg", TRACES_SAMPLER_ARG, env)
            .or_else(|| from_file("ratio", file.ratio.map(|r| r.to_string())));
        let head = match sampler {
            None => HeadSampler::DEFAULT,
            Some(s) => parse_sampler(&s.origin, &s.value, arg.as_ref().map(|a| (a.origin.as_str(), a.value.as_str())))?,
        };

        let mut per_service = Vec::new();
        for (service, overrides) in &file.services {
            let origin = format!("sampling.services.{service}.sampler");
            // A ratio alone means the ratio sampler, parent-based when the agent-wide one is.
            let name = match (&overrides.sampler, overrides.ratio) {
                (Some(name), _) => name.clone(),
                (None, Some(_)) => (if head.parent_based { "parentbased_traceidratio" } else { "traceidratio" }).to_owned(),
                (None, None) => head.name().to_owned(),
            };
            let ratio_origin = format!("sampling.services.{service}.ratio");
            let ratio = overrides.ratio.map(|r| r.to_string());
            per_service.push((service.clone(), parse_sampler(&origin, &name, ratio.as_deref().map(|r| (ratio_origin.as_str(), r)))?));
        }

        let keep_errors = match pick(args.keep_errors.as_deref(), "--keep-errors", KEEP_ERRORS, env)
            .or_else(|| from_file("keep_errors", file.keep_errors.map(|b| b.to_string())))
        {
            None => true,
            Some(s) => match s.value.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" => false,
                _ => return Err(SamplingError::BadBool { origin: s.origin, value: s.value }),
            },
        };

        let rules: Vec<(String, String)> = if !args.keep_slower_than.is_empty() {
            args.keep_slower_than.iter().map(|s| ("--keep-slower-than".to_owned(), s.clone())).collect()
        } else if let Some(v) = env(KEEP_SLOWER_THAN).filter(|v| !v.trim().is_empty()) {
            v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| (KEEP_SLOWER_THAN.to_owned(), s.to_owned())).collect()
        } else {
            file.keep_slower_than.iter().flatten().map(|s| ("sampling.keep_slower_than".to_owned(), s.clone())).collect()
        };
        let mut keep_slower_than = Vec::new();
        for (origin, value) in rules {
            match parse_latency_rule(&value) {
                Ok(rule) => keep_slower_than.push(rule),
                Err(reason) => return Err(SamplingError::BadKeepRule { origin, value, reason }),
            }
        }
        Ok(SamplingConfig { head, per_service, keep_errors, keep_slower_than })
    }
}

/// A sampler by its standard name; `arg` is the ratio (origin, value) for the ratio samplers.
pub fn parse_sampler(origin: &str, value: &str, arg: Option<(&str, &str)>) -> Result<HeadSampler, SamplingError> {
    let name = value.trim().to_ascii_lowercase();
    let (root_name, parent_based) = match name.strip_prefix("parentbased_") {
        Some(rest) => (rest, true),
        None => (name.as_str(), false),
    };
    let root = match root_name {
        "always_on" => Root::Always,
        "always_off" => Root::Never,
        "traceidratio" => {
            let sampler = if parent_based { "parentbased_traceidratio" } else { "traceidratio" };
            let ratio = match arg {
                None => 1.0,
                Some((arg_origin, arg_value)) => parse_ratio(arg_value).ok_or_else(|| SamplingError::BadRatio {
                    origin: arg_origin.to_owned(),
                    value: arg_value.to_owned(),
                    sampler,
                })?,
            };
            Root::ratio(ratio)
        }
        "jaeger_remote" | "xray" => {
            return Err(SamplingError::UnsupportedSampler { origin: origin.to_owned(), value: value.to_owned() });
        }
        _ => return Err(SamplingError::UnknownSampler { origin: origin.to_owned(), value: value.to_owned() }),
    };
    Ok(HeadSampler { root, parent_based })
}

/// A ratio in `[0, 1]`.
fn parse_ratio(value: &str) -> Option<f64> {
    let r: f64 = value.trim().parse().ok()?;
    (0.0..=1.0).contains(&r).then_some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(args: &SamplingArgs, vars: &[(&str, &str)]) -> Result<SamplingConfig, SamplingError> {
        let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        SamplingConfig::resolve(args, &|name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
    }

    fn env(vars: &[(&str, &str)]) -> Result<SamplingConfig, SamplingError> {
        resolve(&SamplingArgs::default(), vars)
    }

    #[test]
    fn default_is_parentbased_always_on_keeping_errors() {
        let c = env(&[]).unwrap();
        assert_eq!(c, SamplingConfig::default());
        assert_eq!(c.head.name(), "parentbased_always_on");
        assert!(c.keep_errors);
        assert_eq!(env(&[(TRACES_SAMPLER, " ")]).unwrap().head, HeadSampler::DEFAULT);
    }

    #[test]
    fn every_standard_name() {
        for (name, root, parent_based) in [
            ("always_on", Root::Always, false),
            ("always_off", Root::Never, false),
            ("traceidratio", Root::ratio(0.25), false),
            ("parentbased_always_on", Root::Always, true),
            ("parentbased_always_off", Root::Never, true),
            ("parentbased_traceidratio", Root::ratio(0.25), true),
        ] {
            let c = env(&[(TRACES_SAMPLER, name), (TRACES_SAMPLER_ARG, "0.25")]).unwrap();
            assert_eq!(c.head, HeadSampler { root, parent_based }, "{name}");
            assert_eq!(c.head.name(), name);
        }
    }

    #[test]
    fn ratio_defaults_to_one_and_is_checked() {
        assert_eq!(env(&[(TRACES_SAMPLER, "traceidratio")]).unwrap().head.root, Root::ratio(1.0));
        assert_eq!(env(&[(TRACES_SAMPLER, "traceidratio"), (TRACES_SAMPLER_ARG, "")]).unwrap().head.root, Root::ratio(1.0));
        assert_eq!(env(&[(TRACES_SAMPLER, "traceidratio"), (TRACES_SAMPLER_ARG, "0")]).unwrap().head.root, Root::ratio(0.0));
        for bad in ["1.5", "-0.1", "half", "NaN", "0,5"] {
            let e = env(&[(TRACES_SAMPLER, "parentbased_traceidratio"), (TRACES_SAMPLER_ARG, bad)]).unwrap_err();
            assert_eq!(
                e,
                SamplingError::BadRatio { origin: TRACES_SAMPLER_ARG.into(), value: bad.into(), sampler: "parentbased_traceidratio" }
            );
            assert!(e.to_string().starts_with(&format!("OTEL_TRACES_SAMPLER_ARG={bad:?}: ")), "{e}");
        }
        // The argument of a sampler that takes none is ignored, as the specification says.
        assert_eq!(env(&[(TRACES_SAMPLER, "always_on"), (TRACES_SAMPLER_ARG, "junk")]).unwrap().head.root, Root::Always);
    }

    #[test]
    fn unknown_samplers_name_the_variable() {
        let e = env(&[(TRACES_SAMPLER, "sometimes")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("OTEL_TRACES_SAMPLER=\"sometimes\": unknown sampler, expected one of {SAMPLER_NAMES}")
        );
        for remote in ["jaeger_remote", "parentbased_jaeger_remote", "xray"] {
            assert!(matches!(env(&[(TRACES_SAMPLER, remote)]), Err(SamplingError::UnsupportedSampler { .. })), "{remote}");
        }
        assert!(matches!(env(&[(TRACES_SAMPLER, "parentbased_")]), Err(SamplingError::UnknownSampler { .. })));
    }

    #[test]
    fn flags_win_over_variables() {
        let args = SamplingArgs {
            traces_sampler: Some("traceidratio".into()),
            traces_sampler_arg: Some("0.5".into()),
            keep_slower_than: vec!["2s".into()],
            keep_errors: Some("false".into()),
        };
        let c = resolve(&args, &[(TRACES_SAMPLER, "always_off"), (TRACES_SAMPLER_ARG, "0.1"), (KEEP_SLOWER_THAN, "1s"), (KEEP_ERRORS, "true")])
            .unwrap();
        assert_eq!(c.head, HeadSampler { root: Root::ratio(0.5), parent_based: false });
        assert!(!c.keep_errors);
        assert_eq!(c.keep_slower_than, vec![LatencyRule { service: None, route: None, threshold_ns: 2_000_000_000 }]);
        // A flag's bad value names the flag.
        let bad = SamplingArgs { traces_sampler_arg: Some("2".into()), ..args.clone() };
        assert_eq!(resolve(&bad, &[]).unwrap_err().to_string(), "--traces-sampler-arg=\"2\": traceidratio takes a sampling ratio between 0 and 1, e.g. 0.25");
        // The ratio may come from the variable while the sampler comes from the flag.
        let mixed = SamplingArgs { traces_sampler_arg: None, ..args };
        assert_eq!(resolve(&mixed, &[(TRACES_SAMPLER_ARG, "0.1")]).unwrap().head.root, Root::ratio(0.1));
    }

    #[test]
    fn file_settings_below_variables_and_flags() {
        let file = SamplingFile {
            sampler: Some("parentbased_traceidratio".into()),
            ratio: Some(0.25),
            keep_errors: Some(false),
            keep_slower_than: Some(vec!["3s".into(), "checkout:/pay=1s".into()]),
            services: vec![
                ("checkout".into(), ServiceSamplingFile { sampler: Some("always_on".into()), ratio: None }),
                ("search".into(), ServiceSamplingFile { sampler: None, ratio: Some(0.5) }),
            ],
        };
        let with = |args: &SamplingArgs, vars: &[(&str, &str)], file: &SamplingFile| {
            let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
            SamplingConfig::resolve_with_file(args, &|name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()), file)
        };
        let c = with(&SamplingArgs::default(), &[], &file).unwrap();
        assert_eq!(c.head, HeadSampler { root: Root::ratio(0.25), parent_based: true });
        assert!(!c.keep_errors);
        assert_eq!(c.keep_slower_than.len(), 2);
        // A service with a ratio and no sampler name gets the ratio sampler, parent-based like
        // the agent-wide one.
        assert_eq!(
            c.per_service,
            vec![
                ("checkout".into(), HeadSampler { root: Root::Always, parent_based: false }),
                ("search".into(), HeadSampler { root: Root::ratio(0.5), parent_based: true }),
            ]
        );
        // Variables override the file setting by setting.
        let c = with(&SamplingArgs::default(), &[(TRACES_SAMPLER_ARG, "0.1"), (KEEP_ERRORS, "true"), (KEEP_SLOWER_THAN, "9s")], &file).unwrap();
        assert_eq!(c.head, HeadSampler { root: Root::ratio(0.1), parent_based: true });
        assert!(c.keep_errors);
        assert_eq!(c.keep_slower_than, vec![LatencyRule { service: None, route: None, threshold_ns: 9_000_000_000 }]);
        // Flags override both.
        let args = SamplingArgs { traces_sampler: Some("always_off".into()), ..SamplingArgs::default() };
        assert_eq!(with(&args, &[(TRACES_SAMPLER, "always_on")], &file).unwrap().head, HeadSampler { root: Root::Never, parent_based: false });
        // File errors name the key.
        let bad = SamplingFile { ratio: Some(2.0), ..file.clone() };
        assert_eq!(
            with(&SamplingArgs::default(), &[], &bad).unwrap_err().to_string(),
            "sampling.ratio=\"2\": parentbased_traceidratio takes a sampling ratio between 0 and 1, e.g. 0.25"
        );
        let bad = SamplingFile {
            services: vec![("cart".into(), ServiceSamplingFile { sampler: Some("most".into()), ratio: None })],
            ..SamplingFile::default()
        };
        assert!(with(&SamplingArgs::default(), &[], &bad).unwrap_err().to_string().starts_with("sampling.services.cart.sampler=\"most\": unknown sampler"));
        let always = SamplingFile {
            services: vec![("search".into(), ServiceSamplingFile { sampler: None, ratio: Some(0.5) })],
            ..SamplingFile::default()
        };
        assert_eq!(
            with(&SamplingArgs::default(), &[(TRACES_SAMPLER, "always_on")], &always).unwrap().per_service,
            vec![("search".into(), HeadSampler { root: Root::ratio(0.5), parent_based: false })]
        );
        let bad = SamplingFile { keep_slower_than: Some(vec!["soon".into()]), ..SamplingFile::default() };
        assert!(with(&SamplingArgs::default(), &[], &bad).unwrap_err().to_string().starts_with("sampling.keep_slower_than=\"soon\": "));
    }

    #[test]
    fn keep_settings_from_the_environment() {
        let c = env(&[(KEEP_SLOWER_THAN, "500ms, checkout=1s,,*:/pay=250ms"), (KEEP_ERRORS, "0")]).unwrap();
        assert!(!c.keep_errors);
        assert_eq!(
            c.keep_slower_than,
            vec![
                LatencyRule { service: None, route: None, threshold_ns: 500_000_000 },
                LatencyRule { service: Some("checkout".into()), route: None, threshold_ns: 1_000_000_000 },
                LatencyRule { service: None, route: Some("/pay".into()), threshold_ns: 250_000_000 },
            ]
        );
        let e = env(&[(KEEP_SLOWER_THAN, "1s,checkout=fast")]).unwrap_err();
        assert!(e.to_string().starts_with("TAPWIRE_KEEP_SLOWER_THAN=\"checkout=fast\": "), "{e}");
        let e = env(&[(KEEP_ERRORS, "maybe")]).unwrap_err();
        assert_eq!(e.to_string(), "TAPWIRE_KEEP_ERRORS=\"maybe\": expected true or false");
    }
}
