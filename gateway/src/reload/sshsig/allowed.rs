//! The OpenSSH `allowed_signers` file (ssh-keygen(1), "ALLOWED SIGNERS"): which keys may sign
//! policy commits, and within which limits. Every option is honoured the way `ssh-keygen -Y
//! verify` honours it (`namespaces`, `valid-after`, `valid-before`); what this gateway cannot
//! honour (`cert-authority`, unknown options) is refused when the file is read, never skipped.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::{KEY_TYPE, SigError};

/// Longest option name quoted back in an error.
const MAX_QUOTED: usize = 64;

/// Keys allowed to sign policy commits, each with the limits its line sets.
#[derive(Debug, Clone, Default)]
pub struct AllowedSigners {
    signers: Vec<Signer>,
}

/// One `ssh-ed25519` line.
#[derive(Debug, Clone)]
struct Signer {
    principals: String,
    key: Vec<u8>,
    /// `namespaces="…"`: a pattern list the signature's namespace must match.
    namespaces: Option<String>,
    /// `valid-after`, Unix seconds.
    valid_after: Option<i64>,
    /// `valid-before`, Unix seconds.
    valid_before: Option<i64>,
}

impl AllowedSigners {
    /// Parses the OpenSSH `allowed_signers` format: `principals [options] key-type base64
    /// [comment]`; `#` comments and blank lines are ignored. Lines of other key types are
    /// parsed (their options too) but never match, since only `ssh-ed25519` is verified.
    /// Times must carry a `Z` (UTC): OpenSSH reads a bare time in the local time zone, which
    /// the gateway does not guess.
    pub fn parse(text: &str) -> Result<Self, SigError> {
        let mut signers = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(signer) = parse_line(line, i + 1)? {
                signers.push(signer);
            }
        }
        Ok(Self { signers })
    }

    /// The `allowed_signers` line for a public key blob.
    pub fn line(principal: &str, public_key_blob: &[u8]) -> String {
        format!(
            "{principal} {KEY_TYPE} {}",
            STANDARD.encode(public_key_blob)
        )
    }

    /// The principals of the first line for `key` whose options allow a signature in
    /// `namespace` at every one of `times` (Unix seconds); otherwise why the first line for
    /// that key refused it, or [`SigError::UnknownSigner`] when no line names the key.
    pub(super) fn authorize(
        &self,
        key: &[u8],
        namespace: &str,
        times: &[i64],
    ) -> Result<&str, SigError> {
        let mut first_refusal = None;
        for signer in self.signers.iter().filter(|s| s.key == key) {
            match signer.allows(namespace, times) {
                Ok(()) => return Ok(signer.principals.as_str()),
                Err(e) => {
                    first_refusal.get_or_insert(e);
                }
            }
        }
        Err(first_refusal.unwrap_or(SigError::UnknownSigner))
    }
}

impl Signer {
    fn allows(&self, namespace: &str, times: &[i64]) -> Result<(), SigError> {
        if let Some(patterns) = &self.namespaces
            && !pattern_list_matches(namespace, patterns)
        {
            return Err(SigError::NamespaceNotAllowed {
                principals: self.principals.clone(),
                namespace: namespace.to_string(),
            });
        }
        for &at in times {
            if let Some(after) = self.valid_after
                && at < after
            {
                return Err(SigError::NotYetValid {
                    principals: self.principals.clone(),
                    valid_after: after,
                    at,
                });
            }
            if let Some(before) = self.valid_before
                && at > before
            {
                return Err(SigError::Expired {
                    principals: self.principals.clone(),
                    valid_before: before,
                    at,
                });
            }
        }
        Ok(())
    }
}

/// One non-comment line; `None` for a well-formed line of a key type we do not verify.
fn parse_line(line: &str, number: usize) -> Result<Option<Signer>, SigError> {
    let bad = |why| SigError::AllowedSigners { line: number, why };
    let (principals, rest) = field(line).map_err(bad)?;
    if principals.is_empty() {
        return Err(bad("no principal before the key"));
    }
    let rest = rest.trim_start();
    let first = rest.split_whitespace().next().unwrap_or_default();
    if first.is_empty() {
        return Err(bad("no key type"));
    }
    let (options, rest) = if is_key_type(first) {
        (Options::default(), rest)
    } else {
        let (text, after) = options_field(rest).map_err(bad)?;
        (parse_options(text, number)?, after)
    };
    let (next, rest) = field(rest).map_err(bad)?;
    if next.is_empty() {
        return Err(bad("no key type"));
    }
    if !is_key_type(next) {
        return Err(bad("no key type after the options"));
    }
    let (blob, _comment) = field(rest).map_err(bad)?;
    if blob.is_empty() {
        return Err(bad("no key after the key type"));
    }
    let key = STANDARD
        .decode(blob)
        .map_err(|_| bad("the key is not base64"))?;
    if next != KEY_TYPE {
        return Ok(None);
    }
    Ok(Some(Signer {
        principals: principals.to_string(),
        key,
        namespaces: options.namespaces,
        valid_after: options.valid_after,
        valid_before: options.valid_before,
    }))
}

/// The next whitespace-separated field (a `"`-quoted one may hold spaces) and the rest.
fn field(s: &str) -> Result<(&str, &str), &'static str> {
    let s = s.trim_start();
    if let Some(quoted) = s.strip_prefix('"') {
        let end = quoted.find('"').ok_or("a quote is not closed")?;
        return Ok((&quoted[..end], &quoted[end + 1..]));
    }
    let end = s.find(char::is_whitespace).unwrap_or(s.len());
    Ok((&s[..end], &s[end..]))
}

