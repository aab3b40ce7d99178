//! What may be a DNS name here (container names, services, aliases), shared by the
//! attach API and Docker labels so both refuse the same things in the same words.

/// Letters, digits, '_', '-', '.', 1 to 63 of them, as Docker allows. `_` is fine:
/// Compose services are often named `echo_api`.
pub fn check_dns_name(kind: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{kind} {name:?} is not a usable DNS name: use 1 to 63 letters, digits, '_', '-' or '.'"
        ))
    }
}

/// The naming rules as the documentation states them, restated apart from the
/// checkers above so that property tests compare the two.
#[cfg(test)]
pub(crate) mod documented {
    /// A network name: 1 to 64 letters, digits, '_', '-' or '.', starting with a
    /// letter or digit.
    pub fn network_ok(n: &str) -> bool {
        (1..=64).contains(&n.len())
            && n.as_bytes()[0].is_ascii_alphanumeric()
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    }

    /// A DNS name: 1 to 63 letters, digits, '_', '-' or '.'.
    pub fn dns_ok(n: &str) -> bool {
        (1..=63).contains(&n.len())
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    }
}
