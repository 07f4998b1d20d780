//! `--uprobe PATH:SYMBOL[:LABEL]`: which function of which binary to time. The symbol is looked up in
//! the ELF symbol table, by its exact name or, for Rust and C++, by its demangled path (without the
//! hash), so `my_server::handlers::generate` finds `_ZN10my_server8handlers8generate17h…E`.
//!
//! `--span PATH:START..END[:LABEL]`: the time from one marker function to another *for the same
//! request*, paired by the functions' first integer argument (a request id), so a span may start on
//! one thread and end on another — `tokenflow-backend`'s request-start → scheduled → first-token
//! markers split its time to first token into queueing and prefill this way.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use object::{Object, ObjectSymbol};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UprobeSpec {
    pub path: PathBuf,
    pub symbol: String,
    pub label: String,
}

/// `PATH:REST` → (PATH, SYMBOLS, LABEL): SYMBOLS may hold Rust paths (`a::b`), so LABEL follows the
/// last lone colon; `None` when PATH or SYMBOLS is empty.
fn split_spec(s: &str) -> Option<(&str, &str, &str)> {
    let (path, rest) = s.split_once(':')?;
    let b = rest.as_bytes();
    let lone = (0..b.len())
        .rev()
        .find(|&i| b[i] == b':' && (i == 0 || b[i - 1] != b':') && b.get(i + 1) != Some(&b':'));
    let (symbols, label) = match lone {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    (!path.is_empty() && !symbols.is_empty()).then_some((path, symbols, label))
}

impl std::str::FromStr for UprobeSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (path, symbol, label) = split_spec(s)
            .ok_or_else(|| anyhow::anyhow!("--uprobe {s:?}: expected PATH:SYMBOL[:LABEL]"))?;
        let label = if label.is_empty() { symbol } else { label }.to_string();
        Ok(Self {
            path: path.into(),
            symbol: symbol.to_string(),
            label,
        })
    }
}

/// A span between two marker functions of one binary, paired per request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpanSpec {
    pub path: PathBuf,
    pub start: String,
    pub end: String,
    pub label: String,
}

impl std::str::FromStr for SpanSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let usage = || anyhow::anyhow!("--span {s:?}: expected PATH:START..END[:LABEL]");
        let (path, symbols, label) = split_spec(s).ok_or_else(usage)?;
        let (start, end) = symbols.split_once("..").ok_or_else(usage)?;
        if start.is_empty() || end.is_empty() || start == end {
            return Err(usage());
        }
        let label = if label.is_empty() {
            format!("{start}..{end}")
        } else {
            label.to_string()
        };
        Ok(Self {
            path: path.into(),
            start: start.to_string(),
            end: end.to_string(),
            label,
        })
    }
}

impl SpanSpec {
    /// The start and end markers as `--uprobe` targets, to resolve and describe them alike.
    pub fn markers(&self) -> [UprobeSpec; 2] {
        [&self.start, &self.end].map(|symbol| UprobeSpec {
            path: self.path.clone(),
            symbol: symbol.clone(),
            label: self.label.clone(),
        })
    }

    /// `PATH:START..END`, as windows report the span's target.
    pub fn target(&self) -> String {
        format!("{}:{}..{}", self.path.display(), self.start, self.end)
    }
}

/// Demangled name without the trailing hash (`{:#}`), or the name itself.
fn readable(name: &str) -> String {
    format!("{:#}", rustc_demangle::demangle(name))
}

