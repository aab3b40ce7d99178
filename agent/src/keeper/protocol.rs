//! The keeper's messages: one line of text per message, descriptors alongside.
//!
//! - `PUT dns:INO` with two descriptors (UDP, TCP): keep these for namespace INO.
//! - `FORGET dns:INO`: let go of namespace INO's sockets.
//! - `TAKE`: send back everything kept: `HOLD dns:INO` with its two descriptors per
//!   namespace, then `END`. The keeper keeps them too.
//! - `QUIT`: let go of everything and exit (keeping is off, or the host is reset).

/// Descriptors one namespace's entry carries: UDP, then TCP.
pub const FDS_PER_ENTRY: usize = 2;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Put(u64),
    Forget(u64),
    Take,
    Hold(u64),
    End,
    Quit,
}

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Message::Put(ino) => format!("PUT dns:{ino}"),
            Message::Forget(ino) => format!("FORGET dns:{ino}"),
            Message::Take => "TAKE".into(),
            Message::Hold(ino) => format!("HOLD dns:{ino}"),
            Message::End => "END".into(),
            Message::Quit => "QUIT".into(),
        }
        .into_bytes()
    }

    /// None for anything that is not exactly one of the messages.
    pub fn decode(bytes: &[u8]) -> Option<Message> {
        let text = std::str::from_utf8(bytes).ok()?;
        let entry = |rest: &str| -> Option<u64> {
            let digits = rest.strip_prefix("dns:")?;
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            digits.parse().ok()
        };
        match text.split_once(' ') {
            None if text == "TAKE" => Some(Message::Take),
            None if text == "END" => Some(Message::End),
            None if text == "QUIT" => Some(Message::Quit),
            Some(("PUT", rest)) => entry(rest).map(Message::Put),
            Some(("FORGET", rest)) => entry(rest).map(Message::Forget),
            Some(("HOLD", rest)) => entry(rest).map(Message::Hold),
            _ => None,
        }
    }

    /// How many descriptors must come with this message.
    pub fn fds(&self) -> usize {
        match self {
            Message::Put(_) | Message::Hold(_) => FDS_PER_ENTRY,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_back_as_written_and_nothing_else_reads() {
        for m in [
            Message::Put(4026532301),
            Message::Forget(7),
            Message::Take,
            Message::Hold(1),
            Message::End,
            Message::Quit,
        ] {
            assert_eq!(Message::decode(&m.encode()), Some(m));
        }
        for bad in [
            &b"PUT dns:"[..],
            b"PUT dns:-1",
            b"PUT dns:1 ",
            b"PUT dns:99999999999999999999999",
            b"PUT net:1",
            b"take",
            b"TAKE ",
            b"\xff",
            b"",
        ] {
            assert_eq!(Message::decode(bad), None, "{bad:?}");
        }
    }
}
