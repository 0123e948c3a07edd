//! Which finished spans are exported: head sampling by trace id (the OpenTelemetry samplers),
//! then keep rules for errors and slow requests. Sits between the metrics (computed from every
//! span) and the span exporter.
//!
//! The head decision is a pure function of the trace id and the parent's sampled flag
//! ([`rule`]), so every span of a trace gets the same decision on every node: the kernel takes
//! the same decision for the `traceparent` tapwire injects ([`Sampler::kernel_params`]).
//!
//! Contract with the span builder: a span with a parent carries the parent's decision in bit 0
//! of [`Span::flags`], the incoming `traceparent`'s flag for a remote parent and the decision
//! of the SERVER span for an in-process (local) child. The sampler then sets bit 0 of every
//! span it passes on to that span's own head decision, which is what OTLP exports.

pub mod config;
pub mod keep;
pub mod rule;

use std::sync::Arc;

pub use self::{
    config::{SamplingArgs, SamplingConfig, SamplingError, SamplingFile, ServiceSamplingFile},
    keep::{KeepRules, KeptBy, LatencyRule},
    rule::{HeadSampler, Parent, Root},
};
use crate::{model::Span, telemetry::Counters};

/// Attribute on spans exported by a keep rule although head sampling dropped their trace:
/// `"error"` or `"latency"`.
pub const KEPT_BY_ATTRIBUTE: &str = "tapwire.sampling.kept_by";

/// Decides, span by span, what is exported; counts what it drops and what rules keep.
#[derive(Debug)]
pub struct Sampler {
    head: HeadSampler,
    per_service: Vec<(String, HeadSampler)>,
    keep: KeepRules,
    counters: Arc<Counters>,
}

impl Sampler {
    pub fn new(config: SamplingConfig, counters: Arc<Counters>) -> Sampler {
        Sampler {
            head: config.head,
            per_service: config.per_service,
            keep: KeepRules { errors: config.keep_errors, slower_than: config.keep_slower_than },
            counters,
        }
    }

    /// What the kernel needs to take the default head decision itself:
    /// `(root: 0 never | 1 always | 2 ratio, parent_based: 0 | 1, threshold T)`; see [`rule`].
    pub fn kernel_params(&self) -> (u32 /* root */, u32 /* parent_based */, u64 /* T */) {
        self.head.kernel_params()
    }

    /// [`Sampler::kernel_params`] for one service: its override, else the default. The kernel
    /// needs these per watched cgroup when services have overrides.
    pub fn kernel_params_for(&self, service_name: &str) -> (u32, u32, u64) {
        self.head_for(service_name).kernel_params()
    }

    /// The head sampler of a service (its override, else the default).
    pub fn head_for(&self, service_name: &str) -> &HeadSampler {
        self.per_service.iter().find(|(s, _)| s == service_name).map_or(&self.head, |(_, h)| h)
    }

    /// The head decision for a span, from its trace id and its parent's sampled flag.
    pub fn head_decision(&self, span: &Span) -> bool {
        let parent = Parent::from_flags(span.parent_span_id.is_some(), span.flags);
        self.head_for(&span.resource.service_name).should_sample(&span.trace_id, parent)
    }

    /// The span to export, if any: sampled by head sampling, or kept by a rule (then marked
    /// with [`KEPT_BY_ATTRIBUTE`]). Sets bit 0 of the span's flags to its head decision.
    pub fn apply(&self, mut span: Span) -> Option<Span> {
        let sampled = self.head_decision(&span);
        span.flags = (span.flags & !1) | u8::from(sampled);
        if sampled {
            return Some(span);
        }
        match self.keep.check(&span) {
            Some(kept_by) => {
                Counters::inc(match kept_by {
                    KeptBy::Error => &self.counters.spans_kept_error,
                    KeptBy::Latency => &self.counters.spans_kept_latency,
                });
                span.attributes.push(KEPT_BY_ATTRIBUTE, kept_by.as_str());
                Some(span)
            }
            None => {
                Counters::inc(&self.counters.spans_sampled_out);
                None
            }
        }
    }

    /// One log line describing the settings.
    pub fn log_settings(&self) {
        let ratio = match self.head.root {
            Root::Ratio { ratio, .. } => Some(ratio),
            _ => None,
        };
        tracing::info!(
            sampler = self.head.name(),
            ratio,
            per_service = ?self.per_service,
            keep_errors = self.keep.errors,
            keep_slower_than = ?self.keep.slower_than,
            "span sampling"
        );
    }
}

#[cfg(test)]
mod tests;
