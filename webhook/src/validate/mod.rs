//! Admission decisions, one module per kind of object, in the style of a
//! policy controller: each takes the parsed object(s) and the watched state as
//! plain data and returns a [`Decision`]. Nothing here does I/O, so every rule
//! is unit-tested directly.

pub mod lease;
pub mod node;
pub mod node_version;
pub mod policy;
pub mod standing;
pub mod workload;

#[cfg(test)]
pub(crate) mod fixtures;

/// The verdict on one admission request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Short, bounded label for metrics (`attested`, `unattested`, ...).
    pub reason: &'static str,
    /// Human-readable explanation; shown to the user on denial.
    pub message: String,
    /// Warnings returned to the client even when allowed.
    pub warnings: Vec<String>,
}

impl Decision {
    /// Admits with a reason label.
    pub fn allow(reason: &'static str) -> Self {
        Self {
            allowed: true,
            reason,
            message: String::new(),
            warnings: Vec::new(),
        }
    }

    /// Refuses with a reason label and a message.
    pub fn deny(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            allowed: false,
            reason,
            message: message.into(),
            warnings: Vec::new(),
        }
    }

    /// Adds warnings.
    pub fn with_warnings(mut self, warnings: Vec<String>) -> Self {
        self.warnings.extend(warnings);
        self
    }
}
