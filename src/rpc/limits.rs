//! Limits on everything a client can send. Each violation is INVALID_ARGUMENT naming the field
//! and the limit, checked before any model work.

/// What one search request may ask for.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchLimits {
    /// Bytes of the question (or of all messages together).
    pub question_bytes_max: usize,
    /// Chat messages in one request.
    pub messages_max: usize,
    /// Samples (best-of-n, majority), beams (beam, dvts) or children per expansion (MCTS).
    pub n_max: u32,
    /// Generated-token budget of one search.
    pub budget_tokens_max: u64,
    /// Budget used when a request gives none.
    pub budget_tokens_default: u64,
    /// Nodes one tree may hold.
    pub nodes_max: u32,
    /// Deepest path (reasoning steps).
    pub depth_max: u32,
    /// Tokens in one reasoning step.
    pub step_tokens_max: u32,
    /// Bytes of `config_json`.
    pub config_json_bytes_max: usize,
    /// Bytes of `request_id`.
    pub request_id_bytes_max: usize,
    /// Searches running at once on this coordinator; more are RESOURCE_EXHAUSTED.
    pub searches_max: usize,
    /// Bytes of one encoded request message (the transport refuses larger ones).
    pub message_bytes_max: usize,
}

impl Default for SearchLimits {
    fn default() -> Self {
        SearchLimits {
            question_bytes_max: 32 * 1024,
            messages_max: 64,
            n_max: 64,
            budget_tokens_max: 1 << 20,
            budget_tokens_default: 1024,
            nodes_max: 100_000,
            depth_max: 64,
            step_tokens_max: 1024,
            config_json_bytes_max: 64 * 1024,
            request_id_bytes_max: 128,
            searches_max: 64,
            message_bytes_max: 4 << 20,
        }
    }
}

/// What one worker call may ask for.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerLimits {
    /// Nodes in one Expand call, or paths in one Score call.
    pub nodes_per_call_max: usize,
    /// Samples per node.
    pub k_max: u32,
    /// Tokens per sample.
    pub max_tokens_max: u32,
    /// Stop strings per node.
    pub stop_strings_max: usize,
    /// Bytes of one stop string.
    pub stop_bytes_max: usize,
    /// Bytes of `expansion_id`.
    pub expansion_id_bytes_max: usize,
    /// Bytes of one encoded request message.
    pub message_bytes_max: usize,
    /// Tokens in one step of a `Score` path (INVALID_ARGUMENT above it).
    pub score_step_tokens_max: usize,
    /// Tokens in one `Score` path, prompt and steps together (INVALID_ARGUMENT above it).
    pub score_path_tokens_max: usize,
    /// Tokens in one `Score` call, every path together (RESOURCE_EXHAUSTED above it: split
    /// the call).
    pub score_call_tokens_max: usize,
}

impl Default for WorkerLimits {
    fn default() -> Self {
        WorkerLimits {
            nodes_per_call_max: 1024,
            k_max: 256,
            max_tokens_max: 4096,
            stop_strings_max: 8,
            stop_bytes_max: 64,
            expansion_id_bytes_max: 128,
            message_bytes_max: 64 << 20,
            score_step_tokens_max: 2048,
            score_path_tokens_max: 16384,
            score_call_tokens_max: 65536,
        }
    }
}
