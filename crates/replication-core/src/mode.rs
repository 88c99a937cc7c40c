//! The replication mode of a host.

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// Which side of a replication pair a host is: QEMU's `ReplicationMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicationMode {
    /// The host whose guest output is released; its writes are forwarded to
    /// the secondary (QEMU word: `primary`).
    Primary,
    /// The host that receives checkpoints and takes over on failover
    /// (QEMU word: `secondary`).
    Secondary,
}

impl ReplicationMode {
    /// The words accepted by [`FromStr`], in QEMU's order.
    pub const ALLOWED: [&'static str; 2] = ["primary", "secondary"];

    /// The QEMU word for this mode.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicationMode::Primary => "primary",
            ReplicationMode::Secondary => "secondary",
        }
    }
}

impl fmt::Display for ReplicationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ReplicationMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "primary" => Ok(ReplicationMode::Primary),
            "secondary" => Ok(ReplicationMode::Secondary),
            other => Err(Error::InvalidMode {
                given: other.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn parses_and_displays_qemu_words() {
        for mode in [ReplicationMode::Primary, ReplicationMode::Secondary] {
            let word = mode.to_string();
            assert_eq!(word.parse::<ReplicationMode>().unwrap(), mode);
        }
        assert_eq!(ReplicationMode::Primary.to_string(), "primary");
        assert_eq!(ReplicationMode::Secondary.to_string(), "secondary");
    }

    #[test]
    fn wrong_word_names_allowed_values() {
        for bad in ["", "Primary", "secondary ", "tertiary"] {
            let err = bad.parse::<ReplicationMode>().unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidMode);
            let msg = err.to_string();
            assert!(msg.contains("'primary'"), "{msg}");
            assert!(msg.contains("'secondary'"), "{msg}");
            assert!(msg.contains(&format!("'{bad}'")), "{msg}");
        }
    }
}
