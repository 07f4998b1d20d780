//! Exported probe points for the agent's uprobes (`--uprobe BIN:tokenflow_backend_first_token`,
//! `--span BIN:tokenflow_backend_request_start..tokenflow_backend_scheduled:queue`):
//! each starts with the 5-byte nop that Linux ≥ 6.18 turns into a cheap call, so tracing every
//! request costs well under a microsecond. The argument is the request id.

extern "C" fn noop(_request_id: u64) {
    std::hint::black_box(());
}

tokenflow_markers::probe_point!(
    /// A request was accepted and queued.
    pub fn tokenflow_backend_request_start(request_id: u64) => noop
);
tokenflow_markers::probe_point!(
    /// The scheduler took the request off the waiting queue; its prefill starts now.
    pub fn tokenflow_backend_scheduled(request_id: u64) => noop
);
tokenflow_markers::probe_point!(
    /// Prefill finished and the first token was sampled.
    pub fn tokenflow_backend_first_token(request_id: u64) => noop
);
tokenflow_markers::probe_point!(
    /// The request finished, failed or was cancelled.
    pub fn tokenflow_backend_request_end(request_id: u64) => noop
);

pub fn request_start(id: u64) {
    tokenflow_backend_request_start(id);
}
pub fn scheduled(id: u64) {
    tokenflow_backend_scheduled(id);
}
pub fn first_token(id: u64) {
    tokenflow_backend_first_token(id);
}
pub fn request_end(id: u64) {
    tokenflow_backend_request_end(id);
}
