//! Token cost estimation: what a request will cost a shard, in tokens, before it runs.
//!
//! cost = prompt tokens + expected completion tokens.
//! - Prompt tokens: prompt text bytes ÷ `bytes_per_token`, times a per-model calibration
//!   ratio learned from the `usage.prompt_tokens` that responses report (an EWMA, so a
//!   tokenizer that packs 3.2 or 4.8 bytes per token is learned within tens of responses).
//! - Completion tokens: `max_completion_tokens` / `max_tokens` (or the policy's default),
//!   capped by the model's learned average completion length once one is known — most
//!   requests stop well before their limit, and charging the limit would overstate load.
//!   Embeddings generate nothing.
//!
//! Learned values are per model, lock-free (f64 bits in atomics). Two responses updating
//! the same model at once may lose one sample; that is harmless for an average.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Weight of a new sample in the moving averages.
const ALPHA: f64 = 0.1;
/// The calibration ratio is kept within this range, so one odd response cannot wreck it.
const RATIO_RANGE: (f64, f64) = (0.1, 10.0);

/// What routing needs to know about a request's size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestSize {
    /// Bytes of prompt text (message contents, prompt, input).
    pub prompt_bytes: usize,
    /// `max_completion_tokens`, else `max_tokens`, if the client set one.
    pub max_completion_tokens: Option<u64>,
    /// Whether the endpoint generates tokens (false for embeddings).
    pub generates: bool,
}

/// A request's estimated cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenCost {
    /// Estimated prompt tokens.
    pub prompt: u64,
    /// Expected completion tokens.
    pub completion: u64,
}

impl TokenCost {
    /// The total charged to a shard's ledger.
    pub fn total(&self) -> u64 {
        self.prompt + self.completion
    }
}

/// What has been learned of one model's requests; shared by the tables that route it.
#[derive(Debug)]
pub struct ModelStats {
    /// Reported prompt tokens ÷ uncalibrated estimate (f64 bits).
    prompt_ratio: AtomicU64,
    /// Average reported completion tokens (f64 bits); 0 until the first sample.
    avg_completion: AtomicU64,
}

impl Default for ModelStats {
    fn default() -> Self {
        Self {
            prompt_ratio: AtomicU64::new(1.0f64.to_bits()),
            avg_completion: AtomicU64::new(0.0f64.to_bits()),
        }
    }
}

fn load(a: &AtomicU64) -> f64 {
    f64::from_bits(a.load(Ordering::Relaxed))
}

fn store(a: &AtomicU64, v: f64) {
    a.store(v.to_bits(), Ordering::Relaxed);
}

/// Estimates request costs and learns from reported usage, per model (models are indexed
/// by the routing table).
#[derive(Debug)]
pub struct Estimator {
    bytes_per_token: f64,
    default_completion_tokens: u64,
    models: Vec<Arc<ModelStats>>,
}

impl Estimator {
    /// An estimator for `models` models with nothing learned yet.
    pub fn new(models: usize, bytes_per_token: f64, default_completion_tokens: u64) -> Self {
        Self {
            bytes_per_token,
            default_completion_tokens,
            models: (0..models).map(|_| Arc::default()).collect(),
        }
    }

    /// An estimator for the models `names` that keeps what `previous` (another table's
    /// names and estimator) learned of the models both have.
    pub fn carried(
        names: &[String],
        bytes_per_token: f64,
        default_completion_tokens: u64,
        previous: Option<(&[String], &Estimator)>,
    ) -> Self {
        let models = names
            .iter()
            .map(|name| {
                previous
                    .and_then(|(old, e)| {
                        let i = old.iter().position(|n| n == name)?;
                        e.models.get(i).cloned()
                    })
                    .unwrap_or_default()
            })
            .collect();
        Self {
            bytes_per_token,
            default_completion_tokens,
            models,
        }
    }

    fn raw_prompt(&self, prompt_bytes: usize) -> f64 {
        (prompt_bytes as f64 / self.bytes_per_token).max(1.0)
    }

