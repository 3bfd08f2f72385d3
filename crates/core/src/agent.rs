//! What an AI agent's attempt used: the model, the tool it was calling, and what the
//! attempt cost in tokens and money. A handler attaches it to a failure
//! ([`crate::HandlerError::with_cost`]); redrive keeps it per attempt in the message's
//! history and sums it per message and per error group, so triage can say how much a
//! group of failures has cost.

use serde::{Deserialize, Serialize};

/// Tokens and money spent. Money is kept in millionths of a US dollar, so sums over
/// many attempts are exact.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Cost {
    /// Input (prompt) tokens.
    pub input_tokens: u64,
    /// Output (completion) tokens.
    pub output_tokens: u64,
    /// Millionths of a US dollar.
    pub usd_micros: u64,
}

impl Cost {
    /// Nothing spent.
    pub const ZERO: Self = Self {
        input_tokens: 0,
        output_tokens: 0,
        usd_micros: 0,
    };

    /// A cost from tokens and an amount in US dollars (rounded to a millionth; a
    /// negative or non-finite amount counts as zero).
    #[must_use]
    pub fn new(input_tokens: u64, output_tokens: u64, usd: f64) -> Self {
        Self {
            input_tokens,
            output_tokens,
            usd_micros: usd_to_micros(usd),
        }
    }

    /// The amount in US dollars.
    #[must_use]
    #[allow(clippy::cast_precision_loss)] // exact below 2^53 millionths: $9 billion
    pub fn usd(&self) -> f64 {
        self.usd_micros as f64 / 1e6
    }

    /// Whether nothing was spent.
    #[must_use]
    pub fn is_zero(&self) -> bool {
        *self == Self::ZERO
    }

    /// Adds `other` (saturating).
    pub fn add(&mut self, other: Self) {
        self.input_tokens = self.input_tokens.saturating_add(other.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
        self.usd_micros = self.usd_micros.saturating_add(other.usd_micros);
    }
}

/// `$0.0125 · 1000 in / 250 out tokens`: dollars (four places below $100, cents
/// above) and tokens, each only when there are some; `—` for nothing.
impl std::fmt::Display for Cost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_zero() {
            return f.write_str("—");
        }
        let tokens = self.input_tokens.saturating_add(self.output_tokens);
        if self.usd_micros > 0 {
            let usd = self.usd();
            if usd < 100.0 {
                write!(f, "${usd:.4}")?
            } else {
                write!(f, "${usd:.2}")?
            }
            if tokens > 0 {
                f.write_str(" · ")?;
            }
        }
        if tokens > 0 {
            write!(
                f,
                "{} in / {} out tokens",
                self.input_tokens, self.output_tokens
            )?;
        }
        Ok(())
    }
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // clamped first
fn usd_to_micros(usd: f64) -> u64 {
    if usd.is_finite() && usd > 0.0 {
        (usd * 1e6).round().min(u64::MAX as f64) as u64
    } else {
        0
    }
}

/// A cost as JSON: `{"input_tokens": 1200, "output_tokens": 300, "usd": 0.0042}`, every
/// field optional. This is how handlers report it and how redrive shows it.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct CostJson {
    /// Input (prompt) tokens.
    #[serde(default)]
    pub input_tokens: u64,
    /// Output (completion) tokens.
    #[serde(default)]
    pub output_tokens: u64,
    /// US dollars.
    #[serde(default)]
    pub usd: f64,
}

impl From<CostJson> for Cost {
    fn from(c: CostJson) -> Self {
        Self::new(c.input_tokens, c.output_tokens, c.usd)
    }
}

impl From<Cost> for CostJson {
    fn from(c: Cost) -> Self {
        Self {
            input_tokens: c.input_tokens,
            output_tokens: c.output_tokens,
            usd: c.usd(),
        }
    }
}

/// Longest model or tool name kept, in bytes.
pub const MAX_AGENT_NAME_BYTES: usize = 200;

/// What one attempt used: model, tool and cost. Empty when the handler did not say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentContext {
    /// The model the attempt called, e.g. `gpt-4o-mini`.
    pub model: Option<String>,
    /// The tool the attempt was running when it failed, e.g. `web_search`.
    pub tool: Option<String>,
    /// What the attempt cost.
    pub cost: Cost,
}

impl AgentContext {
    /// Whether the handler said nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.model.is_none() && self.tool.is_none() && self.cost.is_zero()
    }
}

/// A model or tool name as kept: trimmed, empty as none, cut to
/// [`MAX_AGENT_NAME_BYTES`].
pub(crate) fn agent_name(name: impl Into<String>) -> Option<String> {
    let name = name.into();
    let name = name.trim();
    (!name.is_empty()).then(|| crate::truncate_utf8(name, MAX_AGENT_NAME_BYTES).to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollars_round_trip_through_millionths() {
        for usd in [0.0, 0.000_001, 0.0042, 1.5, 12_345.678_9] {
            let c = Cost::new(1, 2, usd);
            assert!((c.usd() - usd).abs() < 5e-7, "{usd}");
            assert_eq!(Cost::from(CostJson::from(c)), c);
        }
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(Cost::new(0, 0, bad).usd_micros, 0);
        }
    }

    #[test]
    fn sums_are_exact_and_saturate() {
        let mut total = Cost::default();
        for _ in 0..10 {
            total.add(Cost::new(100, 10, 0.1));
        }
        assert_eq!(
            total,
            Cost {
                input_tokens: 1000,
                output_tokens: 100,
                usd_micros: 1_000_000
            }
        );
        total.add(Cost {
            input_tokens: u64::MAX,
            ..Cost::default()
        });
        assert_eq!(total.input_tokens, u64::MAX);
    }

    #[test]
    fn costs_read_as_dollars_and_tokens() {
        assert_eq!(
            Cost::new(1000, 250, 0.0125).to_string(),
            "$0.0125 · 1000 in / 250 out tokens"
        );
        assert_eq!(Cost::new(0, 0, 1234.5).to_string(), "$1234.50");
        assert_eq!(Cost::new(5, 0, 0.0).to_string(), "5 in / 0 out tokens");
        assert_eq!(Cost::default().to_string(), "—");
    }

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(agent_name("  "), None);
        assert_eq!(agent_name(" gpt "), Some("gpt".to_owned()));
        assert_eq!(agent_name("é".repeat(300)).map(|n| n.len()), Some(200));
    }
}
