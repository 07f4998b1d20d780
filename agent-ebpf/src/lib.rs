//! Exists so the agent can name this crate as a build-dependency; the programs are in `main.rs`.
#![no_std]
