//! Exact decimals: parsing (plain or exponent notation, never through `f64`), rounding to 8
//! places (midpoint to even), plain formatting, and a serde `deserialize_with` that reads JSON
//! strings and numbers exactly.

use rust_decimal::{Decimal, RoundingStrategy};

use crate::DomainError;

/// Most decimal places accepted on input, and the precision of fees and released cost.
pub const MAX_PLACES: u32 = 8;

/// Rounds to 8 places, midpoint to even, and normalizes (`10.00000000` becomes `10`).
pub fn round8(d: Decimal) -> Decimal {
    d.round_dp_with_strategy(MAX_PLACES, RoundingStrategy::MidpointNearestEven)
        .normalize()
}

/// The places of the value, i.e. of its normalized form: `1.000000000` has 0, `0.125` has 3.
pub fn places(d: &Decimal) -> u32 {
    d.normalize().scale()
}

/// Plain notation of the normalized value, never an exponent: `1E-8` gives `0.00000001`.
pub fn plain(d: Decimal) -> String {
    d.normalize().to_string()
}

/// Parses plain (`0.125`, `-3`) or exponent notation (`1E-8`, `1e-8`, `2.5e3`) exactly.
///
/// Returns `None` for anything else (empty, spaces, `NaN`, `1_000`, hex...) and for values that
/// a [`Decimal`] cannot hold without rounding (more than 28 places, or a mantissa past 96
/// bits), however they are written: leading and trailing zeros, and an exponent, are no
/// digits of the value (`1000000000000000000000000000000e-30` is 1).
pub fn parse_decimal(s: &str) -> Option<Decimal> {
    let (mant, exp) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let body = mant.strip_prefix(['-', '+']).unwrap_or(mant);
    let digits = body.bytes().filter(u8::is_ascii_digit).count();
    let dots = body.bytes().filter(|&b| b == b'.').count();
    if digits == 0 || dots > 1 || digits + dots != body.len() {
        return None;
    }
    let exp = match exp {
        // Plain text that fits as it is: the common case (every decimal an event holds).
        None => {
            if let Ok(d) = Decimal::from_str_exact(mant) {
                return Some(d);
            }
            0
        }
        Some(exp) => {
            let exp_digits = exp.strip_prefix(['-', '+']).unwrap_or(exp);
            if exp_digits.is_empty()
                || exp_digits.len() > 4
                || !exp_digits.bytes().all(|b| b.is_ascii_digit())
            {
                return None;
            }
            exp.parse::<i64>().ok()?
        }
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    let all = format!("{int}{frac}");
    let significant = all.trim_start_matches('0');
    let kept = significant.trim_end_matches('0');
    if kept.is_empty() {
        return Some(Decimal::ZERO);
    }
    // The value is `kept` × 10^-scale.
    let mut scale = frac.len() as i64 - exp - (significant.len() - kept.len()) as i64;
    let mut m: i128 = kept.parse().ok()?;
    if scale < 0 {
        m = m.checked_mul(10i128.checked_pow(u32::try_from(-scale).ok()?)?)?;
        scale = 0;
    }
    if mant.starts_with('-') {
        m = -m;
    }
    Decimal::try_from_i128_with_scale(m, u32::try_from(scale).ok()?).ok()
}

/// Largest mantissa of a value that round-trips through its text exactly: 28 digits.
const MAX_MANTISSA: u128 = 10u128.pow(28) - 1;

fn fits(r: Decimal) -> Option<Decimal> {
    (r.mantissa().unsigned_abs() <= MAX_MANTISSA).then_some(r)
}

/// `a + b` without any rounding, or `None` (the exact result needs more than 28 significant
/// digits). [`Decimal`]'s own operators round silently at 28 digits instead. A zero operand,
/// whatever its places (`0.0` is what `0.1 - 0.1` leaves), gives the other one: [`Decimal`]
/// returns it as it is, without the zero's places, which the check below would take for a
/// rounding. The operands' trailing zeros are no places (API.md: `1.000000000` is 1), so they
/// are dropped first: kept, `1.0000000000000000000000000` (as a request may send it) would make
/// the sum with a cash of 25000.5 need 30 digits.
pub fn exact_add(a: Decimal, b: Decimal) -> Option<Decimal> {
    let (a, b) = (a.normalize(), b.normalize());
    if a.is_zero() {
        return fits(b);
    }
    if b.is_zero() {
        return fits(a);
    }
    let r = a.checked_add(b)?;
    (r.scale() == a.scale().max(b.scale()))
        .then_some(r)
        .and_then(fits)
}

/// `a - b` without any rounding, or `None`.
pub fn exact_sub(a: Decimal, b: Decimal) -> Option<Decimal> {
    exact_add(a, -b)
}

/// `a * b` without any rounding, or `None`. A zero operand gives zero (as for
/// [`exact_add`], [`Decimal`] drops its places); the operands' trailing zeros are dropped first,
/// as there.
pub fn exact_mul(a: Decimal, b: Decimal) -> Option<Decimal> {
    if a.is_zero() || b.is_zero() {
        return Some(Decimal::ZERO);
    }
    let (a, b) = (a.normalize(), b.normalize());
    let r = a.checked_mul(b)?;
    (r.scale() == a.scale() + b.scale())
        .then_some(r)
        .and_then(fits)
}

/// `round8(a * b)` computed exactly in integers (no intermediate rounding at 28 digits), or
/// `None` on overflow.
pub fn mul_round8(a: Decimal, b: Decimal) -> Option<Decimal> {
    let (a, b) = (a.normalize(), b.normalize());
    let m = a.mantissa().checked_mul(b.mantissa())?;
    let scale = a.scale() + b.scale();
    if scale <= MAX_PLACES {
        return Decimal::try_from_i128_with_scale(m, scale)
            .ok()
            .map(|d| d.normalize());
    }
    let div = 10i128.checked_pow(scale - MAX_PLACES)?;
    let (mut q, r) = (m / div, m % div);
    let twice = r.unsigned_abs() * 2;
    let away = twice > div.unsigned_abs() || (twice == div.unsigned_abs() && q % 2 != 0);
    if away {
        q += m.signum();
    }
    Decimal::try_from_i128_with_scale(q, MAX_PLACES)
        .ok()
        .map(|d| d.normalize())
}

/// `round8(a * b / c)` computed exactly (the product and quotient in big integers, never
/// rounded at Decimal's 28 digits: a quotient rounded there can land on an 8-place midpoint
/// the exact value is not on, and round the wrong way), or `None` when `c` is 0 or the result
/// does not fit a Decimal.
pub fn mul_div_round8(a: Decimal, b: Decimal, c: Decimal) -> Option<Decimal> {
    use num_bigint::{BigInt, Sign};
    if c.is_zero() {
        return None;
    }
    let (a, b, c) = (a.normalize(), b.normalize(), c.normalize());
    // a*b/c in units of 10^-8: ma*mb * 10^(8 + sc) / (mc * 10^(sa + sb)).
    let ten = |e: u32| BigInt::from(10u8).pow(e);
    let mut num = BigInt::from(a.mantissa()) * b.mantissa() * ten(MAX_PLACES + c.scale());
    let mut den = BigInt::from(c.mantissa()) * ten(a.scale() + b.scale());
    if den.sign() == Sign::Minus {
        (num, den) = (-num, -den);
    }
    // Truncated toward zero; the remainder has the numerator's sign.
    let (mut q, r) = (&num / &den, &num % &den);
    let twice = r.magnitude() * 2u8;
    if twice > *den.magnitude() || (twice == *den.magnitude() && q.bit(0)) {
        q += if num.sign() == Sign::Minus { -1 } else { 1 };
    }
    // At 8 places the mantissa may need more than a Decimal's 96 bits where the value does
    // not (5e21 is 5 followed by 29 zeros in units of 1e-8): its trailing zeros go first.
    let mut scale = MAX_PLACES;
    while scale > 0 && (&q % 10u8).sign() == Sign::NoSign && q.sign() != Sign::NoSign {
        q /= 10u8;
        scale -= 1;
    }
    let q = i128::try_from(q).ok()?;
    Decimal::try_from_i128_with_scale(q, scale)
        .ok()
        .map(|d| d.normalize())
}

/// `> 0` and at most 8 places, else `bad_request` naming `field` (`amount: must be > 0`).
///
/// # Errors
/// [`DomainError::BadRequest`].
pub fn validate_amount(field: &str, d: Decimal) -> Result<(), DomainError> {
    if d <= Decimal::ZERO {
        return Err(DomainError::bad_request(format!("{field}: must be > 0")));
    }
    validate_places(field, d)
}

/// At most 8 places, else `bad_request` naming `field`.
///
/// # Errors
/// [`DomainError::BadRequest`].
pub fn validate_places(field: &str, d: Decimal) -> Result<(), DomainError> {
    if places(&d) > MAX_PLACES {
        Err(DomainError::bad_request(format!(
            "{field}: at most {MAX_PLACES} decimal places"
        )))
    } else {
        Ok(())
    }
}

/// A fraction strictly between 0 and 1 with at most 8 places, else `bad_request`.
///
/// # Errors
/// [`DomainError::BadRequest`].
pub fn validate_fraction(field: &str, d: Decimal) -> Result<(), DomainError> {
    if d <= Decimal::ZERO || d >= Decimal::ONE {
        return Err(DomainError::bad_request(format!(
            "{field}: must be > 0 and < 1"
        )));
    }
    validate_places(field, d)
}

/// Serde `deserialize_with` for a [`Decimal`] given as a JSON string or a JSON number, read
/// exactly (never through `f64`).
///
/// With `serde_json` (feature `raw_value`) the value's raw text is requested exactly as
/// `Box<serde_json::value::RawValue>` does it, and parsed with [`parse_decimal`]. So that the
/// same types still deserialize when serde buffers them (an event inside a `#[serde(flatten)]`
/// envelope, an untagged enum), a buffered value is accepted too: strings (which is how events
/// store decimals) are exact there as well; a buffered JSON number already went through `f64`
/// and is taken as its shortest round-trip representation.
pub mod exact {
    use std::fmt;

    use rust_decimal::Decimal;
    use serde::de::{self, Deserializer, MapAccess, Visitor};

    use super::parse_decimal;

    /// `serde_json`'s private name for a raw value (`serde_json::value::RawValue`).
    const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";
    /// Start of every message of a decimal that does not parse.
    pub const INVALID_PREFIX: &str = "invalid decimal ";

    /// Deserializes a [`Decimal`] exactly from a JSON string or number.
    ///
    /// # Errors
    /// Anything but a string or number holding a decimal.
    pub fn deserialize<'de, D>(d: D) -> Result<Decimal, D::Error>
    where
        D: Deserializer<'de>,
    {
        d.deserialize_newtype_struct(RAW_VALUE_TOKEN, ExactVisitor)
    }

    fn invalid<E: de::Error>(shown: &str) -> E {
        E::custom(format!(
            "{INVALID_PREFIX}{shown}: expected a string or number in plain or exponent notation \
             (at most 28 significant digits)"
        ))
    }

    fn from_raw<E: de::Error>(raw: &str) -> Result<Decimal, E> {
        let raw = raw.trim();
        if raw.starts_with('"') {
            let s: String = serde_json::from_str(raw).map_err(|_| invalid::<E>(raw))?;
            parse_decimal(&s).ok_or_else(|| invalid(raw))
        } else {
            parse_decimal(raw).ok_or_else(|| invalid(raw))
        }
    }

    struct ExactVisitor;

    impl<'de> Visitor<'de> for ExactVisitor {
        type Value = Decimal;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a decimal as a JSON string or number")
        }

        // serde_json answers the raw-value request with a one-entry map: its token -> raw text.
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Decimal, A::Error> {
            match map.next_key::<String>()? {
                Some(k) if k == RAW_VALUE_TOKEN => {
                    let raw: String = map.next_value()?;
                    from_raw(&raw)
                }
                _ => Err(de::Error::invalid_type(de::Unexpected::Map, &self)),
            }
        }

        fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Decimal, D::Error> {
            d.deserialize_any(self)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Decimal, E> {
            parse_decimal(v).ok_or_else(|| invalid(&format!("{v:?}")))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Decimal, E> {
            Ok(Decimal::from(v))
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Decimal, E> {
            Ok(Decimal::from(v))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Decimal, E> {
            // Display of an f64 is its shortest round-trip form in plain notation.
            let s = v.to_string();
            parse_decimal(&s).ok_or_else(|| invalid(&s))
        }
    }

    /// The same for an `Option<Decimal>` (`null` is `None`); pair it with `#[serde(default)]`.
    pub mod option {
        use std::fmt;

        use rust_decimal::Decimal;
        use serde::de::{self, Deserializer, Visitor};

        /// Deserializes an optional [`Decimal`] exactly.
        ///
        /// # Errors
        /// Anything but `null`, a string or a number holding a decimal.
        pub fn deserialize<'de, D>(d: D) -> Result<Option<Decimal>, D::Error>
        where
            D: Deserializer<'de>,
        {
            d.deserialize_option(OptVisitor)
        }

        struct OptVisitor;

        impl<'de> Visitor<'de> for OptVisitor {
            type Value = Option<Decimal>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("null or a decimal as a JSON string or number")
            }

            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }

            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }

            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                super::deserialize(d).map(Some)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use serde::Deserialize;

    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn rounding_is_midpoint_to_even_and_normalized() {
        assert_eq!(round8(d("0.000000005")), d("0"));
        assert_eq!(round8(d("0.000000015")), d("0.00000002"));
        assert_eq!(round8(d("0.000000025")), d("0.00000002"));
        assert_eq!(round8(d("-0.000000025")), d("-0.00000002"));
        assert_eq!(round8(d("10.000000000")).to_string(), "10");
        assert_eq!(round8(d("1.123456789")).to_string(), "1.12345679");
    }

    #[test]
    fn a_share_is_rounded_once_from_its_exact_value() {
        // 50501.1422202472487491 * 1.63626389 / 3 = 27544.3984729149999...: Decimal's
        // 28-digit product and quotient land on the midpoint ...2915 and round8 went up.
        let basis = d("2.99999999") * d("16833.71411286") + d("0.00000001") * d("5000.43898777");
        assert_eq!(basis, d("50501.1422202472487491"));
        assert_eq!(
            round8(basis * d("1.63626389") / d("3")),
            d("27544.39847292")
        );
        assert_eq!(
            mul_div_round8(basis, d("1.63626389"), d("3")),
            Some(d("27544.39847291"))
        );
        // Midpoints to even, either sign; a negative divisor; exact results stay exact.
        for (a, b, c, want) in [
            ("0.00000001", "1", "2", "0"),
            ("0.00000003", "1", "2", "0.00000002"),
            ("-0.00000003", "1", "2", "-0.00000002"),
            ("0.00000003", "1", "-2", "-0.00000002"),
            ("10", "1", "3", "3.33333333"),
            ("20", "1", "3", "6.66666667"),
            ("12612.6", "0.5", "1.5", "4204.2"),
        ] {
            assert_eq!(
                mul_div_round8(d(a), d(b), d(c)),
                Some(d(want)),
                "{a} * {b} / {c}"
            );
        }
        // A share whose mantissa at 8 places would pass 96 bits, the value not.
        assert_eq!(mul_div_round8(d("1e22"), d("5"), d("10")), Some(d("5e21")));
        assert_eq!(
            mul_div_round8(d("-7E-8"), d("613837.87"), d("-5E-27")),
            Some(d("8593730180000000000000000"))
        );
        assert_eq!(mul_div_round8(d("1"), d("1"), d("0")), None);
        assert_eq!(mul_div_round8(Decimal::MAX, Decimal::MAX, d("1")), None);
    }

    #[test]
    fn places_of_the_value() {
        assert_eq!(places(&d("1.000000000")), 0);
        assert_eq!(places(&d("0.125")), 3);
        assert_eq!(places(&d("0.000000001")), 9);
        assert_eq!(places(&d("100")), 0);
    }

    #[test]
    fn parse_plain_and_exponent() {
        for (s, want) in [
            ("0.125", "0.125"),
            ("1E-8", "0.00000001"),
            ("1e-8", "0.00000001"),
            ("-3", "-3"),
            ("2.5e3", "2500"),
            ("2.5E+3", "2500"),
            ("100e-30", "0.0000000000000000000000000001"),
            ("0e-40", "0"),
            ("1.000000000", "1"),
            ("0.1", "0.1"),
            ("+7", "7"),
            // trailing zeros are no places, however many
            ("1.0000000000000000000000000000000", "1"),
            ("1.50000000000000000000000000000000e2", "150"),
            ("0.000000000000000000000000000000", "0"),
            ("-.0", "0"),
            // ... as are leading ones, and the exponent moves the point before anything
            // counts: each of these is a value of one significant digit
            ("1000000000000000000000000000000e-30", "1"),
            ("100000000000000000000000000000e-10", "10000000000000000000"),
            ("0.00000000000000000000000000000000001e35", "1"),
            ("-0000000000000000000000000000000000000000025e-1", "-2.5"),
            (
                "79228162514264337593543950335",
                "79228162514264337593543950335",
            ),
            (
                "7922816251426433759354395033.5e1",
                "79228162514264337593543950335",
            ),
        ] {
            assert_eq!(parse_decimal(s).map(plain).as_deref(), Some(want), "{s}");
        }
        for s in [
            "",
            " 1",
            "1 ",
            "abc",
            "NaN",
            "inf",
            "1_000",
            "0x10",
            "1e",
            "e5",
            "1e-",
            "1.2.3",
            ".",
            "-",
            "1e99999",
            "1e-29",
            "1e29",
            "1,5",
            "--1",
            "123456789012345678901234567890",
            "79228162514264337593543950336",
            "0.00000000000000000000000000001e0",
        ] {
            assert_eq!(parse_decimal(s), None, "{s}");
        }
    }

    #[test]
    fn plain_never_uses_an_exponent() {
        assert_eq!(plain(parse_decimal("1e-8").unwrap()), "0.00000001");
        assert_eq!(
            plain(parse_decimal("1e20").unwrap()),
            "100000000000000000000"
        );
        assert_eq!(plain(d("-0.0")), "0");
    }

    #[derive(Deserialize, Debug)]
    struct T {
        #[serde(deserialize_with = "exact::deserialize")]
        a: Decimal,
        #[serde(default, deserialize_with = "exact::option::deserialize")]
        b: Option<Decimal>,
    }

    #[test]
    fn exact_serde_from_text() {
        for (json, a, b) in [
            (r#"{"a": 1e-8}"#, "0.00000001", None),
            (r#"{"a": "1E-8", "b": null}"#, "0.00000001", None),
            (
                r#"{"a": 0.1, "b": 0.30000000000000004}"#,
                "0.1",
                Some("0.30000000000000004"),
            ),
            (
                r#"{"a": 12345678901234567890.12345678, "b": "7"}"#,
                "12345678901234567890.12345678",
                Some("7"),
            ),
            (r#"{"a": "\u0031.5"}"#, "1.5", None),
        ] {
            let t: T = serde_json::from_str(json).unwrap();
            assert_eq!(t.a.to_string(), a, "{json}");
            assert_eq!(t.b.map(|x| x.to_string()).as_deref(), b, "{json}");
        }
        for json in [
            r#"{"a": true}"#,
            r#"{"a": "x"}"#,
            r#"{"a": {}}"#,
            r#"{"a": null}"#,
            r#"{"a": [1]}"#,
        ] {
            let e = serde_json::from_str::<T>(json).unwrap_err().to_string();
            assert!(
                e.contains("invalid decimal") || e.contains("invalid type"),
                "{json}: {e}"
            );
        }
    }

    /// Buffered deserialization (flatten, untagged) cannot hand out raw text; strings stay exact.
    #[test]
    fn exact_serde_through_buffered_content() {
        #[derive(Deserialize)]
        struct Outer {
            #[serde(flatten)]
            t: T,
        }
        let o: Outer = serde_json::from_str(r#"{"a": "0.00000001", "b": 2.5}"#).unwrap();
        assert_eq!(o.t.a.to_string(), "0.00000001");
        assert_eq!(o.t.b, Some(d("2.5")));
        let v = serde_json::json!({"a": "1e-8"});
        let t: T = serde_json::from_value(v).unwrap();
        assert_eq!(t.a.to_string(), "0.00000001");
    }

    #[test]
    fn exact_arithmetic() {
        assert_eq!(exact_add(d("0.1"), d("0.2")), Some(d("0.3")));
        assert_eq!(exact_mul(d("0.5"), d("20000")), Some(d("10000")));
        let big = d("123456789012.1234567812345678");
        assert_eq!(
            exact_mul(big, d("0.1")),
            Some(d("12345678901.21234567812345678"))
        );
        assert_eq!(exact_mul(big, d("10")), None);
        assert_eq!(exact_mul(big, d("1000000000000")), None);
        assert_eq!(exact_add(big, d("0.00000000000000001")), None);
        assert_eq!(exact_sub(d("1"), d("3")), Some(d("-2")));
        // A zero with places (what 0.1 - 0.1 leaves) is no obstacle.
        let zero = d("0.1") - d("0.1");
        assert_eq!(zero.scale(), 1);
        assert_eq!(exact_add(zero, d("5")), Some(d("5")));
        assert_eq!(exact_add(d("5"), zero), Some(d("5")));
        assert_eq!(exact_sub(zero, d("5")), Some(d("-5")));
        assert_eq!(exact_mul(zero, d("5.5")), Some(Decimal::ZERO));
        assert_eq!(exact_mul(d("5.5"), zero), Some(Decimal::ZERO));
        // Trailing zeros are no places: 1.0000000000000000000000000 is 1, and 0.0010000000000000000000000 is 0.001.
        let one = d("1.0000000000000000000000000");
        assert_eq!(one.scale(), 25);
        assert_eq!(exact_add(d("25000.5"), one), Some(d("25001.5")));
        assert_eq!(exact_sub(d("25000.5"), one), Some(d("24999.5")));
        let milli = d("0.0010000000000000000000000");
        assert_eq!(exact_mul(milli, d("20000.5")), Some(d("20.0005")));
        assert_eq!(
            exact_mul(d("12345678901234567.5"), milli),
            Some(d("12345678901234.5675"))
        );
        // Beside a zero too: 1000 with 25 zeros after the point has a mantissa past 28 digits.
        let thousand = parse_decimal("1000.0000000000000000000000000").unwrap();
        assert_eq!(exact_add(Decimal::ZERO, thousand), Some(d("1000")));
        assert_eq!(exact_add(thousand, Decimal::ZERO), Some(d("1000")));
        assert_eq!(exact_add(zero, thousand), Some(d("1000")));
        // Still refused when the value itself needs more than 28 digits.
        assert_eq!(
            exact_add(d("12345678901234567890.1234567"), d("0.0000000010")),
            None
        );
        assert_eq!(mul_round8(d("10000"), d("0.001")), Some(d("10")));
        assert_eq!(mul_round8(d("0.000015"), d("0.001")), Some(d("0.00000002")));
        assert_eq!(mul_round8(d("0.000025"), d("0.001")), Some(d("0.00000002")));
        assert_eq!(
            mul_round8(d("-0.000025"), d("0.001")),
            Some(d("-0.00000002"))
        );
        assert_eq!(
            mul_round8(d("0.0000250001"), d("0.001")),
            Some(d("0.00000003"))
        );
        for (a, b) in [
            ("1234.56789012345678", "0.00123457"),
            ("0.1", "0.3"),
            ("99999999.99999999", "0.99999999"),
        ] {
            assert_eq!(
                mul_round8(d(a), d(b)),
                Some(round8(d(a) * d(b))),
                "{a} * {b}"
            );
        }
    }

    #[test]
    fn validators() {
        assert_eq!(
            validate_amount("amount", d("0")).unwrap_err().to_string(),
            "amount: must be > 0"
        );
        assert_eq!(
            validate_amount("amount", d("-1")).unwrap_err().to_string(),
            "amount: must be > 0"
        );
        assert_eq!(
            validate_amount("amount", d("0.000000001"))
                .unwrap_err()
                .to_string(),
            "amount: at most 8 decimal places"
        );
        assert!(validate_amount("amount", d("1.000000000")).is_ok());
        assert!(validate_fraction("x", d("1")).is_err());
        assert!(validate_fraction("x", d("0")).is_err());
        assert!(validate_fraction("x", d("0.5")).is_ok());
    }
}
