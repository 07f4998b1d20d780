//! Prompts: synthetic text of a chosen size, or a JSONL file (`{"prompt": …}` lines, or
//! ShareGPT-style `{"conversations": [{"from": "human", "value": …}, …]}`).

use std::path::Path;

use anyhow::{Context, Result};

const WORDS: &[&str] = &[
    "the",
    "queue",
    "network",
    "latency",
    "token",
    "model",
    "request",
    "server",
    "client",
    "packet",
    "rate",
    "limit",
    "window",
    "kernel",
    "socket",
    "buffer",
    "bandwidth",
    "route",
    "answer",
    "question",
    "context",
    "document",
    "retrieval",
    "agent",
    "summary",
    "of",
    "and",
    "to",
    "in",
    "with",
    "for",
    "under",
    "while",
    "after",
];

pub struct Prompts {
    list: Vec<String>,
}

impl Prompts {
    /// `n` synthetic prompts of about `bytes` bytes each (long-context profiles use 50–200 KB).
    pub fn synthetic(bytes: usize, n: usize, seed: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let list = (0..n.max(1))
            .map(|_| {
                let mut s = String::with_capacity(bytes + 16);
                while s.len() < bytes {
                    s.push_str(WORDS[rng.usize(..WORDS.len())]);
                    s.push(' ');
                }
                s.truncate(bytes);
                s
            })
            .collect();
        Self { list }
    }

    pub fn from_jsonl(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut list = Vec::new();
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
            let p = v["prompt"].as_str().map(str::to_string).or_else(|| {
                v["conversations"]
                    .as_array()?
                    .iter()
                    .find(|m| m["from"] == "human")?["value"]
                    .as_str()
                    .map(str::to_string)
            });
            list.push(p.with_context(|| {
                format!("{}:{}: no \"prompt\" or human turn", path.display(), i + 1)
            })?);
        }
        anyhow::ensure!(!list.is_empty(), "{} holds no prompts", path.display());
        Ok(Self { list })
    }

    /// Mean prompt size, bytes.
    pub fn mean_bytes(&self) -> f64 {
        self.list.iter().map(String::len).sum::<usize>() as f64 / self.list.len().max(1) as f64
    }

    pub fn pick(&self) -> String {
        self.list[fastrand::usize(..self.list.len())].clone()
    }
}
