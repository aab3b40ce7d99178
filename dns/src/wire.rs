//! DNS wire format, only as much as the local fast path needs: the header, one
//! uncompressed question, an optional EDNS OPT record; and the writer of answers.
//! Anything unusual is refused here and handled by the caller (FORMERR, NOTIMP, or
//! forwarding), never guessed at.

pub const TYPE_A: u16 = 1;
pub const TYPE_PTR: u16 = 12;
pub const TYPE_SRV: u16 = 33;
pub const TYPE_OPT: u16 = 41;
pub const TYPE_ANY: u16 = 255;
pub const CLASS_IN: u16 = 1;
pub const CLASS_ANY: u16 = 255;

pub const RCODE_NOERROR: u8 = 0;
pub const RCODE_FORMERR: u8 = 1;
pub const RCODE_SERVFAIL: u8 = 2;
pub const RCODE_NOTIMP: u8 = 4;

/// Largest UDP answer without EDNS (RFC 1035).
pub const CLASSIC_UDP_LIMIT: usize = 512;
/// The UDP payload size we advertise and honour at most (the DNS flag day value).
pub const OUR_EDNS_SIZE: u16 = 1232;

const MAX_NAME: usize = 255;
const MAX_LABEL: usize = 63;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Shorter than a header, or a response: not worth an answer.
    #[error("not a DNS query")]
    Drop,
    #[error("malformed query: {0}")]
    FormErr(&'static str),
    #[error("not implemented: {0}")]
    NotImp(&'static str),
}

/// A parsed query: what the fast path needs to answer it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question<'a> {
    pub id: u16,
    /// The flags word of the query (for RD and opcode).
    pub flags: u16,
    /// Wire bytes of the question as sent (name, type, class), echoed in the answer.
    pub raw: &'a [u8],
    /// The name in lower case, labels joined by '.', without the trailing dot.
    pub name: QuestionName,
    pub qtype: u16,
    pub qclass: u16,
    /// UDP payload size the client accepts, when it sent EDNS.
    pub edns_size: Option<u16>,
}

/// A lower-cased name, labels joined by '.', no trailing dot. Labels are raw bytes
/// (so `echo_api` and `project_service_1` are ordinary names here).
pub type NameKey = Vec<u8>;

/// A question's name in key form, held in place: reading a query allocates nothing.
#[derive(Clone, Copy)]
pub struct QuestionName {
    len: u8,
    bytes: [u8; MAX_NAME],
}

impl QuestionName {
    fn new() -> Self {
        Self {
            len: 0,
            bytes: [0; MAX_NAME],
        }
    }

    /// Appends a label (lower-cased, after a '.' unless first); false when the
    /// name would be longer than DNS allows.
    fn push_label(&mut self, label: &[u8]) -> bool {
        let at = self.len as usize;
        let dot = usize::from(at > 0);
        // The wire form is two bytes longer than the dotted one (first length, root).
        if at + dot + label.len() > MAX_NAME - 2 {
            return false;
        }
        if dot == 1 {
            self.bytes[at] = b'.';
        }
        for (slot, b) in self.bytes[at + dot..].iter_mut().zip(label) {
            *slot = b.to_ascii_lowercase();
        }
        self.len = (at + dot + label.len()) as u8;
        true
    }
}

impl std::ops::Deref for QuestionName {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

impl PartialEq for QuestionName {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for QuestionName {}

impl std::fmt::Debug for QuestionName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self))
    }
}

/// Lower-cases a user-given name into the key form; refuses what DNS cannot carry.
pub fn name_key(name: &str) -> Option<NameKey> {
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    if trimmed.is_empty() || trimmed.len() > MAX_NAME - 2 {
        return None;
    }
    if trimmed
        .split('.')
        .any(|l| l.is_empty() || l.len() > MAX_LABEL)
    {
        return None;
    }
    Some(trimmed.bytes().map(|b| b.to_ascii_lowercase()).collect())
}

/// Encodes a key (`a.b.c`) as wire labels ending in the root label.
pub fn encode_name(key: &[u8], out: &mut Vec<u8>) {
    for label in key.split(|b| *b == b'.') {
        out.push(label.len() as u8);
        out.extend_from_slice(label);
    }
    out.push(0);
}

pub(crate) fn u16_at(p: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*p.get(at)?, *p.get(at + 1)?]))
}

/// A stub resolver's query: id `id`, recursion desired, one question for `name`
/// (dots between labels, a trailing one optional) of type `qtype`, class IN. For
/// probes, benchmarks and tests.
pub fn stub_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(12 + name.len() + 6);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&[0, 1]);
    q
}

