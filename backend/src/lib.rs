//! TokenFlow's LLM backend: a Llama-family transformer in candle behind vLLM's OpenAI-compatible
//! API, with an iteration-level scheduler and vLLM's metric names.

pub mod api;
pub mod engine;
pub mod markers;
pub mod model;
