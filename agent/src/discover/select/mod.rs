//! Which processes tapwire watches: cgroup paths and globs, Kubernetes namespaces and pod
//! labels, listening ports, executable names, each with exclusions.

pub mod labels;
pub mod pattern;

pub use labels::LabelSelector;
pub use pattern::{CgroupPattern, ExeGlob};

/// The user's selection, resolved from flags, environment and configuration file. A process is
/// watched when it matches every kind of criterion that is given (one value of a kind is
/// enough) and no exclusion of any kind.
#[derive(Clone, Debug, PartialEq)]
pub struct SelectionConfig {
    pub cgroups: Vec<CgroupPattern>,
    pub exclude_cgroups: Vec<CgroupPattern>,
    pub namespaces: Vec<String>,
    pub exclude_namespaces: Vec<String>,
    pub pod_selectors: Vec<LabelSelector>,
    pub exclude_pod_selectors: Vec<LabelSelector>,
    pub ports: Vec<u16>,
    pub exclude_ports: Vec<u16>,
    pub executables: Vec<ExeGlob>,
    pub exclude_executables: Vec<ExeGlob>,
    /// Leave out processes that export OTLP traces themselves.
    pub exclude_otlp_exporters: bool,
}

impl SelectionConfig {
    /// Whether any inclusion criterion is given (without one, nothing would be watched).
    pub fn selects_anything(&self) -> bool {
        !(self.cgroups.is_empty()
            && self.namespaces.is_empty()
            && self.pod_selectors.is_empty()
            && self.ports.is_empty()
            && self.executables.is_empty())
    }

    /// Whether the selection needs Kubernetes metadata.
    pub fn uses_pods(&self) -> bool {
        !(self.namespaces.is_empty()
            && self.exclude_namespaces.is_empty()
            && self.pod_selectors.is_empty()
            && self.exclude_pod_selectors.is_empty())
    }

    /// Whether only some processes of a selected cgroup are watched (ports, executables).
    pub fn per_process(&self) -> bool {
        !(self.ports.is_empty() && self.executables.is_empty())
    }
}
