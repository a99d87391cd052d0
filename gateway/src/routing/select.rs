//! Power-of-two-choices selection on normalised load.
//!
//! Draw two distinct candidates at random and keep the one with the lower score (in-flight
//! tokens over effective capacity). This is the "power of two choices" result (Mitzenmacher,
//! 2001) as used by tower's `p2c` balancer and Envoy's least-request LB: nearly as good as
//! scanning every shard for the least loaded, without herding every gateway replica onto the
//! same shard when their load views are slightly stale. With two candidates it degenerates
//! to "the less loaded of the two", which is exact.

use rand::Rng;

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
}
