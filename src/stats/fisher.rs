//! The one-sided Fisher exact test the analysis uses to tell a canary's higher error rate
//! from chance, exact at the small samples where a normal approximation would roll back on
//! one error.

fn ln_gamma(x: f64) -> f64 {
    // Lanczos approximation (g = 7, n = 9): ~15 significant digits for x > 0.
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + 7.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

fn ln_choose(n: u64, k: u64) -> f64 {
    ln_gamma(n as f64 + 1.0) - ln_gamma(k as f64 + 1.0) - ln_gamma((n - k) as f64 + 1.0)
}

/// One-sided Fisher exact test: the probability of seeing at least `a` canary errors among
/// `n1` canary requests if both versions failed alike (`a + b` errors in `n1 + n2`).
/// Small values mean the canary is worse.
pub fn fisher_upper_p(a: u64, n1: u64, b: u64, n2: u64) -> f64 {
    let (n, k) = (n1 + n2, a + b);
    if n1 == 0 || k == 0 {
        return 1.0;
    }
    let denom = ln_choose(n, n1);
    let hi = n1.min(k);
    let mut p = 0.0;
    for x in a..=hi {
        if k - x > n2 {
            continue;
        }
        let term = (ln_choose(k, x) + ln_choose(n - k, n1 - x) - denom).exp();
        p += term;
        // Terms fall fast past the mode: stop once they no longer matter.
        if term < p * 1e-12 && x > a + 10 {
            break;
        }
    }
    p.min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fisher_matches_known_values() {
        // Hypergeometric by hand: 1 error in 220, 20 of them canary: P(X >= 1) = 20/220.
        assert!((fisher_upper_p(1, 20, 0, 200) - 20.0 / 220.0).abs() < 1e-9);
        assert!(fisher_upper_p(0, 20, 5, 200) > 0.999);
        assert!(fisher_upper_p(100, 100, 0, 900) < 1e-12);
        assert!(fisher_upper_p(2_000, 3_000, 50, 27_000) < 1e-12);
    }
}