/// The options field: up to the first whitespace outside double quotes (`\"` escapes one).
fn options_field(s: &str) -> Result<(&str, &str), &'static str> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => return Ok((&s[..i], &s[i..])),
            _ => {}
        }
    }
    if quoted {
        return Err("a quote is not closed");
    }
    Ok((s, ""))
}

fn is_key_type(field: &str) -> bool {
    ["ssh-", "ecdsa-", "sk-"]
        .iter()
        .any(|p| field.starts_with(p))
        && field
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-@._".contains(&b))
}

#[derive(Debug, Default)]
struct Options {
    namespaces: Option<String>,
    valid_after: Option<i64>,
    valid_before: Option<i64>,
}

/// `option[,option…]` as `sigopts_parse` in OpenSSH's `sshsig.c` reads it: names are
/// case-insensitive, values are double-quoted (`\"` escapes a quote), each option once.
fn parse_options(text: &str, number: usize) -> Result<Options, SigError> {
    let bad = |why| SigError::AllowedSigners { line: number, why };
    let mut options = Options::default();
    let mut rest = text;
    loop {
        let end = rest.find(['=', ',']).unwrap_or(rest.len());
        let name = &rest[..end];
        rest = &rest[end..];
        let lower = name.to_ascii_lowercase();
        match lower.as_str() {
            "cert-authority" => return Err(SigError::CertAuthority { line: number }),
            "namespaces" | "valid-after" | "valid-before" => {
                let value;
                (value, rest) = quoted_value(rest).map_err(bad)?;
                let clash = match lower.as_str() {
                    "namespaces" => options.namespaces.replace(value).is_some(),
                    "valid-after" => options
                        .valid_after
                        .replace(parse_time(&value).map_err(bad)?)
                        .is_some(),
                    _ => options
                        .valid_before
                        .replace(parse_time(&value).map_err(bad)?)
                        .is_some(),
                };
                if clash {
                    return Err(bad("an option is given twice"));
                }
            }
            _ => {
                return Err(SigError::UnknownOption {
                    line: number,
                    option: name.chars().take(MAX_QUOTED).collect(),
                });
            }
        }
        match rest.strip_prefix(',') {
            None if rest.is_empty() => break,
            None => return Err(bad("options must be separated by commas")),
            Some("") => return Err(bad("the options end with a comma")),
            Some(more) => rest = more,
        }
    }
    if let (Some(after), Some(before)) = (options.valid_after, options.valid_before)
        && before <= after
    {
        return Err(bad("valid-before is not after valid-after"));
    }
    Ok(options)
}

/// `="value"` at the start of `rest`: the unescaped value and what follows the closing quote.
fn quoted_value(rest: &str) -> Result<(String, &str), &'static str> {
    let body = rest
        .strip_prefix("=\"")
        .ok_or("an option value must be written =\"…\"")?;
    let mut value = String::new();
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((value, &body[i + 1..])),
            '\\' if body[i + 1..].starts_with('"') => {
                value.push('"');
                chars.next();
            }
            c => value.push(c),
        }
    }
    Err("an option value has no closing quote")
}

/// `YYYYMMDD[HHMM[SS]]Z` (or `…UTC`) as Unix seconds.
fn parse_time(text: &str) -> Result<i64, &'static str> {
    let upper = text.to_ascii_uppercase();
    let digits = upper
        .strip_suffix('Z')
        .or_else(|| upper.strip_suffix("UTC"))
        .ok_or("a time must end in Z (UTC): the gateway does not read local time zones")?;
    if !matches!(digits.len(), 8 | 12 | 14) || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err("a time must be YYYYMMDD[HHMM[SS]]Z");
    }
    let num = |range: std::ops::Range<usize>| digits.get(range).and_then(|d| d.parse::<u8>().ok());
    let year: i32 = digits[..4].parse().map_err(|_| "bad year")?;
    let month = num(4..6)
        .and_then(|m| time::Month::try_from(m).ok())
        .ok_or("bad month")?;
    let date = num(6..8)
        .and_then(|d| time::Date::from_calendar_date(year, month, d).ok())
        .ok_or("no such date")?;
    let (hour, minute, second) = (
        num(8..10).unwrap_or(0),
        num(10..12).unwrap_or(0),
        num(12..14).unwrap_or(0),
    );
    let clock = time::Time::from_hms(hour, minute, second).map_err(|_| "no such time of day")?;
    let at = time::PrimitiveDateTime::new(date, clock)
        .assume_utc()
        .unix_timestamp();
    if at == 0 {
        return Err("a time must not be the epoch");
    }
    Ok(at)
}

/// OpenSSH `match_pattern_list`: comma-separated `*`/`?` globs, a `!` pattern that matches
/// refuses outright, otherwise any positive match accepts.
fn pattern_list_matches(value: &str, list: &str) -> bool {
    let mut positive = false;
    for pattern in list.split(',') {
        match pattern.strip_prefix('!') {
            Some(negated) if glob(value.as_bytes(), negated.as_bytes()) => return false,
            Some(_) => {}
            None => positive |= glob(value.as_bytes(), pattern.as_bytes()),
        }
    }
    positive
}

/// `*` and `?` wildcard match in O(len·len), without recursion.
fn glob(value: &[u8], pattern: &[u8]) -> bool {
    let (mut v, mut p) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while v < value.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, v));
                p += 1;
            }
            Some(&c) if c == b'?' || c == value[v] => {
                v += 1;
                p += 1;
            }
            _ => match star {
                Some((sp, sv)) => {
                    p = sp + 1;
                    v = sv + 1;
                    star = Some((sp, sv + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests;
