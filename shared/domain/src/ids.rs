//! Identifier, symbol, currency and name checks (API.md "Conventions").
//!
//! Identifiers become NATS subject tokens, so anything outside `^[A-Za-z0-9_-]{1,64}$` (dots,
//! `*`, `>`, spaces, empty) is refused: a client must never address another aggregate's subject.
//! The checks are written by hand (no regex crate in the domain).

use crate::DomainError;

/// The pattern every id must match, as quoted in error messages.
pub const ID_PATTERN: &str = "^[A-Za-z0-9_-]{1,64}$";
/// The pattern every symbol must match, as quoted in error messages.
pub const SYMBOL_PATTERN: &str = "^[A-Z0-9]{1,16}-[A-Z0-9]{1,16}$";
/// The pattern every currency must match, as quoted in error messages.
pub const CURRENCY_PATTERN: &str = "^[A-Z0-9]{1,16}$";
/// Longest name (`name`, `strategy_name`), in characters.
pub const MAX_NAME_CHARS: usize = 200;

fn is_id(v: &str) -> bool {
    (1..=64).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn is_upper_token(v: &str) -> bool {
    (1..=16).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

/// `^[A-Za-z0-9_-]{1,64}$`, else `bad_request` naming `field`.
///
/// # Errors
/// [`DomainError::BadRequest`] when `v` does not match.
pub fn validate_id(field: &str, v: &str) -> Result<(), DomainError> {
    if is_id(v) {
        Ok(())
    } else {
        Err(DomainError::bad_request(format!(
            "{field}: must match {ID_PATTERN}"
        )))
    }
}

/// True when `v` is a well-formed `BASE-QUOTE` symbol.
pub fn is_symbol(v: &str) -> bool {
    match v.split_once('-') {
        Some((base, quote)) => is_upper_token(base) && is_upper_token(quote),
        None => false,
    }
}

/// `^[A-Z0-9]{1,16}-[A-Z0-9]{1,16}$`, else `bad_request` naming `field`.
///
/// # Errors
/// [`DomainError::BadRequest`] when `v` does not match.
pub fn validate_symbol(field: &str, v: &str) -> Result<(), DomainError> {
    if is_symbol(v) {
        Ok(())
    } else {
        Err(DomainError::bad_request(format!(
            "{field}: must match {SYMBOL_PATTERN}"
        )))
    }
}

/// The quote currency of a symbol (`USDT` for `BTC-USDT`); empty when there is no `-`.
pub fn symbol_quote(sym: &str) -> &str {
    sym.split_once('-').map_or("", |(_, q)| q)
}

/// The base currency of a symbol (`BTC` for `BTC-USDT`); the whole string when there is no `-`.
pub fn symbol_base(sym: &str) -> &str {
    sym.split_once('-').map_or(sym, |(b, _)| b)
}

/// 1 to 200 characters, none of them U+0000, else `bad_request` naming `field`. PostgreSQL's
/// `text` cannot hold U+0000, so a name with it, once stored in the stream, could never reach
/// a read model (its portfolio or strategy would be missing there for good). Other control
/// characters are stored and shown as sent (API.md allows them).
///
/// # Errors
/// [`DomainError::BadRequest`] when `v` is empty, too long or holds U+0000.
pub fn validate_name(field: &str, v: &str) -> Result<(), DomainError> {
    let n = v.chars().count();
    if !(1..=MAX_NAME_CHARS).contains(&n) {
        return Err(DomainError::bad_request(format!(
            "{field}: must be 1 to {MAX_NAME_CHARS} characters (got {n})"
        )));
    }
    match v.find('\0') {
        None => Ok(()),
        Some(at) => Err(DomainError::bad_request(format!(
            "{field}: must not hold U+0000 (at byte {at})"
        ))),
    }
}

/// `^[A-Z0-9]{1,16}$`, else `bad_request` naming `field`.
///
/// # Errors
/// [`DomainError::BadRequest`] when `v` does not match.
pub fn validate_currency(field: &str, v: &str) -> Result<(), DomainError> {
    if is_upper_token(v) {
        Ok(())
    } else {
        Err(DomainError::bad_request(format!(
            "{field}: must match {CURRENCY_PATTERN}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in ["p-1", "A_b-9", &"x".repeat(64)] {
            assert!(validate_id("portfolio_id", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a.b",
            "*",
            ">",
            "a b",
            "p-1.>",
            "é",
            &"x".repeat(65),
            "a\n",
        ] {
            let e = validate_id("portfolio_id", bad).unwrap_err();
            assert_eq!(e.code(), "bad_request");
            assert_eq!(
                e.to_string(),
                "portfolio_id: must match ^[A-Za-z0-9_-]{1,64}$"
            );
        }
    }

    #[test]
    fn symbols() {
        for ok in [
            "BTC-USDT",
            "1INCH-USDT",
            "A-B",
            &format!("{}-{}", "A".repeat(16), "B".repeat(16)),
        ] {
            assert!(validate_symbol("symbol", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "BTC",
            "btc-usdt",
            "BTC-",
            "-USDT",
            "BTC-USDT-X",
            "BTC_USDT",
            "BTC.USDT",
            "*",
            ">",
            "BTC USDT",
            &format!("{}-B", "A".repeat(17)),
        ] {
            assert!(validate_symbol("symbol", bad).is_err(), "{bad}");
        }
        assert_eq!(symbol_quote("BTC-USDT"), "USDT");
        assert_eq!(symbol_base("BTC-USDT"), "BTC");
        assert_eq!(symbol_quote("BTC"), "");
    }

    #[test]
    fn names_and_currencies() {
        assert!(validate_name("name", "x").is_ok());
        assert!(validate_name("name", &"é".repeat(200)).is_ok());
        assert!(validate_name("name", "").is_err());
        assert!(validate_name("name", &"x".repeat(201)).is_err());
        let nul = validate_name("name", "a\u{0}b").unwrap_err().to_string();
        assert!(
            nul.contains("name: must not hold U+0000 (at byte 1)"),
            "{nul}"
        );
        // Other control characters were accepted before and still are (API.md).
        assert!(validate_name("name", "line\nbreak\t").is_ok());
        assert!(validate_name("name", "Momentum · BTC ✓").is_ok());
        assert!(validate_currency("quote_currency", "USDT").is_ok());
        for bad in ["", "usdt", "US-DT", &"A".repeat(17)] {
            assert!(validate_currency("quote_currency", bad).is_err());
        }
    }
}
