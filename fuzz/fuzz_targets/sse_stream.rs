//! The pacer's view of an OpenAI/vLLM stream: arbitrary bytes, split into network reads at
//! arbitrary points, framed as SSE and each `data:` payload parsed as a chunk. Nothing may panic,
//! and the split must not change the events (SSE framing is independent of read boundaries).
#![no_main]

use futures_util::StreamExt;
use libfuzzer_sys::fuzz_target;

fn events(reads: Vec<bytes::Bytes>) -> Vec<String> {
    let stream =
        futures_util::stream::iter(reads.into_iter().map(Ok::<_, std::convert::Infallible>));
    futures_executor::block_on(
        eventsource_stream::Eventsource::eventsource(stream)
            .filter_map(|e| async move { e.ok().map(|e| e.data) })
            .collect(),
    )
}

fuzz_target!(|input: &[u8]| {
    let Some((&cut, body)) = input.split_first() else {
        return;
    };
    let whole = events(vec![bytes::Bytes::copy_from_slice(body)]);
    let step = usize::from(cut).max(1);
    let split = events(
        body.chunks(step)
            .map(bytes::Bytes::copy_from_slice)
            .collect(),
    );
    assert_eq!(whole, split, "read boundaries changed the events");
    for data in &whole {
        let _ = tokenflow_schema::openai::parse_chunk(data);
    }
});
