//! Power-of-two-choices selection on normalised load.
//!
//! Draw two distinct candidates at random and keep the one with the lower score (in-flight
//! tokens over effective capacity). This is the "power of two choices" result (Mitzenmacher,
//! 2001) as used by tower's `p2c` balancer and Envoy's least-request LB: nearly as good as
//! scanning every shard for the least loaded, without herding every gateway replica onto the
//! same shard when their load views are slightly stale. With two candidates it degenerates
//! to "the less loaded of the two", which is exact.

use rand::Rng;
use smallvec::SmallVec;

/// Picks one of `candidates` by power-of-two-choices on `score` (lower is better).
/// Returns `None` only when `candidates` is empty. The RNG is injected so tests can seed it.
pub fn p2c<R: Rng + ?Sized>(
    candidates: &[usize],
    score: impl Fn(usize) -> f64,
    rng: &mut R,
) -> Option<usize> {
    match candidates.len() {
        0 => None,
        1 => Some(candidates[0]),
        n => {
            let a = rng.gen_range(0..n);
            let mut b = rng.gen_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (candidates[a], candidates[b]);
            if score(b) < score(a) {
                Some(b)
            } else {
                Some(a)
            }
        }
    }
}

/// Tiers this long or shorter are listed whole; longer ones are sampled ([`sampled_p2c`]).
pub const SCAN_UP_TO: usize = 16;

/// Random draws a sampled tier gets before it is listed whole after all.
const DRAWS: usize = 16;

/// [`p2c`] over the members of `tier` that `eligible` admits, without listing them: draws
/// members at random until two distinct eligible ones turn up and keeps the one with the
/// lower score, so a request costs the same in a pool of ten shards or of ten thousand.
/// Rejection sampling draws every pair of eligible members with the same chance as listing
/// them and drawing from the list would. A short tier, or one where the draws find fewer
/// than two (most of it ineligible: ejected, full), is listed whole, which is exact.
pub fn sampled_p2c<R: Rng + ?Sized>(
    tier: &[usize],
    eligible: impl Fn(usize) -> bool,
    score: impl Fn(usize) -> f64,
    rng: &mut R,
) -> Option<usize> {
    if tier.len() > SCAN_UP_TO {
        let mut first: Option<usize> = None;
        for _ in 0..DRAWS {
            let i = tier[rng.gen_range(0..tier.len())];
            if first == Some(i) || !eligible(i) {
                continue;
            }
            match first {
                None => first = Some(i),
                Some(a) => return Some(if score(i) < score(a) { i } else { a }),
            }
        }
    }
    let listed: SmallVec<[usize; SCAN_UP_TO]> =
        tier.iter().copied().filter(|i| eligible(*i)).collect();
    p2c(&listed, score, rng)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    #[test]
    fn empty_and_single() {
        let mut rng = SmallRng::seed_from_u64(1);
        assert_eq!(p2c(&[], |_| 0.0, &mut rng), None);
        assert_eq!(p2c(&[7], |_| 0.0, &mut rng), Some(7));
    }

    #[test]
    fn with_two_the_less_loaded_always_wins() {
        let mut rng = SmallRng::seed_from_u64(2);
        for _ in 0..100 {
            assert_eq!(p2c(&[0, 1], |i| [5.0, 1.0][i], &mut rng), Some(1));
        }
    }

    #[test]
    fn the_most_loaded_of_many_is_never_chosen_and_the_least_is_favoured() {
        let mut rng = SmallRng::seed_from_u64(3);
        let scores = [0.1, 0.5, 0.9, 2.0];
        let mut counts = [0u32; 4];
        for _ in 0..10_000 {
            let i = p2c(&[0, 1, 2, 3], |i| scores[i], &mut rng).unwrap();
            counts[i] += 1;
        }
        assert_eq!(counts[3], 0);
        // The least loaded wins every pair it is drawn into: 3 of the 6 pairs, so half.
        assert!((4_700..=5_300).contains(&counts[0]), "{counts:?}");
        assert!(counts[0] > counts[1] && counts[1] > counts[2], "{counts:?}");
    }

    #[test]
    fn sampling_a_long_tier_keeps_to_the_eligible_and_favours_the_least_loaded() {
        let mut rng = SmallRng::seed_from_u64(4);
        let tier: Vec<usize> = (0..1000).collect();
        // Only multiples of 10 are eligible; the score is the index.
        let mut counts = vec![0u32; 1000];
        for _ in 0..20_000 {
            let i = sampled_p2c(&tier, |i| i % 10 == 0, |i| i as f64, &mut rng).unwrap();
            counts[i] += 1;
        }
        assert!(counts
            .iter()
            .enumerate()
            .all(|(i, c)| i % 10 == 0 || *c == 0));
        // p2c over 100 eligible: the k-th least loaded wins 2(100-k-1)/(100·99) of draws.
        assert!(
            counts[0] > counts[500] && counts[500] > counts[980],
            "{:?}",
            &counts[..50]
        );
        assert_eq!(counts[990], 0, "the most loaded never wins a pair");
        let expected_best = 20_000.0 * 2.0 * 99.0 / (100.0 * 99.0);
        assert!(
            (f64::from(counts[0]) - expected_best).abs() < expected_best * 0.25,
            "{}",
            counts[0]
        );
    }

    #[test]
    fn a_tier_almost_all_ineligible_is_listed_and_none_only_when_none_is_eligible() {
        let mut rng = SmallRng::seed_from_u64(5);
        let tier: Vec<usize> = (0..5000).collect();
        for _ in 0..100 {
            assert_eq!(
                sampled_p2c(&tier, |i| i == 4321, |_| 0.0, &mut rng),
                Some(4321)
            );
        }
        assert_eq!(sampled_p2c(&tier, |_| false, |_| 0.0, &mut rng), None);
        // Short tiers are listed: the same as p2c.
        assert_eq!(sampled_p2c(&[3, 9], |i| i == 9, |_| 0.0, &mut rng), Some(9));
    }
}
