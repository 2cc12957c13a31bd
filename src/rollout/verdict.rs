//! The analysis' judgement of one evaluation: the canary's window against stable's.
//!
//! [`evaluate`] turns a canary window and the stable window of the same span into a
//! verdict. Absolute rules (`max_error_rate`, `max_p99_latency`) fail the canary only when
//! stable does not fail them alike; the relative error rule also needs the canary's error
//! rate to be higher than stable's with the configured confidence (a one-sided Fisher exact
//! test, exact at small samples where a normal approximation would roll back on one error).

use serde_json::{json, Value};

use crate::config::AnalysisRules;
use crate::stats::fisher::fisher_upper_p;
use crate::stats::window::WindowStats;

/// The outcome of one evaluation.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Too few canary requests to judge.
    Inconclusive,
    Pass,
    Fail {
        /// `error_rate`, `error_rate_ratio`, `latency`, `latency_ratio`.
        reason: &'static str,
        /// The numbers behind the verdict, for events and logs.
        numbers: Value,
    },
}

/// The dark launch's rule: of the answers compared since the phase began (`compared`),
/// `differing` had a field other than noise differ from stable's. A failure when more than
/// `max_diff_rate` of at least `min_requests` did.
pub fn diff_rate(rules: &AnalysisRules, compared: u64, differing: u64) -> Option<Verdict> {
    let max = rules.max_diff_rate?;
    if compared < rules.min_requests.max(1) {
        return None;
    }
    let rate = differing as f64 / compared as f64;
    (rate > max).then(|| Verdict::Fail {
        reason: "diff_rate",
        numbers: serde_json::json!({
            "compared": compared,
            "differing": differing,
            "diff_rate": rate,
            "max_diff_rate": max,
        }),
    })
}

