//! JSON the hint server and the pacer read from the network: a client registration body, a
//! hint, a telemetry window. Arbitrary bytes must give a value or an error, never a panic, and
//! a registration either merges into a valid config or names the offending field.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenflow_schema::{ClientConfig, ClientConfigInput, Hint, TelemetryWindow};

fuzz_target!(|input: &[u8]| {
    if let Ok(i) = serde_json::from_slice::<ClientConfigInput>(input) {
        match ClientConfig::merge(None, &i) {
            Ok(c) => {
                assert!(c.min_rps > 0.0 && c.min_rps <= c.max_rps, "{c:?}");
                assert!(c.weight > 0.0, "{c:?}");
            }
            Err((field, msg)) => assert!(!field.is_empty() && !msg.is_empty()),
        }
    }
    let _ = serde_json::from_slice::<Hint>(input);
    let _ = serde_json::from_slice::<TelemetryWindow>(input);
});
