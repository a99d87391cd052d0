//! The fault switch: what a test, the demo or a person can make the engine do wrong.
//!
//! The body of `POST /fault` on the control listener deserialises into [`Fault`].

use serde::{Deserialize, Serialize};

/// How the engine misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FaultMode {
    /// Normal service.
    #[default]
    Ok,
    /// The serving port is closed: new connections are refused, open ones are cut.
    Down,
    /// Every inference request gets an error status (default 500) and `/health` fails.
    Error,
    /// Time to first token and the gap between tokens are multiplied by `factor`.
    Slow,
    /// Requests are read and never answered; `/health` still answers 200.
    Hang,
    /// Responses die part way: streams after `after_tokens` tokens (0: right after the
    /// response header), non-streamed answers before any byte.
    Midstream,
}

/// A fault and its parameters. Unknown fields are rejected so a typo is not silently "ok".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// What goes wrong.
    pub mode: FaultMode,
    /// `error`: the status returned (default 500).
    #[serde(default = "default_status", skip_serializing_if = "is_default_status")]
    pub status: u16,
    /// `slow`: the slow-down factor (default 10).
    #[serde(default = "default_factor")]
    pub factor: f64,
    /// `midstream`: tokens sent before the stream dies (default 3).
    #[serde(default = "default_after_tokens")]
    pub after_tokens: u64,
}

fn default_status() -> u16 {
    500
}
fn is_default_status(s: &u16) -> bool {
    *s == 500
}
fn default_factor() -> f64 {
    10.0
}
fn default_after_tokens() -> u64 {
    3
}

impl Default for Fault {
    fn default() -> Self {
        Self::new(FaultMode::Ok)
    }
}

impl Fault {
    /// A fault with default parameters.
    pub fn new(mode: FaultMode) -> Self {
        Self {
            mode,
            status: default_status(),
            factor: default_factor(),
            after_tokens: default_after_tokens(),
        }
    }

    /// Checks the parameters; the message says which one is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if !(100..=599).contains(&self.status) {
            return Err(format!("status {} is not an HTTP status", self.status));
        }
        if !(self.factor.is_finite() && self.factor >= 1.0 && self.factor <= 1000.0) {
            return Err(format!("factor {} must be within 1..=1000", self.factor));
        }
        Ok(())
    }

    /// The multiplier applied to every delay now.
    pub fn slow_factor(&self) -> f64 {
        if self.mode == FaultMode::Slow {
            self.factor
        } else {
            1.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_body() {
        let f: Fault = serde_json::from_str(r#"{"mode":"slow","factor":4}"#).unwrap();
        assert_eq!(f.mode, FaultMode::Slow);
        assert_eq!(f.slow_factor(), 4.0);
        let f: Fault = serde_json::from_str(r#"{"mode":"down"}"#).unwrap();
        assert_eq!(f.mode, FaultMode::Down);
        assert_eq!(f.slow_factor(), 1.0);
    }

    #[test]
    fn rejects_typos_and_nonsense() {
        assert!(serde_json::from_str::<Fault>(r#"{"mode":"dwn"}"#).is_err());
        assert!(serde_json::from_str::<Fault>(r#"{"mode":"ok","fator":2}"#).is_err());
        let f: Fault = serde_json::from_str(r#"{"mode":"slow","factor":0.5}"#).unwrap();
        assert!(f.validate().is_err());
    }
}
