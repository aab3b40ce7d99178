//! Upstream responses on the wire, sans-IO: walking their records (bounds-checked,
//! compression pointers skipped, never followed), checking that one answers the
//! question we sent, choosing how long it may be cached, and re-issuing it to a
//! client with the client's id and question.

use std::ops::Range;

use crate::wire::{u16_at, Question, TYPE_OPT};

const HEADER: usize = 12;
const TYPE_SOA: u16 = 6;
const QR: u8 = 0x80;
const TC: u8 = 0x02;

pub const RCODE_NXDOMAIN: u8 = 3;

/// One resource record's place in a message.
#[derive(Debug, Clone)]
pub struct Rr {
    pub rtype: u16,
    pub ttl: u32,
    /// Where its TTL sits, to age it in place.
    pub ttl_at: usize,
    pub rdata: Range<usize>,
    /// The whole record.
    pub span: Range<usize>,
    pub additional: bool,
}

/// A response's records after a full walk; `None` from [`walk`] means malformed.
#[derive(Debug)]
pub struct Walked {
    pub answers: Vec<Rr>,
    pub authorities: Vec<Rr>,
    pub additionals: Vec<Rr>,
}

fn u32_at(p: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(p.get(at..at + 4)?.try_into().ok()?))
}

/// The position after the name at `at`. A pointer ends a name, so there is nothing
/// to follow and no loop to fear.
fn skip_name(p: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *p.get(at)? as usize;
        match len & 0xc0 {
            0x00 if len == 0 => return Some(at + 1),
            0x00 => {
                at += 1 + len;
                if at > p.len() {
                    return None;
                }
            }
            0xc0 => {
                p.get(at + 1)?;
                return Some(at + 2);
            }
            _ => return None,
        }
    }
}

/// Walks header, one question and every record; refuses anything inconsistent.
pub fn walk(p: &[u8]) -> Option<Walked> {
    if p.len() < HEADER || u16_at(p, 4)? != 1 {
        return None;
    }
    let counts = [u16_at(p, 6)?, u16_at(p, 8)?, u16_at(p, 10)?];
    let mut at = skip_name(p, HEADER)? + 4;
    if at > p.len() {
        return None;
    }
    let mut sections: [Vec<Rr>; 3] = Default::default();
    for (section, count) in counts.iter().enumerate() {
        for _ in 0..*count {
            let start = at;
            at = skip_name(p, at)?;
            let rtype = u16_at(p, at)?;
            let ttl = u32_at(p, at + 4)?;
            let rdlen = u16_at(p, at + 8)? as usize;
            let rdata = at + 10..at + 10 + rdlen;
            if rdata.end > p.len() {
                return None;
            }
            sections[section].push(Rr {
                rtype,
                ttl,
                ttl_at: at + 4,
                span: start..rdata.end,
                rdata: rdata.clone(),
                additional: section == 2,
            });
            at = rdata.end;
        }
    }
    let [answers, authorities, additionals] = sections;
    Some(Walked {
        answers,
        authorities,
        additionals,
    })
}

/// True when `p` is a standard-query response to exactly `question` (name with its
/// letter case as we sent it, type, class).
pub fn answers(p: &[u8], question: &[u8]) -> bool {
    p.len() >= HEADER + question.len()
        && p[2] & QR != 0
        && (p[2] >> 3) & 0x0f == 0
        && u16_at(p, 4) == Some(1)
        && &p[HEADER..HEADER + question.len()] == question
}

pub fn rcode(p: &[u8]) -> u8 {
    p[3] & 0x0f
}

pub fn truncated(p: &[u8]) -> bool {
    p[2] & TC != 0
}

/// How long a response may be cached (`None`: not at all). Positive answers live as
/// long as their shortest record, at most `max_ttl`; negative ones (NXDOMAIN, or
/// NOERROR without answers) as long as their SOA says (RFC 2308: the lesser of its
/// TTL and its minimum field), at most `max_negative_ttl`, and not at all without a
/// SOA. Truncated answers and failures are not cached.
pub fn cache_ttl(p: &[u8], w: &Walked, max_ttl: u32, max_negative_ttl: u32) -> Option<u32> {
    if truncated(p) {
        return None;
    }
    let rcode = rcode(p);
    let ttl = if rcode == 0 && !w.answers.is_empty() {
        w.answers.iter().map(|r| r.ttl).min()?.min(max_ttl)
    } else if rcode == 0 || rcode == RCODE_NXDOMAIN {
        let soa = w.authorities.iter().find(|r| r.rtype == TYPE_SOA)?;
        // The minimum field is the last four bytes of the SOA's data.
        let minimum = u32_at(p, soa.rdata.end.checked_sub(4)?)?;
        soa.ttl.min(minimum).min(max_negative_ttl)
    } else {
        return None;
    };
    (ttl > 0).then_some(ttl)
}

/// Copies `question` into `p` in place of its question (same length: the same name
/// in another letter case).
pub fn set_question(p: &mut [u8], question: &[u8]) -> Option<()> {
    p.get_mut(HEADER..HEADER + question.len())?
        .copy_from_slice(question);
    Some(())
}