/// Parses a query. Errors say how to reply: drop, FORMERR or NOTIMP.
pub fn parse(packet: &[u8]) -> Result<Question<'_>, WireError> {
    if packet.len() < 12 {
        return Err(WireError::Drop);
    }
    let id = u16_at(packet, 0).expect("length checked");
    let flags = u16_at(packet, 2).expect("length checked");
    if flags & 0x8000 != 0 {
        return Err(WireError::Drop);
    }
    let opcode = (flags >> 11) & 0xf;
    if opcode != 0 {
        return Err(WireError::NotImp("only standard queries"));
    }
    let qdcount = u16_at(packet, 4).expect("length checked");
    let ancount = u16_at(packet, 6).expect("length checked");
    let nscount = u16_at(packet, 8).expect("length checked");
    let arcount = u16_at(packet, 10).expect("length checked");
    if qdcount != 1 {
        return Err(WireError::FormErr("exactly one question is answered"));
    }
    if ancount != 0 || nscount != 0 || arcount > 1 {
        return Err(WireError::FormErr("unexpected records in a query"));
    }
    let mut at = 12;
    let mut name = QuestionName::new();
    loop {
        let len = *packet.get(at).ok_or(WireError::FormErr("truncated name"))? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        if len & 0xc0 != 0 {
            // A compression pointer (or a reserved label type) in a question is legal in
            // theory and never sent in practice; refusing it rules out pointer loops.
            return Err(WireError::FormErr(
                "compressed or extended label in question",
            ));
        }
        let label = packet
            .get(at..at + len)
            .ok_or(WireError::FormErr("truncated label"))?;
        if !name.push_label(label) {
            return Err(WireError::FormErr("name longer than 255 bytes"));
        }
        at += len;
    }
    let qtype = u16_at(packet, at).ok_or(WireError::FormErr("truncated question"))?;
    let qclass = u16_at(packet, at + 2).ok_or(WireError::FormErr("truncated question"))?;
    let raw = &packet[12..at + 4];
    at += 4;
    let mut edns_size = None;
    if arcount == 1 {
        // Only an OPT record is expected here: root name, type 41, class = size.
        if packet.get(at) != Some(&0) || u16_at(packet, at + 1) != Some(TYPE_OPT) {
            return Err(WireError::FormErr("additional record is not EDNS OPT"));
        }
        let size = u16_at(packet, at + 3).ok_or(WireError::FormErr("truncated OPT"))?;
        let version = *packet
            .get(at + 6)
            .ok_or(WireError::FormErr("truncated OPT"))?;
        let rdlen = u16_at(packet, at + 9).ok_or(WireError::FormErr("truncated OPT"))? as usize;
        if packet.len() < at + 11 + rdlen {
            return Err(WireError::FormErr("truncated OPT data"));
        }
        if version != 0 {
            return Err(WireError::NotImp("EDNS version other than 0"));
        }
        edns_size = Some(size.max(CLASSIC_UDP_LIMIT as u16));
    }
    Ok(Question {
        id,
        flags,
        raw,
        name,
        qtype,
        qclass,
        edns_size,
    })
}

/// One answer record's data.
#[derive(Clone, Copy)]
pub enum Rdata<'a> {
    A(std::net::Ipv4Addr),
    /// An already encoded domain name.
    Ptr(&'a [u8]),
    /// Priority 0, weight 10 (every replica alike), `port`, an encoded `target`.
    Srv {
        port: u16,
        target: &'a [u8],
    },
}

/// SRV priority and weight: one priority, equal weights (the order is rotated).
const SRV_PRIORITY: u16 = 0;
const SRV_WEIGHT: u16 = 10;

impl Rdata<'_> {
    fn len(&self) -> usize {
        match self {
            Rdata::A(_) => 4,
            Rdata::Ptr(n) => n.len(),
            Rdata::Srv { target, .. } => 6 + target.len(),
        }
    }
}

/// An additional A record: an SRV target's encoded name and address.
pub type Glue<'a> = (&'a [u8], std::net::Ipv4Addr);

