//! The head-sampling decision: a pure function of the trace id and the parent's sampled flag.
//!
//! The same rule runs in the kernel (for the `traceparent` tapwire injects) and here (for the
//! spans tapwire exports), so both must stay exactly this:
//!
//! - ratio samplers keep a trace iff `R >= T`, where `R` is the 56 least significant bits of the
//!   trace id (bytes 9..16 read big-endian) and `T = round((1 - ratio) * 2^56)` clamped to
//!   `[0, 2^56]`: the OpenTelemetry consistent-probability threshold. Every node and service
//!   therefore keeps or drops the same trace ids;
//! - `always_on` keeps everything, `always_off` nothing;
//! - parent-based samplers follow the parent's sampled flag (bit 0 of the W3C flags) when the
//!   span has a parent, remote (an incoming `traceparent`) or local (the SERVER span of the same
//!   process), as the OpenTelemetry defaults for `ParentBased` do; root spans use the root
//!   sampler.

/// `2^56`: the threshold that rejects every trace id.
pub const MAX_THRESHOLD: u64 = 1 << 56;

/// What a span's own root sampler does.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Root {
    /// `always_off`: drop.
    Never,
    /// `always_on`: keep.
    Always,
    /// `traceidratio`: keep iff the trace id's randomness reaches `threshold`.
    Ratio {
        /// The configured ratio, in `[0, 1]`.
        ratio: f64,
        /// `round((1 - ratio) * 2^56)`, in `[0, 2^56]`.
        threshold: u64,
    },
}

impl Root {
    /// A ratio sampler. `ratio` must be in `[0, 1]` (checked by the configuration).
    pub fn ratio(ratio: f64) -> Root {
        Root::Ratio { ratio, threshold: threshold(ratio) }
    }
}

/// A head sampler: the root rule, and whether a parent's decision takes precedence.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HeadSampler {
    pub root: Root,
    /// `parentbased_*`: a span with a parent follows the parent's sampled flag.
    pub parent_based: bool,
}

/// The parent of a span as far as sampling is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parent {
    /// A root span: no parent.
    None,
    /// A parent (remote or in-process) whose sampled flag is this.
    Sampled(bool),
}

impl Parent {
    /// From W3C trace flags: [`Parent::Sampled`] with bit 0 when there is a parent.
    pub fn from_flags(has_parent: bool, flags: u8) -> Parent {
        if has_parent { Parent::Sampled(flags & 1 == 1) } else { Parent::None }
    }
}

/// Kernel encoding of [`Root`]: never.
pub const KERNEL_ROOT_NEVER: u32 = 0;
/// Kernel encoding of [`Root`]: always.
pub const KERNEL_ROOT_ALWAYS: u32 = 1;
/// Kernel encoding of [`Root`]: ratio against the threshold.
pub const KERNEL_ROOT_RATIO: u32 = 2;

impl HeadSampler {
    /// The OpenTelemetry default, `parentbased_always_on`.
    pub const DEFAULT: HeadSampler = HeadSampler { root: Root::Always, parent_based: true };

    /// Whether a span of this trace, with this parent, is sampled.
    pub fn should_sample(&self, trace_id: &[u8; 16], parent: Parent) -> bool {
        if self.parent_based
            && let Parent::Sampled(sampled) = parent
        {
            return sampled;
        }
        match self.root {
            Root::Never => false,
            Root::Always => true,
            Root::Ratio { threshold, .. } => randomness(trace_id) >= threshold,
        }
    }

    /// What the kernel needs to take the same decision:
    /// `(root: 0 never | 1 always | 2 ratio, parent_based: 0 | 1, threshold T)`.
    /// `T` is 0 unless the root is a ratio.
    pub fn kernel_params(&self) -> (u32 /* root */, u32 /* parent_based */, u64 /* T */) {
        let (root, t) = match self.root {
            Root::Never => (KERNEL_ROOT_NEVER, 0),
            Root::Always => (KERNEL_ROOT_ALWAYS, 0),
            Root::Ratio { threshold, .. } => (KERNEL_ROOT_RATIO, threshold),
        };
        (root, u32::from(self.parent_based), t)
    }

