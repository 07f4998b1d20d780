//! TokenFlow's pacing client: sends prompts to an OpenAI-compatible LLM server at the rate the
//! hint server allows, and measures what users feel.

pub mod client;
pub mod gate;
pub mod hints;
pub mod metrics;
pub mod prompts;
pub mod route;
pub mod run;
pub mod socket;
pub mod summary;