/// The response for client `q`: `stored` with the client's id and question (its
/// letter case), every TTL capped at `ttl` and aged by `age` seconds, and the OPT
/// record left out when the client sent none (RFC 6891 §7).
pub fn reissue(stored: &[u8], q: &Question<'_>, age: u32, ttl: u32) -> Option<Vec<u8>> {
    let w = walk(stored)?;
    let mut out = stored.to_vec();
    out[..2].copy_from_slice(&q.id.to_be_bytes());
    set_question(&mut out, q.raw)?;
    for r in w.answers.iter().chain(&w.authorities).chain(&w.additionals) {
        if r.rtype != TYPE_OPT {
            let aged = r.ttl.min(ttl).saturating_sub(age);
            out[r.ttl_at..r.ttl_at + 4].copy_from_slice(&aged.to_be_bytes());
        }
    }
    if q.edns_size.is_none() {
        // Only a trailing OPT is cut: nothing can point into the bytes after it.
        if let Some(opt) = w
            .additionals
            .last()
            .filter(|r| r.rtype == TYPE_OPT && r.additional && r.span.end == out.len())
        {
            out.truncate(opt.span.start);
            let count = w.additionals.len() as u16 - 1;
            out[10..12].copy_from_slice(&count.to_be_bytes());
        }
    }
    Some(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::wire;

    /// A response to `question` (wire name + type + class) with id `id`: one A record
    /// per address (owner compressed to the question), an optional SOA in authority,
    /// an optional trailing OPT.
    pub(crate) fn response(
        id: u16,
        question: &[u8],
        rcode: u8,
        addresses: &[([u8; 4], u32)],
        soa: Option<(u32, u32)>,
        opt: bool,
    ) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&(0x8180u16 | rcode as u16).to_be_bytes());
        p.extend_from_slice(&1u16.to_be_bytes());
        p.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
        p.extend_from_slice(&u16::from(soa.is_some()).to_be_bytes());
        p.extend_from_slice(&u16::from(opt).to_be_bytes());
        p.extend_from_slice(question);
        for (ip, ttl) in addresses {
            p.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
            p.extend_from_slice(&ttl.to_be_bytes());
            p.extend_from_slice(&[0, 4]);
            p.extend_from_slice(ip);
        }
        if let Some((ttl, minimum)) = soa {
            p.extend_from_slice(&[0, 0, 6, 0, 1]);
            p.extend_from_slice(&ttl.to_be_bytes());
            p.extend_from_slice(&22u16.to_be_bytes());
            p.extend_from_slice(&[0, 0]); // mname, rname: root
            for v in [1u32, 2, 3, 4, minimum] {
                p.extend_from_slice(&v.to_be_bytes());
            }
        }
        if opt {
            p.extend_from_slice(&[0, 0, 41, 4, 0xd0, 0, 0, 0, 0, 0, 0]);
        }
        p
    }

    pub(crate) fn query(name: &[u8], edns: bool) -> Vec<u8> {
        let mut p = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns)];
        p.extend_from_slice(name);
        p.extend_from_slice(&[0, 1, 0, 1]);
        if edns {
            p.extend_from_slice(&[0, 0, 41, 4, 0xd0, 0, 0, 0, 0, 0, 0]);
        }
        p
    }

    #[test]
    fn walks_and_ages_and_reissues() {
        let question = b"\x03www\x07example\x03com\x00\x00\x01\x00\x01";
        let stored = response(7, question, 0, &[([192, 0, 2, 1], 100)], None, true);
        let w = walk(&stored).unwrap();
        assert_eq!(w.answers.len(), 1);
        assert_eq!(cache_ttl(&stored, &w, 300, 60), Some(100));
        assert_eq!(cache_ttl(&stored, &w, 30, 60), Some(30));

        let packet = query(b"\x03WwW\x07example\x03COM\x00", false);
        let q = wire::parse(&packet).unwrap();
        let out = reissue(&stored, &q, 10, 50).unwrap();
        assert_eq!(out[..2], [0x12, 0x34]);
        assert_eq!(&out[12..12 + q.raw.len()], q.raw, "the client's casing");
        let w = walk(&out).unwrap();
        assert_eq!(w.answers[0].ttl, 40, "capped at 50, aged by 10");
        assert!(w.additionals.is_empty(), "no OPT for a client without EDNS");
        assert_eq!(out[11], 0);
    }

    #[test]
    fn negative_answers_cache_by_soa_only() {
        let question = b"\x01x\x04test\x00\x00\x01\x00\x01";
        let nx = response(1, question, RCODE_NXDOMAIN, &[], Some((900, 120)), false);
        assert_eq!(cache_ttl(&nx, &walk(&nx).unwrap(), 300, 60), Some(60));
        assert_eq!(cache_ttl(&nx, &walk(&nx).unwrap(), 300, 3600), Some(120));
        let bare = response(1, question, RCODE_NXDOMAIN, &[], None, false);
        assert_eq!(cache_ttl(&bare, &walk(&bare).unwrap(), 300, 60), None);
        let fail = response(1, question, 2, &[], Some((900, 120)), false);
        assert_eq!(cache_ttl(&fail, &walk(&fail).unwrap(), 300, 60), None);
    }

    #[test]
    fn refuses_malformed_and_foreign_answers() {
        let question = b"\x01x\x04test\x00\x00\x01\x00\x01";
        let good = response(1, question, 0, &[([192, 0, 2, 1], 5)], None, false);
        for cut in 0..good.len() {
            assert!(walk(&good[..cut]).is_none(), "cut at {cut}");
        }
        assert!(answers(&good, question));
        assert!(!answers(&good, b"\x01X\x04test\x00\x00\x01\x00\x01"));
        assert!(!answers(&good, b"\x01x\x04test\x00\x00\x1c\x00\x01"));
        let mut query_bit = good.clone();
        query_bit[2] &= !QR;
        assert!(!answers(&query_bit, question));
    }
}