/// The symbol's name as stored in the binary, for the kernel to resolve.
pub fn resolve(spec: &UprobeSpec) -> Result<String> {
    let data =
        std::fs::read(&spec.path).with_context(|| format!("reading {}", spec.path.display()))?;
    let file = object::File::parse(&*data)
        .with_context(|| format!("{} is not an ELF binary", spec.path.display()))?;
    let mut matches: Vec<String> = Vec::new();
    for sym in file.symbols().chain(file.dynamic_symbols()) {
        if sym.kind() != object::SymbolKind::Text || sym.address() == 0 {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        let wanted = name == spec.symbol || readable(name) == spec.symbol;
        if wanted && !matches.iter().any(|m| m == name) {
            matches.push(name.to_string());
        }
    }
    match matches.len() {
        0 => bail!(
            "{}: no function named {:?} (give the exact or the demangled name; `nm -C` lists them)",
            spec.path.display(),
            spec.symbol
        ),
        1 => Ok(matches.remove(0)),
        _ => bail!(
            "{}: {:?} names several functions: {matches:?}; give the mangled one",
            spec.path.display(),
            spec.symbol
        ),
    }
}

/// A function this test binary itself exports, to look up by its demangled name.
#[cfg(test)]
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tokenflow_test_marker() -> u32 {
    std::hint::black_box(7)
}

/// A mangled Rust function of the test binary.
#[cfg(test)]
#[inline(never)]
pub fn rust_marker(x: u64) -> u64 {
    std::hint::black_box(x * 3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parses_label_or_defaults_to_symbol() {
        let s: UprobeSpec = "/usr/bin/x:handle:api".parse().unwrap();
        assert_eq!((s.symbol.as_str(), s.label.as_str()), ("handle", "api"));
        let s: UprobeSpec = "/usr/bin/x:handle".parse().unwrap();
        assert_eq!(s.label, "handle");
        let s: UprobeSpec = "/srv/app:my_crate::handlers::generate:gen".parse().unwrap();
        assert_eq!(
            (s.symbol.as_str(), s.label.as_str()),
            ("my_crate::handlers::generate", "gen")
        );
        let s: UprobeSpec = "/srv/app:my_crate::handlers::generate".parse().unwrap();
        assert_eq!(s.label, "my_crate::handlers::generate");
        assert!("nopath".parse::<UprobeSpec>().is_err());
        assert!(":sym".parse::<UprobeSpec>().is_err());
    }

    #[test]
    fn span_spec_parses_two_markers_and_a_label() {
        let s: SpanSpec = "/srv/backend:req_start..first_token:ttft".parse().unwrap();
        assert_eq!(
            (s.start.as_str(), s.end.as_str(), s.label.as_str()),
            ("req_start", "first_token", "ttft")
        );
        assert_eq!(s.target(), "/srv/backend:req_start..first_token");
        let s: SpanSpec = "/srv/app:a::start..a::end".parse().unwrap();
        assert_eq!((s.start.as_str(), s.end.as_str()), ("a::start", "a::end"));
        assert_eq!(s.label, "a::start..a::end");
        for bad in [
            "/srv/app:start",
            "/srv/app:..end",
            "/srv/app:start..",
            "/srv/app:x..x",
            ":a..b",
        ] {
            let e = bad.parse::<SpanSpec>().unwrap_err().to_string();
            assert!(e.contains("PATH:START..END"), "{bad}: {e}");
        }
    }

    #[test]
    fn finds_exact_and_demangled_rust_names() {
        // Called, so the linker keeps both in the test binary.
        assert_eq!(tokenflow_test_marker() + rust_marker(1) as u32, 10);
        let exe = std::env::current_exe().unwrap();
        let spec = |symbol: &str| UprobeSpec {
            path: exe.clone(),
            symbol: symbol.into(),
            label: "t".into(),
        };
        assert_eq!(
            resolve(&spec("tokenflow_test_marker")).unwrap(),
            "tokenflow_test_marker"
        );
        // A mangled Rust function of this binary, found by its readable path.
        let mangled = resolve(&spec("tokenflow_agent::uprobe_target::rust_marker")).unwrap();
        assert!(
            mangled.starts_with("_ZN") || mangled.starts_with("_R"),
            "{mangled}"
        );
        let err = resolve(&spec("no::such::function"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no function named"), "{err}");
    }
}
