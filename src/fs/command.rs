//! The `ctl` vocabulary, parsed once: a write to a point's `ctl` file
//! becomes a [`Command`] (or the error its writer gets), and the rest of
//! `fs` matches on that instead of on words.

use crate::tree::TreeError;
use std::str::FromStr;

/// One `ctl` command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `snapshot NAME`: the point becomes a snapshot named NAME.
    Snapshot(String),
    /// `clone NAME`: a new leaf NAME beside the point.
    Clone(String),
    /// `delete`
    Delete,
    /// `merge`: merge the point into its parent.
    Merge,
    /// `checkpoint SOURCE`: import a memory source as a checkpoint.
    Checkpoint(String),
    /// `memory SOURCE` (`Some`), or `memory none` (`None`).
    Memory(Option<String>),
}

impl Command {
    /// The command's first word.
    pub fn verb(&self) -> &'static str {
        match self {
            Command::Snapshot(_) => "snapshot",
            Command::Clone(_) => "clone",
            Command::Delete => "delete",
            Command::Merge => "merge",
            Command::Checkpoint(_) => "checkpoint",
            Command::Memory(_) => "memory",
        }
    }

    /// Whether the command can put another memory view behind the
    /// point's memory files.
    pub fn changes_memory(&self) -> bool {
        matches!(self, Command::Memory(_) | Command::Checkpoint(_))
    }
}

fn invalid(why: impl Into<String>) -> TreeError {
    TreeError::new(libc::EINVAL, why)
}

impl FromStr for Command {
    type Err = TreeError;

    /// Parses `text` (surrounding whitespace ignored); a wrong command
    /// is EINVAL with the reason.
    fn from_str(text: &str) -> Result<Command, TreeError> {
        let text = text.trim();
        let mut words = text.split_whitespace();
        let cmd = words.next().unwrap_or("");
        let arg = words.next();
        if words.next().is_some() {
            return Err(invalid(format!(
                "too many words in {text:?}; one command per write"
            )));
        }
        Ok(match (cmd, arg) {
            ("snapshot", Some(name)) => Command::Snapshot(name.into()),
            ("clone", Some(name)) => Command::Clone(name.into()),
            ("delete", None) => Command::Delete,
            ("merge", None) => Command::Merge,
            ("checkpoint", Some(source)) => Command::Checkpoint(source.into()),
            ("memory", Some("none")) => Command::Memory(None),
            ("memory", Some(source)) => Command::Memory(Some(source.into())),
            ("snapshot" | "clone", None) => {
                return Err(invalid(format!("`{cmd}` needs a NAME: `{cmd} NAME`")))
            }
            ("checkpoint", None) => {
                return Err(invalid(
                    "`checkpoint` needs a SOURCE file: `checkpoint SOURCE`",
                ))
            }
            ("memory", None) => {
                return Err(invalid(
                    "`memory` needs a SOURCE file (or `none`): `memory SOURCE`",
                ))
            }
            _ => return Err(invalid(format!(
                "unknown command {text:?}; commands: `snapshot NAME`, `clone NAME`, `delete`, `merge`, `memory SOURCE|none`, `checkpoint SOURCE`"
            ))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Command;

    #[test]
    fn commands_parse_with_their_arguments() {
        let ok = [
            ("snapshot monday", Command::Snapshot("monday".into())),
            ("  clone b\n", Command::Clone("b".into())),
            ("delete", Command::Delete),
            ("merge\n", Command::Merge),
            ("checkpoint m.elf", Command::Checkpoint("m.elf".into())),
            ("memory none", Command::Memory(None)),
            ("memory m.elf", Command::Memory(Some("m.elf".into()))),
        ];
        for (text, want) in ok {
            assert_eq!(text.parse::<Command>().unwrap(), want, "{text:?}");
        }
    }

    #[test]
    fn wrong_commands_say_why() {
        let bad = [
            ("snapshot a b", "too many words in \"snapshot a b\""),
            ("delete x", "unknown command \"delete x\""),
            ("merge now", "unknown command"),
            ("snapshot", "`snapshot` needs a NAME"),
            ("clone", "`clone` needs a NAME"),
            ("checkpoint", "`checkpoint` needs a SOURCE"),
            ("memory", "`memory` needs a SOURCE"),
            ("", "unknown command \"\""),
            ("frobnicate", "unknown command"),
        ];
        for (text, want) in bad {
            let e = text.parse::<Command>().unwrap_err();
            assert_eq!(e.errno, libc::EINVAL, "{text:?}");
            assert!(e.message.starts_with(want), "{text:?}: {}", e.message);
        }
    }
}