    /// The standard name of this sampler (`OTEL_TRACES_SAMPLER` value).
    pub fn name(&self) -> &'static str {
        match (self.parent_based, self.root) {
            (false, Root::Always) => "always_on",
            (false, Root::Never) => "always_off",
            (false, Root::Ratio { .. }) => "traceidratio",
            (true, Root::Always) => "parentbased_always_on",
            (true, Root::Never) => "parentbased_always_off",
            (true, Root::Ratio { .. }) => "parentbased_traceidratio",
        }
    }
}

/// `R`: the 56 least significant bits of the trace id (bytes 9..16, big-endian).
pub fn randomness(trace_id: &[u8; 16]) -> u64 {
    trace_id[9..16].iter().fold(0u64, |r, &b| (r << 8) | u64::from(b))
}

/// `T = round((1 - ratio) * 2^56)` clamped to `[0, 2^56]`; NaN counts as ratio 0.
pub fn threshold(ratio: f64) -> u64 {
    let t = ((1.0 - ratio) * MAX_THRESHOLD as f64).round();
    if t.is_nan() || t >= MAX_THRESHOLD as f64 {
        MAX_THRESHOLD
    } else if t <= 0.0 {
        0
    } else {
        // An integer in (0, 2^56): exact as u64.
        t as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(hex_id: &str) -> [u8; 16] {
        let mut out = [0; 16];
        hex::decode_to_slice(hex_id, &mut out).unwrap();
        out
    }

    #[test]
    fn randomness_is_the_low_56_bits() {
        assert_eq!(randomness(&id("ffffffffffffffffff00000000000000")), 0);
        assert_eq!(randomness(&id("000000000000000000ffffffffffffff")), MAX_THRESHOLD - 1);
        assert_eq!(randomness(&id("4bf92f3577b34da6a3ce929d0e0e4736")), 0xce929d0e0e4736);
        // Byte 8 does not count.
        assert_eq!(randomness(&id("0000000000000000ff00000000000001")), 1);
    }

    #[test]
    fn thresholds() {
        assert_eq!(threshold(1.0), 0);
        assert_eq!(threshold(0.0), MAX_THRESHOLD);
        assert_eq!(threshold(0.5), 1 << 55);
        assert_eq!(threshold(0.25), 3 << 54);
        // (1 - 0.1) * 2^56 is exact in f64 (a 53-bit mantissa scaled by a power of two); the
        // end-to-end tests recompute this very value in Python.
        assert_eq!(threshold(0.1), 64_851_834_634_135_144);
        assert_eq!(threshold(0.1), ((1.0 - 0.1) * 72_057_594_037_927_936.0_f64).round() as u64);
        assert_eq!(threshold(f64::NAN), MAX_THRESHOLD);
        assert_eq!(threshold(-1.0), MAX_THRESHOLD);
        assert_eq!(threshold(2.0), 0);
        // 1 - 2^-56 rounds to 1 in f64: ratios that small keep nothing.
        assert_eq!(threshold(1.0 / MAX_THRESHOLD as f64), MAX_THRESHOLD);
        assert_eq!(threshold(1.0 / (1u64 << 52) as f64), MAX_THRESHOLD - 16);
    }

    #[test]
    fn ratio_keeps_ids_at_or_above_the_threshold() {
        let half = HeadSampler { root: Root::ratio(0.5), parent_based: false };
        assert!(half.should_sample(&id("00000000000000000080000000000000"), Parent::None));
        assert!(!half.should_sample(&id("ffffffffffffffffff7fffffffffffff"), Parent::None));
        // Ratio 1 keeps R = 0, ratio 0 drops the largest R.
        assert!(HeadSampler { root: Root::ratio(1.0), parent_based: false }.should_sample(&[0; 16], Parent::None));
        let zero = HeadSampler { root: Root::ratio(0.0), parent_based: false };
        assert!(!zero.should_sample(&[0xff; 16], Parent::None));
        // Not parent-based: the parent's flag is ignored.
        assert!(half.should_sample(&id("00000000000000000080000000000000"), Parent::Sampled(false)));
        assert!(!half.should_sample(&id("00000000000000000000000000000000"), Parent::Sampled(true)));
    }

    #[test]
    fn ratio_keeps_about_the_ratio() {
        // Trace ids spread evenly over R (the midpoints of n equal slices): exactly the share
        // above the threshold is kept.
        let s = HeadSampler { root: Root::ratio(0.1), parent_based: false };
        let n = 10_000u64;
        let kept = (0..n)
            .filter(|i| {
                let r = u64::try_from((u128::from(2 * i + 1) << 56) / u128::from(2 * n)).unwrap();
                let mut t = [0u8; 16];
                t[8..].copy_from_slice(&r.to_be_bytes());
                s.should_sample(&t, Parent::None)
            })
            .count();
        assert_eq!(kept, 1000);
    }

    #[test]
    fn parent_based_follows_the_parent() {
        let never = [0u8; 16];
        for root in [Root::Always, Root::Never, Root::ratio(0.5)] {
            let s = HeadSampler { root, parent_based: true };
            assert!(s.should_sample(&never, Parent::Sampled(true)), "{root:?}");
            assert!(!s.should_sample(&[0xff; 16], Parent::Sampled(false)), "{root:?}");
        }
        let pb_off = HeadSampler { root: Root::Never, parent_based: true };
        assert!(!pb_off.should_sample(&[0xff; 16], Parent::None));
        let pb_ratio = HeadSampler { root: Root::ratio(0.5), parent_based: true };
        assert!(!pb_ratio.should_sample(&never, Parent::None));
        assert!(pb_ratio.should_sample(&[0xff; 16], Parent::None));
        assert!(HeadSampler::DEFAULT.should_sample(&never, Parent::None));
        assert!(!HeadSampler::DEFAULT.should_sample(&never, Parent::Sampled(false)));
    }

    #[test]
    fn not_parent_based_ignores_the_parent() {
        let on = HeadSampler { root: Root::Always, parent_based: false };
        let off = HeadSampler { root: Root::Never, parent_based: false };
        assert!(on.should_sample(&[1; 16], Parent::Sampled(false)));
        assert!(!off.should_sample(&[1; 16], Parent::Sampled(true)));
    }

    #[test]
    fn parent_from_flags() {
        assert_eq!(Parent::from_flags(false, 1), Parent::None);
        assert_eq!(Parent::from_flags(true, 1), Parent::Sampled(true));
        assert_eq!(Parent::from_flags(true, 0), Parent::Sampled(false));
        assert_eq!(Parent::from_flags(true, 0xfe), Parent::Sampled(false));
        assert_eq!(Parent::from_flags(true, 0x03), Parent::Sampled(true));
    }

    #[test]
    fn kernel_params() {
        assert_eq!(HeadSampler::DEFAULT.kernel_params(), (1, 1, 0));
        assert_eq!(HeadSampler { root: Root::Never, parent_based: false }.kernel_params(), (0, 0, 0));
        assert_eq!(HeadSampler { root: Root::Never, parent_based: true }.kernel_params(), (0, 1, 0));
        assert_eq!(HeadSampler { root: Root::ratio(0.5), parent_based: false }.kernel_params(), (2, 0, 1 << 55));
        assert_eq!(HeadSampler { root: Root::ratio(0.0), parent_based: true }.kernel_params(), (2, 1, MAX_THRESHOLD));
    }

    /// The kernel's view of the rule, written from `kernel_params` alone, agrees with
    /// `should_sample` on every sampler and on ids around the threshold.
    #[test]
    fn kernel_params_reproduce_the_decision() {
        let kernel = |(root, parent_based, t): (u32, u32, u64), trace_id: &[u8; 16], parent: Parent| -> bool {
            if parent_based == 1
                && let Parent::Sampled(s) = parent
            {
                return s;
            }
            match root {
                KERNEL_ROOT_NEVER => false,
                KERNEL_ROOT_ALWAYS => true,
                _ => randomness(trace_id) >= t,
            }
        };
        let samplers = [Root::Always, Root::Never, Root::ratio(0.1), Root::ratio(0.5), Root::ratio(1.0), Root::ratio(0.0)]
            .into_iter()
            .flat_map(|root| [false, true].map(|parent_based| HeadSampler { root, parent_based }));
        for s in samplers {
            let (_, _, t) = s.kernel_params();
            for r in [0, 1, t.saturating_sub(1), t, t + 1, MAX_THRESHOLD - 1] {
                let mut trace_id = [0xabu8; 16];
                trace_id[9..].copy_from_slice(&(r & (MAX_THRESHOLD - 1)).to_be_bytes()[1..]);
                for parent in [Parent::None, Parent::Sampled(true), Parent::Sampled(false)] {
                    assert_eq!(kernel(s.kernel_params(), &trace_id, parent), s.should_sample(&trace_id, parent), "{s:?} r={r} {parent:?}");
                }
            }
        }
    }
}