/// Judges the canary against stable over the same span.
pub fn evaluate(rules: &AnalysisRules, canary: &WindowStats, stable: &WindowStats) -> Verdict {
    if canary.requests < rules.min_requests.max(1) {
        return Verdict::Inconclusive;
    }
    let stable_judged = stable.requests >= rules.min_requests.max(1);
    let numbers = |threshold: Value, extra: Value| {
        let mut v = json!({
            "canary_requests": canary.requests,
            "canary_errors": canary.errors,
            "canary_error_rate": canary.error_rate(),
            "canary_p99_ms": canary.p99 * 1000.0,
            "canary_in_flight_slow": canary.in_flight_slow,
            "canary_in_flight_failed": canary.in_flight_failed,
            "stable_requests": stable.requests,
            "stable_errors": stable.errors,
            "stable_error_rate": stable.error_rate(),
            "stable_p99_ms": stable.p99 * 1000.0,
            "stable_in_flight_slow": stable.in_flight_slow,
            "threshold": threshold,
        });
        if let (Some(obj), Value::Object(more)) = (v.as_object_mut(), extra) {
            obj.extend(more);
        }
        v
    };
    let (cr, sr) = (canary.error_rate(), stable.error_rate());
    if let Some(max) = rules.max_error_rate {
        // Stable failing alike means the problem is not the canary: rolling back cannot help.
        if cr > max && !(stable_judged && sr > max) {
            return Verdict::Fail {
                reason: "error_rate",
                numbers: numbers(json!(max), json!({})),
            };
        }
    }
    if let Some(ratio) = rules.max_error_rate_ratio {
        if stable_judged && cr > ratio * sr {
            let p = fisher_upper_p(
                canary.errors,
                canary.requests,
                stable.errors,
                stable.requests,
            );
            if p < 1.0 - rules.confidence {
                return Verdict::Fail {
                    reason: "error_rate_ratio",
                    numbers: numbers(
                        json!(ratio),
                        json!({ "p_value": p, "confidence": rules.confidence }),
                    ),
                };
            }
        }
    }
    if let Some(max) = rules.max_p99_latency {
        let max = max.as_secs_f64();
        if canary.p99 > max && !(stable_judged && stable.p99 > max) {
            return Verdict::Fail {
                reason: "latency",
                numbers: numbers(json!(max * 1000.0), json!({})),
            };
        }
    }
    if let Some(ratio) = rules.max_p99_latency_ratio {
        if stable_judged && canary.p99 > ratio * stable.p99 {
            return Verdict::Fail {
                reason: "latency_ratio",
                numbers: numbers(json!(ratio), json!({})),
            };
        }
    }
    Verdict::Pass
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The defaults, as a config without `[routes.analysis]` compiles them.
    fn rules() -> AnalysisRules {
        let snap = crate::config::load_str(
            "[[routes]]\nname = \"app\"\n[routes.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:1\"]\n",
            "test.toml",
        )
        .unwrap();
        let rules = snap.routes[0].analysis.clone();
        assert_eq!(rules.max_error_rate_ratio, Some(2.0));
        assert_eq!((rules.min_requests, rules.failure_limit), (20, 1));
        rules
    }

    #[test]
    fn the_diff_rate_rule_needs_its_limit_and_enough_compared_answers() {
        let mut r = rules();
        assert!(diff_rate(&r, 1000, 1000).is_none(), "off without a limit");
        r.max_diff_rate = Some(0.1);
        assert!(diff_rate(&r, 19, 19).is_none(), "too few compared");
        assert!(diff_rate(&r, 100, 10).is_none(), "at the limit");
        match diff_rate(&r, 100, 11) {
            Some(Verdict::Fail { reason, numbers }) => {
                assert_eq!(reason, "diff_rate");
                assert_eq!(numbers["differing"], 11);
            }
            other => panic!("{other:?}"),
        }
    }

    fn stats(requests: u64, errors: u64, p99: f64) -> WindowStats {
        WindowStats {
            requests,
            errors,
            p50: p99 / 2.0,
            p90: p99,
            p99,
            ..Default::default()
        }
    }

    #[test]
    fn small_samples_neither_trigger_nor_hide() {
        let r = rules();
        // One error in 20 canary requests against a clean stable: not significant.
        assert_eq!(
            evaluate(&r, &stats(20, 1, 0.01), &stats(200, 0, 0.01)),
            Verdict::Pass
        );
        // Below min_requests: no verdict at all.
        assert_eq!(
            evaluate(&r, &stats(19, 19, 0.01), &stats(200, 0, 0.01)),
            Verdict::Inconclusive
        );
        // A dead canary at the minimum sample: significant.
        assert!(matches!(
            evaluate(&r, &stats(20, 20, 0.01), &stats(200, 0, 0.01)),
            Verdict::Fail {
                reason: "error_rate_ratio",
                ..
            }
        ));
    }

    #[test]
    fn failing_alike_is_not_the_canary() {
        let mut r = rules();
        r.max_error_rate = Some(0.05);
        r.max_p99_latency = Some(Duration::from_millis(200));
        assert_eq!(
            evaluate(&r, &stats(100, 50, 0.01), &stats(900, 450, 0.01)),
            Verdict::Pass
        );
        assert_eq!(
            evaluate(&r, &stats(100, 0, 0.5), &stats(900, 0, 0.6)),
            Verdict::Pass
        );
        assert!(matches!(
            evaluate(&r, &stats(100, 10, 0.01), &stats(900, 0, 0.01)),
            Verdict::Fail {
                reason: "error_rate",
                ..
            }
        ));
        assert!(matches!(
            evaluate(&r, &stats(100, 0, 0.5), &stats(900, 0, 0.01)),
            Verdict::Fail {
                reason: "latency",
                ..
            }
        ));
        // Blue/green: no stable traffic, absolute rules still judge.
        assert!(matches!(
            evaluate(&r, &stats(100, 10, 0.01), &stats(0, 0, 0.0)),
            Verdict::Fail {
                reason: "error_rate",
                ..
            }
        ));
        r.max_p99_latency_ratio = Some(2.0);
        r.max_p99_latency = None;
        assert!(matches!(
            evaluate(&r, &stats(100, 0, 0.3), &stats(900, 0, 0.1)),
            Verdict::Fail {
                reason: "latency_ratio",
                ..
            }
        ));
    }
}