    /// The cost of a request to model `model`.
    pub fn estimate(&self, model: usize, size: &RequestSize) -> TokenCost {
        let stats = self.models.get(model);
        let ratio = stats.map_or(1.0, |s| load(&s.prompt_ratio));
        let prompt = (self.raw_prompt(size.prompt_bytes) * ratio).ceil() as u64;
        let completion = if size.generates {
            let asked = size
                .max_completion_tokens
                .unwrap_or(self.default_completion_tokens);
            let avg = stats.map_or(0.0, |s| load(&s.avg_completion));
            if avg > 0.0 {
                asked.min(avg.ceil() as u64)
            } else {
                asked
            }
        } else {
            0
        };
        TokenCost { prompt, completion }
    }

    /// Learns from a response's `usage` block. `completion_tokens` is `None` for
    /// embeddings, whose usage has no completion count.
    pub fn observe(
        &self,
        model: usize,
        prompt_bytes: usize,
        prompt_tokens: u64,
        completion_tokens: Option<u64>,
    ) {
        let Some(stats) = self.models.get(model) else {
            return;
        };
        if prompt_tokens > 0 {
            let sample = (prompt_tokens as f64 / self.raw_prompt(prompt_bytes))
                .clamp(RATIO_RANGE.0, RATIO_RANGE.1);
            let old = load(&stats.prompt_ratio);
            store(&stats.prompt_ratio, old + ALPHA * (sample - old));
        }
        if let Some(c) = completion_tokens {
            let old = load(&stats.avg_completion);
            let new = if old == 0.0 {
                c as f64
            } else {
                old + ALPHA * (c as f64 - old)
            };
            store(&stats.avg_completion, new.max(1.0));
        }
    }

    /// The learned prompt calibration ratio of a model (1.0 until it has seen usage).
    pub fn prompt_ratio(&self, model: usize) -> f64 {
        self.models
            .get(model)
            .map_or(1.0, |s| load(&s.prompt_ratio))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(bytes: usize, max: Option<u64>) -> RequestSize {
        RequestSize {
            prompt_bytes: bytes,
            max_completion_tokens: max,
            generates: true,
        }
    }

    #[test]
    fn before_learning_uses_bytes_per_token_and_max_tokens() {
        let e = Estimator::new(1, 4.0, 256);
        assert_eq!(
            e.estimate(0, &size(400, Some(50))),
            TokenCost {
                prompt: 100,
                completion: 50
            }
        );
        assert_eq!(e.estimate(0, &size(400, None)).completion, 256);
        assert_eq!(e.estimate(0, &size(0, None)).prompt, 1);
        let emb = RequestSize {
            generates: false,
            ..size(40, Some(9))
        };
        assert_eq!(
            e.estimate(0, &emb),
            TokenCost {
                prompt: 10,
                completion: 0
            }
        );
    }

    #[test]
    fn prompt_calibration_converges_to_the_reported_ratio() {
        let e = Estimator::new(1, 4.0, 256);
        // The engine's tokenizer packs 3.2 bytes per token: 400 bytes are 125 tokens.
        for _ in 0..80 {
            e.observe(0, 400, 125, Some(10));
        }
        let est = e.estimate(0, &size(4000, Some(10))).prompt;
        assert!((1230..=1260).contains(&est), "{est}");
    }

    #[test]
    fn completion_is_capped_by_the_learned_average() {
        let e = Estimator::new(1, 4.0, 256);
        e.observe(0, 40, 10, Some(20));
        assert_eq!(e.estimate(0, &size(40, Some(1000))).completion, 20);
        assert_eq!(e.estimate(0, &size(40, Some(5))).completion, 5);
        assert_eq!(e.estimate(0, &size(40, None)).completion, 20);
    }

    #[test]
    fn one_absurd_sample_is_bounded() {
        let e = Estimator::new(1, 4.0, 256);
        e.observe(0, 4, 1_000_000, None);
        assert!(e.prompt_ratio(0) <= 1.0 + ALPHA * RATIO_RANGE.1);
        // Unknown model indices are ignored, not a panic.
        e.observe(9, 4, 1, Some(1));
        assert_eq!(e.estimate(9, &size(8, Some(3))).prompt, 2);
    }
}