/// Writes a response to `q`: header, echoed question, answers (owner name compressed
/// to the question), OPT when the query had one. When the answers do not fit `limit`,
/// none are written and TC is set, so the client retries over TCP.
pub fn write_response(
    q: &Question<'_>,
    rcode: u8,
    answers: &[Rdata<'_>],
    ttl: u32,
    limit: usize,
) -> Vec<u8> {
    write_response_with_glue(q, rcode, answers, &[], ttl, limit)
}

/// [`write_response`] with A records of SRV targets in the additional section: as
/// many as fit after the answers (leaving some out is not truncation, RFC 2181 §9).
pub fn write_response_with_glue(
    q: &Question<'_>,
    rcode: u8,
    answers: &[Rdata<'_>],
    glue: &[Glue<'_>],
    ttl: u32,
    limit: usize,
) -> Vec<u8> {
    write_records(q, rcode, answers.iter().copied(), glue, ttl, limit)
}

/// A NOERROR response with these A records: the local fast path, which allocates
/// the response's bytes and nothing else.
pub fn write_addresses(
    q: &Question<'_>,
    addresses: &[std::net::Ipv4Addr],
    ttl: u32,
    limit: usize,
) -> Vec<u8> {
    let records = addresses.iter().map(|a| Rdata::A(*a));
    write_records(q, RCODE_NOERROR, records, &[], ttl, limit)
}

fn write_records<'r>(
    q: &Question<'_>,
    rcode: u8,
    answers: impl Iterator<Item = Rdata<'r>> + Clone,
    glue: &[Glue<'_>],
    ttl: u32,
    limit: usize,
) -> Vec<u8> {
    let opt_len = if q.edns_size.is_some() { 11 } else { 0 };
    let answer_len: usize = answers.clone().map(|a| 12 + a.len()).sum();
    let full = 12 + q.raw.len() + answer_len + opt_len;
    let truncated = full > limit;
    let count = if truncated {
        0
    } else {
        answers.clone().count()
    };
    let mut room = limit.saturating_sub(full);
    let glue_count = if truncated {
        0
    } else {
        glue.iter()
            .take_while(|(name, _)| {
                let len = name.len() + 14;
                let fits = len <= room;
                room = room.saturating_sub(len);
                fits
            })
            .count()
    };
    let glue = &glue[..glue_count];
    let glue_len: usize = glue.iter().map(|(name, _)| name.len() + 14).sum();
    let mut out = Vec::with_capacity(if truncated {
        12 + q.raw.len() + opt_len
    } else {
        full + glue_len
    });
    out.extend_from_slice(&q.id.to_be_bytes());
    // QR, opcode 0, AA, TC as needed, RD copied, RA, rcode.
    let mut flags: u16 = 0x8000 | 0x0400 | (q.flags & 0x0100) | 0x0080 | rcode as u16;
    if truncated {
        flags |= 0x0200;
    }
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(count as u16).to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    let additional = glue.len() + usize::from(q.edns_size.is_some());
    out.extend_from_slice(&(additional as u16).to_be_bytes());
    out.extend_from_slice(q.raw);
    for a in answers.take(count) {
        out.extend_from_slice(&[0xc0, 12]);
        let ty = match a {
            Rdata::A(_) => TYPE_A,
            Rdata::Ptr(_) => TYPE_PTR,
            Rdata::Srv { .. } => TYPE_SRV,
        };
        out.extend_from_slice(&ty.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&(a.len() as u16).to_be_bytes());
        match a {
            Rdata::A(ip) => out.extend_from_slice(&ip.octets()),
            Rdata::Ptr(n) => out.extend_from_slice(n),
            Rdata::Srv { port, target } => {
                out.extend_from_slice(&SRV_PRIORITY.to_be_bytes());
                out.extend_from_slice(&SRV_WEIGHT.to_be_bytes());
                out.extend_from_slice(&port.to_be_bytes());
                // Never compressed (RFC 2782).
                out.extend_from_slice(target);
            }
        }
    }
    for (name, address) in glue {
        out.extend_from_slice(name);
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&address.octets());
    }
    if q.edns_size.is_some() {
        out.extend_from_slice(&[0, 0, 41]);
        out.extend_from_slice(&OUR_EDNS_SIZE.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    }
    out
}

/// Writes a bare error response (no question when even that could not be parsed).
pub fn write_error(packet: &[u8], rcode: u8) -> Vec<u8> {
    let mut out = vec![0u8; 12];
    out[..2].copy_from_slice(&packet[..2]);
    let rd = u16::from_be_bytes([packet[2], packet[3]]) & 0x0100;
    let opcode = u16::from_be_bytes([packet[2], packet[3]]) & 0x7800;
    out[2..4].copy_from_slice(&(0x8000 | opcode | rd | 0x0080 | rcode as u16).to_be_bytes());
    out
}
