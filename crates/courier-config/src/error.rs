//! Load-time errors that name the file, the step and the field.

use std::fmt;
use std::path::PathBuf;

/// One problem in the config folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file at fault.
    pub file: PathBuf,
    /// The line, where the YAML parser gives one.
    pub line: Option<usize>,
    /// The workflow step at fault, if any.
    pub step: Option<String>,
    /// The field at fault (a dotted path), if any.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    /// An error about a whole file.
    pub fn file(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            line: None,
            step: None,
            field: None,
            message: message.into(),
        }
    }

    /// Name the field at fault.
    #[must_use]
    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// Name the step at fault.
    #[must_use]
    pub fn step(mut self, step: impl Into<String>) -> Self {
        self.step = Some(step.into());
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        f.write_str(": ")?;
        if let Some(step) = &self.step {
            write!(f, "step \"{step}\": ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "field \"{field}\": ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in one pass over the config folder: the first
/// [`MAX_REPORTED`] of them, and how many more there were.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>, pub usize);

/// Errors reported (and located) at most; the rest are counted.
pub const MAX_REPORTED: usize = 100;

impl ConfigErrors {
    /// The first [`MAX_REPORTED`] errors, each given the line of the step and
    /// field it names where the YAML parser did not give one.
    pub fn located(mut errors: Vec<ConfigError>) -> Self {
        let more = errors.len().saturating_sub(MAX_REPORTED);
        errors.truncate(MAX_REPORTED);
        crate::yaml::add_lines(&mut errors);
        Self(errors, more)
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len() + self.1;
        writeln!(f, "{n} error{} in the configuration:", if n == 1 { "" } else { "s" })?;
        for e in &self.0 {
            writeln!(f, "  {e}")?;
        }
        if self.1 > 0 {
            writeln!(f, "  ... and {} more (the first {MAX_REPORTED} are shown)", self.1)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}
